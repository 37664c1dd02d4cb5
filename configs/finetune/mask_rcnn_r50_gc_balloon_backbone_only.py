# Fine-tune on balloon starting from an ImageNet backbone only (no detector
# weights): the backbone's init_cfg names the checkpoint, load_from is unset.
# torchvision://resnet50 resolves without torchvision (gc_mm.compat); any
# local path or URL of a ResNet-50 state dict works too. Longer schedule,
# since the heads start from scratch.
_base_ = './mask_rcnn_r50_gc_balloon.py'

model = dict(
    backbone=dict(
        init_cfg=dict(type='Pretrained', checkpoint='torchvision://resnet50')))
load_from = None
max_epochs = 24
train_cfg = dict(max_epochs=max_epochs, val_interval=8)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0,
         end=100),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True,
         milestones=[16, 22], gamma=0.1)
]
optim_wrapper = dict(optimizer=dict(lr=0.005))
