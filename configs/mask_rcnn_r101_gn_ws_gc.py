# GC twin of mask_rcnn_r101_gn_ws.py: identical except the optimizer, SGD_GC (GC of conv and
# fc weight gradients, weight decay inside GC) with the same lr, momentum and
# weight_decay, as in the authors' COCO runs.
# Paper, not in the paper (it reports R50 GN+WS and R101 GN); the GN+WS R101 twin completes the family.
_base_ = './mask_rcnn_r101_gn_ws.py'

optim_wrapper = dict(optimizer=dict(type='SGD_GC'))
