# GC twin of the demo: identical except the optimizer, SGD_GC with the same
# lr, momentum and weight_decay. README's first command trains this one.
_base_ = './mask_rcnn_r18_fpn_shapes.py'

optim_wrapper = dict(optimizer=dict(type='SGD_GC'))
