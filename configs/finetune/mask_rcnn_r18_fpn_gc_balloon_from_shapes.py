# GC twin of mask_rcnn_r18_fpn_balloon_from_shapes.py: identical except the
# optimizer, SGD_GC with the same lr, momentum and weight_decay.
_base_ = './mask_rcnn_r18_fpn_balloon_from_shapes.py'

optim_wrapper = dict(optimizer=dict(type='SGD_GC'))
