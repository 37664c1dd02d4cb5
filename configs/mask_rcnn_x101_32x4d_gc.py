# GC twin of mask_rcnn_x101_32x4d.py: identical except the optimizer, SGD_GC (GC of conv and
# fc weight gradients, weight decay inside GC) with the same lr, momentum and
# weight_decay, as in the authors' COCO runs.
# Paper, Table 9, Mask R-CNN FPN X101-32x4d: box AP 41.1 -> 41.6, mask AP 37.1 -> 37.4 with GC.
_base_ = './mask_rcnn_x101_32x4d.py'

optim_wrapper = dict(optimizer=dict(type='SGD_GC'))
