# GC twin of faster_rcnn_x101_32x4d.py: identical except the optimizer, SGD_GC (GC of conv and
# fc weight gradients, weight decay inside GC) with the same lr, momentum and
# weight_decay, as in the authors' COCO runs.
# Paper, Table 8, Faster R-CNN FPN X101-32x4d: AP 40.1 -> 40.7 with GC (AP50 62.0 -> 62.7, AP75 43.8 -> 43.9).
_base_ = './faster_rcnn_x101_32x4d.py'

optim_wrapper = dict(optimizer=dict(type='SGD_GC'))
