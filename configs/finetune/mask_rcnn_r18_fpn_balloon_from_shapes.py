# Fine-tune the demo's slim Mask R-CNN R18-FPN on the balloon photos (one
# class, 61 train / 13 val, COCO json; link it to data/balloon/ as README
# says), starting from a detector trained on the shapes demo: no download,
# and small enough for a CPU (images resized to 256x192). The experiment of
# docs/experiments.md: load_from is a checkpoint of the demo baseline, e.g.
#   --cfg-options load_from=work_dirs/mask_rcnn_r18_fpn_shapes/epoch_20.pth
# The box and mask heads change to one class, so their last layers start
# fresh (MMEngine warns about the shape mismatch and skips them).
# Its GC twin is mask_rcnn_r18_fpn_gc_balloon_from_shapes.py.
_base_ = '../demo/mask_rcnn_r18_fpn_shapes.py'

model = dict(
    roi_head=dict(
        bbox_head=dict(num_classes=1), mask_head=dict(num_classes=1)))

dataset_type = 'CocoDataset'
data_root = 'data/balloon/'
metainfo = dict(classes=('balloon', ), palette=[(220, 20, 60)])
image_scale = (256, 192)
backend_args = None
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=image_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='Resize', scale=image_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(
        type='PackDetInputs',
        meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                   'scale_factor'))
]
train_dataloader = dict(
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        metainfo=metainfo,
        ann_file='train/annotation_coco.json',
        data_prefix=dict(img='train/'),
        pipeline=train_pipeline))
val_dataloader = dict(
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        metainfo=metainfo,
        ann_file='val/annotation_coco.json',
        data_prefix=dict(img='val/'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'val/annotation_coco.json')
test_evaluator = val_evaluator

# 12 epochs of 16 iterations (batch 4), validated every 3 epochs.
max_epochs = 12
train_cfg = dict(max_epochs=max_epochs, val_interval=3)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0,
         end=50),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True,
         milestones=[9, 11], gamma=0.1)
]
default_hooks = dict(
    logger=dict(interval=4), checkpoint=dict(interval=max_epochs))
custom_hooks = [dict(type='GradStatsHook', interval=16)]
