# Baseline: MMDetection 3.3's faster_rcnn/faster-rcnn_r101_fpn_1x_coco.py, unchanged.
# Paper (Yong et al., ECCV 2020), Table 8, Faster R-CNN FPN R101: AP 38.5 -> 38.9 with GC (AP50 60.3 -> 60.8, AP75 41.6 -> 42.2).
# MMDetection 3.3 model zoo: box AP 39.4 (1x).
# Schedule: 1x (12 epochs, lr steps at epochs 8 and 11), as in the paper.
# Its GC twin is faster_rcnn_r101_gc.py.
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r101_fpn_1x_coco.py'

custom_imports = dict(imports=['gc_mm'], allow_failed_imports=False)
