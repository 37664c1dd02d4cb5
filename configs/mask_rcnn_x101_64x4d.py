# Baseline: MMDetection 3.3's mask_rcnn/mask-rcnn_x101-64x4d_fpn_1x_coco.py, unchanged.
# Paper (Yong et al., ECCV 2020), Table 9, Mask R-CNN FPN X101-64x4d: box AP 42.1 -> 42.8, mask AP 38.0 -> 38.4 with GC.
# MMDetection 3.3 model zoo: box/mask AP 42.8/38.4 (1x).
# Schedule: 1x (12 epochs, lr steps at epochs 8 and 11), as in the paper.
# Its GC twin is mask_rcnn_x101_64x4d_gc.py.
_base_ = 'mmdet::mask_rcnn/mask-rcnn_x101-64x4d_fpn_1x_coco.py'

custom_imports = dict(imports=['gc_mm'], allow_failed_imports=False)
