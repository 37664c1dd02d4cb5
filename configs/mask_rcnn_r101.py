# Baseline: MMDetection 3.3's mask_rcnn/mask-rcnn_r101_fpn_1x_coco.py, unchanged.
# Paper (Yong et al., ECCV 2020), Table 9, Mask R-CNN FPN R101: box AP 39.4 -> 40.0, mask AP 35.9 -> 36.2 with GC.
# MMDetection 3.3 model zoo: box/mask AP 40.0/36.1 (1x).
# Schedule: 1x (12 epochs, lr steps at epochs 8 and 11), as in the paper.
# Its GC twin is mask_rcnn_r101_gc.py.
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r101_fpn_1x_coco.py'

custom_imports = dict(imports=['gc_mm'], allow_failed_imports=False)
