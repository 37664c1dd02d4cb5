# Baseline: Mask R-CNN R50-FPN 1x with the 4conv1fc box head (four shared
# 3x3 convs and one fc, "R50 (4c1f)" in the paper). MMDetection 3.3 has no
# such Mask R-CNN config, so this one is mask-rcnn_r50_fpn_1x_coco.py with
# its box head swapped for Shared4Conv1FCBBoxHead (no normalization).
# Paper (Yong et al., ECCV 2020), Table 9, Mask R-CNN FPN R50 (4c1f): box AP
# 37.5 -> 38.4, mask AP 33.9 -> 34.6 with GC.
# MMDetection 3.3 model zoo: no such model (the closest, R50-FPN 1x with
# the 2fc head, is box/mask AP 38.2/34.7).
# Schedule: 1x (12 epochs, lr steps at epochs 8 and 11), as in the paper.
# Its GC twin is mask_rcnn_r50_4conv1fc_gc.py.
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'

custom_imports = dict(imports=['gc_mm'], allow_failed_imports=False)

model = dict(
    roi_head=dict(
        bbox_head=dict(
            type='Shared4Conv1FCBBoxHead',
            conv_out_channels=256)))
