# GC twin of faster_rcnn_x101_64x4d.py: identical except the optimizer, SGD_GC (GC of conv and
# fc weight gradients, weight decay inside GC) with the same lr, momentum and
# weight_decay, as in the authors' COCO runs.
# Paper, Table 8, Faster R-CNN FPN X101-64x4d: AP 41.3 -> 41.6 with GC (AP50 63.3 -> 63.8, AP75 45.2 -> 45.4).
_base_ = './faster_rcnn_x101_64x4d.py'

optim_wrapper = dict(optimizer=dict(type='SGD_GC'))
