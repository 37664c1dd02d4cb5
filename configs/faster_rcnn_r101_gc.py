# GC twin of faster_rcnn_r101.py: identical except the optimizer, SGD_GC (GC of conv and
# fc weight gradients, weight decay inside GC) with the same lr, momentum and
# weight_decay, as in the authors' COCO runs.
# Paper, Table 8, Faster R-CNN FPN R101: AP 38.5 -> 38.9 with GC (AP50 60.3 -> 60.8, AP75 41.6 -> 42.2).
_base_ = './faster_rcnn_r101.py'

optim_wrapper = dict(optimizer=dict(type='SGD_GC'))
