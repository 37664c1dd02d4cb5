# GC twin of mask_rcnn_r101.py: identical except the optimizer, SGD_GC (GC of conv and
# fc weight gradients, weight decay inside GC) with the same lr, momentum and
# weight_decay, as in the authors' COCO runs.
# Paper, Table 9, Mask R-CNN FPN R101: box AP 39.4 -> 40.0, mask AP 35.9 -> 36.2 with GC.
_base_ = './mask_rcnn_r101.py'

optim_wrapper = dict(optimizer=dict(type='SGD_GC'))
