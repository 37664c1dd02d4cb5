# Demo baseline: Mask R-CNN R18-FPN trained from scratch on the generated
# shapes dataset (4 classes, 128 train / 32 val images of 160x128, no
# download), sized to train on a 2-core CPU in minutes: a slim FPN (64 channels), 100 proposals and 64
# sampled RoIs per image, a 2-conv mask head. The data is written to
# data/shapes/ on first use. Its GC twin is mask_rcnn_r18_fpn_gc_shapes.py.
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'

custom_imports = dict(
    imports=['gc_mm', 'gc_mm.datasets'], allow_failed_imports=False)

num_classes = 4
channels = 64
model = dict(
    backbone=dict(
        depth=18,
        frozen_stages=-1,
        norm_eval=False,
        init_cfg=None),
    neck=dict(in_channels=[64, 128, 256, 512], out_channels=channels),
    rpn_head=dict(in_channels=channels, feat_channels=channels),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=channels),
        bbox_head=dict(
            in_channels=channels,
            fc_out_channels=256,
            num_classes=num_classes),
        mask_roi_extractor=dict(out_channels=channels),
        mask_head=dict(
            num_convs=2,
            in_channels=channels,
            conv_out_channels=channels,
            num_classes=num_classes)),
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=500, max_per_img=100),
        rcnn=dict(sampler=dict(num=64))),
    test_cfg=dict(
        rpn=dict(nms_pre=500, max_per_img=100),
        rcnn=dict(max_per_img=20)))

dataset_type = 'ShapesDataset'
data_root = 'data/shapes/'
image_scale = (160, 128)
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
    batch_size=4,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        ann_file='train/annotation_coco.json',
        data_prefix=dict(img='train/'),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=4,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        ann_file='val/annotation_coco.json',
        data_prefix=dict(img='val/'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'val/annotation_coco.json')
test_evaluator = val_evaluator

# The constructor logs how many tensors get GC (none in this baseline).
# lr 0.01 with a 100-iteration warm-up: at MMDetection's lr 0.02 (meant for
# batch 16) and a 50-iteration warm-up, one of five seeds of this baseline
# spiked in epoch 5 and ended with no detections (docs/experiments.md).
# Gradients clipped as several MMDetection configs do (FoveaBox, PISA,
# QDTrack: max_norm=35).
optim_wrapper = dict(
    constructor='GCOptimWrapperConstructor',
    optimizer=dict(lr=0.01),
    clip_grad=dict(max_norm=35, norm_type=2))

max_epochs = 20
train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0,
         end=100),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True,
         milestones=[16, 19], gamma=0.1)
]
# Validation draws the first image of each batch with MMDetection's
# visualizer (ground truth left, predictions scoring above 0.3 right) into
# <log dir>/vis_data/vis_image/; the demo validates once, after training.
# Drawing leaves the training's random streams as they were (gc_mm.compat
# gives mmdet's mask-colour jitter a generator of its own).
default_hooks = dict(
    logger=dict(interval=6),
    checkpoint=dict(interval=max_epochs),
    visualization=dict(
        type='DetVisualizationHook', draw=True, interval=1, score_thr=0.3))
# What GC removes from the gradients, every 50 iterations, in both twins
# (vis_data/scalars.json; tools/analysis/plot_runs.py draws it).
custom_hooks = [dict(type='GradStatsHook', interval=50)]
auto_scale_lr = dict(base_batch_size=4)
