# Baseline: MMDetection 3.3's faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py, unchanged.
# Paper (Yong et al., ECCV 2020), Table 8, Faster R-CNN FPN R50: AP 36.4 -> 37.0 with GC (AP50 58.4 -> 59.0, AP75 39.1 -> 40.2).
# MMDetection 3.3 model zoo: box AP 37.4 (1x).
# Schedule: 1x (12 epochs, lr steps at epochs 8 and 11), as in the paper.
# Its GC twin is faster_rcnn_r50_gc.py.
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'

custom_imports = dict(imports=['gc_mm'], allow_failed_imports=False)
