# Baseline: MMDetection 3.3's faster_rcnn/faster-rcnn_x101-64x4d_fpn_1x_coco.py, unchanged.
# Paper (Yong et al., ECCV 2020), Table 8, Faster R-CNN FPN X101-64x4d: AP 41.3 -> 41.6 with GC (AP50 63.3 -> 63.8, AP75 45.2 -> 45.4).
# MMDetection 3.3 model zoo: box AP 42.1 (1x).
# Schedule: 1x (12 epochs, lr steps at epochs 8 and 11), as in the paper.
# Its GC twin is faster_rcnn_x101_64x4d_gc.py.
_base_ = 'mmdet::faster_rcnn/faster-rcnn_x101-64x4d_fpn_1x_coco.py'

custom_imports = dict(imports=['gc_mm'], allow_failed_imports=False)
