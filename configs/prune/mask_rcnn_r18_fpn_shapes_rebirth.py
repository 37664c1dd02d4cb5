# Fine-tuning a pruned demo detector ("rebirth"): train, prune the filters
# that matter least (Paper: Li et al., "Pruning Filters for Efficient
# ConvNets", ICLR 2017; tools/prune.py), fine-tune at a small lr, repeat.
# The GC paper (Yong et al., ECCV 2020) claims GC helps such fine-tuning;
# this is the SGD arm. The demo's data and MMDetection Mask R-CNN R18-FPN,
# SGD at a tenth of the demo's lr (0.001), constant after a 20-iteration
# warm-up, for 6 epochs. tools/prune.py --finetune-config takes this recipe
# (the model is the pruned one it writes). Its GC twin,
# mask_rcnn_r18_fpn_gc_shapes_rebirth.py, differs in the optimizer only.
_base_ = '../demo/mask_rcnn_r18_fpn_shapes.py'

optim_wrapper = dict(optimizer=dict(type='SGD', lr=0.001))
max_epochs = 6
train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=20)
]
default_hooks = dict(checkpoint=dict(interval=max_epochs))
