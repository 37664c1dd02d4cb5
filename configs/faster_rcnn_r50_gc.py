# GC twin of faster_rcnn_r50.py: identical except the optimizer, SGD_GC (GC of conv and
# fc weight gradients, weight decay inside GC) with the same lr, momentum and
# weight_decay, as in the authors' COCO runs.
# Paper, Table 8, Faster R-CNN FPN R50: AP 36.4 -> 37.0 with GC (AP50 58.4 -> 59.0, AP75 39.1 -> 40.2).
_base_ = './faster_rcnn_r50.py'

optim_wrapper = dict(optimizer=dict(type='SGD_GC'))
