# RIFLE twin of mask_rcnn_r18_fpn_gc_balloon_from_shapes.py: identical except
# RIFLEHook, which re-initializes the box head's fc_cls and fc_reg and the
# mask head's conv_logits (as the model's init makes them, their optimizer
# state dropped) twice, at epochs 4 and 8 of the 12 (every 12 / (2 + 1)
# epochs, as the official RIFLE code spaces them): the last re-init comes
# before the lr step at epoch 9, so the new layers train 4 epochs, one of
# them at the full lr.
_base_ = './mask_rcnn_r18_fpn_gc_balloon_from_shapes.py'

custom_hooks = [
    dict(type='GradStatsHook', interval=16),
    dict(type='RIFLEHook', num_reinits=2)
]
