# GC twin of mask_rcnn_r18_fpn_shapes_rebirth.py (Paper: Yong et al.,
# "Gradient Centralization", ECCV 2020, on fine-tuning pruned networks):
# the same MMDetection Mask R-CNN R18-FPN recipe, identical except the
# optimizer, SGD_GC with the same lr, momentum and weight_decay.
_base_ = './mask_rcnn_r18_fpn_shapes_rebirth.py'

optim_wrapper = dict(optimizer=dict(type='SGD_GC'))
