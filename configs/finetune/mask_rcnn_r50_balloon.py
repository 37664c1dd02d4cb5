# Fine-tune Mask R-CNN R50-FPN on the balloon dataset (one class, 61 train /
# 13 val photos, COCO json; see README for where to get it and how to link
# it to data/balloon/). It starts from a COCO-trained Mask R-CNN through
# load_from: set it to a local path or URL, e.g.
#   --cfg-options load_from=checkpoints/mask_rcnn_r50_fpn_1x_coco.pth
# The box and mask heads change to one class, so their last layers start
# fresh (MMEngine warns about the shape mismatch and skips them).
# Its GC twin is mask_rcnn_r50_gc_balloon.py.
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'

custom_imports = dict(imports=['gc_mm'], allow_failed_imports=False)

model = dict(
    roi_head=dict(
        bbox_head=dict(num_classes=1), mask_head=dict(num_classes=1)))

data_root = 'data/balloon/'
metainfo = dict(classes=('balloon', ), palette=[(220, 20, 60)])
train_dataloader = dict(
    batch_size=2,
    num_workers=2,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file='train/annotation_coco.json',
        data_prefix=dict(img='train/')))
val_dataloader = dict(
    batch_size=1,
    num_workers=2,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file='val/annotation_coco.json',
        data_prefix=dict(img='val/')))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'val/annotation_coco.json')
test_evaluator = val_evaluator

# A short schedule: the COCO weights do most of the work. lr is for a batch
# of 2 (one GPU); --auto-scale-lr scales it for more.
max_epochs = 12
train_cfg = dict(max_epochs=max_epochs, val_interval=4)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0,
         end=100),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True,
         milestones=[8, 11], gamma=0.1)
]
optim_wrapper = dict(optimizer=dict(lr=0.0025))
default_hooks = dict(logger=dict(interval=10))
auto_scale_lr = dict(base_batch_size=2)

# Where the COCO-trained weights come from: the MMDetection model zoo's
# Mask R-CNN R50-FPN 1x (box/mask AP 38.2/34.7), or any path.
load_from = 'https://download.openmmlab.com/mmdetection/v2.0/mask_rcnn/mask_rcnn_r50_fpn_1x_coco/mask_rcnn_r50_fpn_1x_coco_20200205-d4b0c5d6.pth'  # noqa
