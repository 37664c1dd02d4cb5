# GC twin of mask_rcnn_x101_64x4d.py: identical except the optimizer, SGD_GC (GC of conv and
# fc weight gradients, weight decay inside GC) with the same lr, momentum and
# weight_decay, as in the authors' COCO runs.
# Paper, Table 9, Mask R-CNN FPN X101-64x4d: box AP 42.1 -> 42.8, mask AP 38.0 -> 38.4 with GC.
_base_ = './mask_rcnn_x101_64x4d.py'

optim_wrapper = dict(optimizer=dict(type='SGD_GC'))
