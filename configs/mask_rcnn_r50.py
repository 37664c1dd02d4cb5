# Baseline: MMDetection 3.3's mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py, unchanged.
# Paper (Yong et al., ECCV 2020), Table 9, Mask R-CNN FPN R50: box AP 37.4 -> 37.9, mask AP 34.1 -> 34.7 with GC.
# MMDetection 3.3 model zoo: box/mask AP 38.2/34.7 (1x).
# Schedule: 1x (12 epochs, lr steps at epochs 8 and 11), as in the paper.
# Its GC twin is mask_rcnn_r50_gc.py.
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'

custom_imports = dict(imports=['gc_mm'], allow_failed_imports=False)
