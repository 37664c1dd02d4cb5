"""GCOptimWrapperConstructor: paramwise_cfg as mmengine's, plus GC per layer."""
import io
import logging

import numpy as np
import pytest
import torch
import torch.nn as nn
from mmengine.logging import MMLogger
from mmengine.optim import build_optim_wrapper

import gc_mm  # noqa: F401
from reference import project


class Detector(nn.Module):
    """Names like a detector's: backbone, neck, rpn_head, roi_head; float64
    so that a centralized update is recognisable to rounding."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        torch.set_default_dtype(torch.float64)
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.neck = nn.Conv2d(4, 4, 1)
        self.rpn_head = nn.Conv2d(4, 2, 1)
        self.roi_head = nn.Linear(4, 3)
        self.scalar_head = nn.Linear(1, 3)  # rows of length 1
        torch.set_default_dtype(torch.float32)

    def forward(self, x):
        y = self.rpn_head(self.neck(self.backbone(x))).mean((2, 3))
        z = self.roi_head(self.neck(self.backbone(x)).mean((2, 3)))
        return (y.pow(2).sum() + z.pow(2).sum() +
                self.scalar_head(z[:, :1]).pow(2).sum())


def build(optimizer, gc=None, wrapper='OptimWrapper', **paramwise):
    if gc is not None:
        paramwise['gc'] = gc
    return build_optim_wrapper(
        Detector(),
        dict(type=wrapper, constructor='GCOptimWrapperConstructor',
             optimizer=optimizer, paramwise_cfg=paramwise))


def centralized_after_step(optim_wrapper, model):
    """Which parameters moved by a centralized (row-mean-free) update."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(1)
    model(torch.randn(2, 3, 8, 8, dtype=torch.float64) * 3).backward()
    optim_wrapper.step()
    result = {}
    for name, param in model.named_parameters():
        delta = (param.detach() - before[name]).double().numpy()
        if delta.ndim > 1 and np.abs(delta).max() > 0:
            row_means = delta - project(delta, 'conv_fc')
            result[name] = bool(
                np.abs(row_means).max() < 1e-9 * np.abs(delta).max())
    return result


def test_include_exclude_and_mode_with_gc_optimizer():
    model = Detector()
    wrapper = build_optim_wrapper(
        model,
        dict(constructor='GCOptimWrapperConstructor',
             optimizer=dict(type='SGD_GC', lr=0.1, weight_decay=0.1),
             paramwise_cfg=dict(
                 norm_decay_mult=0.,
                 gc=dict(include=['backbone', 'neck', 'head'],
                         exclude=['rpn_head']))))
    # Groups with the same settings are merged, and the decay rules stay.
    groups = wrapper.optimizer.param_groups
    assert len(groups) < len(list(model.parameters()))
    bn = model.backbone[1].weight
    assert [g['weight_decay'] for g in groups if any(
        p is bn for p in g['params'])] == [0.]
    scalar_before = model.scalar_head.weight.detach().clone()
    moved = centralized_after_step(wrapper, model)
    # scalar_head.weight has rows of length 1: GC freezes it, so it is not
    # among the parameters that moved.
    assert moved == {
        'backbone.0.weight': True,
        'neck.weight': True,
        'rpn_head.weight': False,
        'roi_head.weight': True,
    }
    assert torch.equal(model.scalar_head.weight, scalar_before)


def test_conv_only_mode_with_wrapper_around_torch_sgd():
    model = Detector()
    wrapper = build_optim_wrapper(
        model,
        dict(type='GCOptimWrapper', constructor='GCOptimWrapperConstructor',
             optimizer=dict(type='SGD', lr=0.1),
             paramwise_cfg=dict(gc=dict(mode='conv',
                                        exclude=['scalar_head']))))
    moved = centralized_after_step(wrapper, model)
    assert moved == {
        'backbone.0.weight': True,
        'neck.weight': True,
        'rpn_head.weight': True,
        'roi_head.weight': False,
        'scalar_head.weight': False,
    }


def test_custom_keys_and_lr_mult_still_work():
    wrapper = build(
        dict(type='SGD_GC', lr=0.1, weight_decay=1e-4),
        gc=dict(exclude=['roi_head']),
        custom_keys={'backbone': dict(lr_mult=0.1)})
    lrs = sorted({round(g['lr'], 6) for g in wrapper.optimizer.param_groups})
    assert lrs == [0.01, 0.1]


@pytest.fixture
def log():
    """What mmengine's current logger prints during the test."""
    logger = MMLogger.get_current_instance()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    yield stream
    logger.removeHandler(handler)


def test_logs_counts_and_warns_about_rows_of_length_one(log):
    build(dict(type='SGD_GC', lr=0.1))
    text = log.getvalue()
    n_all = sum(p.numel() for p in Detector().parameters())
    # conv 3x3 (108) + neck (16) + rpn (8) + roi fc (12) + scalar fc (3).
    assert (f'on 5 of 12 trained parameter tensors (147 of {n_all} trained '
            'parameters)') in text
    assert 'scalar_head.weight' in text and 'will not train' in text


def test_log_counts_only_the_tensors_that_train(log):
    """Frozen weights (requires_grad=False) are neither trained nor
    centralized; without paramwise_cfg they still reach the optimizer."""
    model = Detector()
    # 4 tensors (120 of the 171 parameters): conv 3x3 (108 + 4), BN (4 + 4).
    model.backbone.requires_grad_(False)
    build_optim_wrapper(
        model,
        dict(constructor='GCOptimWrapperConstructor',
             optimizer=dict(type='SGD_GC', lr=0.1)))
    # GC: neck (16), rpn_head (8), roi_head (12), scalar_head (3).
    assert ('on 4 of 8 trained parameter tensors (39 of 51 trained '
            'parameters; 4 frozen tensors not counted)' in log.getvalue())


def test_log_counts_trained_tensors_of_a_resnet_with_frozen_stages(log):
    from mmdet.models.backbones import ResNet
    backbone = ResNet(depth=18, frozen_stages=1)
    build_optim_wrapper(
        backbone,
        dict(constructor='GCOptimWrapperConstructor',
             optimizer=dict(type='SGD_GC', lr=0.1)))
    # ResNet-18 has 20 conv weights and 20 BN layers (60 tensors); the stem
    # and stage 1 hold 5 convs and 5 BNs (15 tensors), frozen.
    assert ('on 15 of 45 trained parameter tensors' in log.getvalue()
            and '15 frozen tensors not counted' in log.getvalue())


def test_warns_when_nothing_applies_gc(log):
    build(dict(type='SGD', lr=0.1), gc=dict(include=['backbone']))
    assert 'paramwise_cfg.gc has no effect' in log.getvalue()


@pytest.mark.parametrize('gc,match', [
    (dict(mode='fc'), 'paramwise_cfg.gc.mode'),
    (dict(inlcude=['backbone']), 'unknown keys'),
    (dict(include=['(']), 'regular expressions'),
    ('backbone', 'must be a dict'),
])
def test_bad_gc_cfg(gc, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build(dict(type='SGD_GC', lr=0.1), gc=gc)


# Every wrapper/optimizer pairing: the constructor's per-layer choice holds
# whichever of them applies GC. (wrapper cfg, whether the wrapper's GC is on)
WRAPPERS = {
    'OptimWrapper': (dict(type='OptimWrapper'), False),
    'GCOptimWrapper': (dict(type='GCOptimWrapper'), True),
    'GCOptimWrapper(gc_mode=None)': (dict(type='GCOptimWrapper',
                                          gc_mode=None), False),
    'AmpGCOptimWrapper': (dict(type='AmpGCOptimWrapper'), True),
}
# (optimizer cfg, whether its GC is on, the torch optimizer that gives the
# same numbers when fed the centralized gradients)
OPTIMIZERS = {
    'SGD': (dict(type='SGD', lr=0.1), False, dict(type='SGD', lr=0.1)),
    'AdamW': (dict(type='AdamW', lr=0.01, weight_decay=0.1), False,
              dict(type='AdamW', lr=0.01, weight_decay=0.1)),
    'SGD_GC': (dict(type='SGD_GC', lr=0.1), True, dict(type='SGD', lr=0.1)),
    'SGD_GC(gc_mode=None)': (dict(type='SGD_GC', lr=0.1, gc_mode=None),
                             False, dict(type='SGD', lr=0.1)),
}
INCLUDED = {  # the tensors paramwise_cfg.gc below includes, per mode
    'conv_fc': {'backbone.0.weight', 'neck.weight', 'roi_head.weight'},
    'conv': {'backbone.0.weight', 'neck.weight'},
}


def expected_weights(model_input, torch_optimizer, centralized, mode):
    """Float64 reference: the torch optimizer fed the raw gradients, with
    exactly the ``centralized`` tensors projected."""
    model = Detector()
    model(model_input).backward()
    for name, param in model.named_parameters():
        if name in centralized:
            param.grad.copy_(torch.from_numpy(
                project(param.grad.numpy(), mode)))
    optimizer = build_optim_wrapper(model, dict(optimizer=torch_optimizer))
    optimizer.step()
    return {n: p.detach().numpy() for n, p in model.named_parameters()}


@pytest.mark.parametrize('mode', [None, 'conv'])
@pytest.mark.parametrize('optimizer', list(OPTIMIZERS))
@pytest.mark.parametrize('wrapper', list(WRAPPERS))
def test_per_layer_choice_holds_for_every_pairing(wrapper, optimizer, mode,
                                                  log):
    wrapper_cfg, wrapper_gc = WRAPPERS[wrapper]
    optimizer_cfg, optimizer_gc, torch_optimizer = OPTIMIZERS[optimizer]
    gc = dict(include=['backbone', 'neck', 'head'],
              exclude=['rpn_head', 'scalar_head'])
    if mode is not None:
        gc['mode'] = mode
    cfg = dict(wrapper_cfg, constructor='GCOptimWrapperConstructor',
               optimizer=optimizer_cfg, paramwise_cfg=dict(gc=gc))
    model = Detector()
    if wrapper_gc and optimizer_gc:
        with pytest.raises(ValueError, match='centralize twice'):
            build_optim_wrapper(model, cfg)
        return
    optim_wrapper = build_optim_wrapper(model, cfg)
    applied = wrapper_gc or optimizer_gc
    assert ('paramwise_cfg.gc has no effect' in log.getvalue()) != applied
    mode = mode or 'conv_fc'  # the wrapper's and SGD_GC's default
    centralized = INCLUDED[mode] if applied else set()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64) * 3
    optim_wrapper.update_params(model(x))
    want = expected_weights(x, torch_optimizer, centralized, mode)
    for name, param in model.named_parameters():
        np.testing.assert_allclose(param.detach().numpy(), want[name],
                                   rtol=1e-12, atol=1e-12, err_msg=name)


def mask_head():
    """mmdet's FCNMaskHead (Mask R-CNN's), small; float64 so that the update
    shows the centralized gradient to rounding."""
    from mmdet.models.roi_heads.mask_heads import FCNMaskHead
    torch.manual_seed(0)
    head = FCNMaskHead(num_convs=1, roi_feat_size=8, in_channels=4,
                       conv_out_channels=6, num_classes=3).double()
    assert isinstance(head.upsample, nn.ConvTranspose2d)  # 'deconv'
    return head


def mask_loss(head):
    torch.manual_seed(1)
    rois = torch.randn(5, 4, 8, 8, dtype=torch.float64)
    targets = (torch.rand(5, 16, 16) > 0.5).double()
    labels = torch.tensor([0, 1, 2, 1, 0])
    return head.loss_mask(head(rois), targets, labels)


@pytest.mark.parametrize('rule', ['default', 'input', 'output', None])
def test_transposed_conv_rule_on_mmdet_mask_head(rule):
    head = mask_head()
    gc = {} if rule == 'default' else dict(transposed_conv=rule)
    wrapper = build_optim_wrapper(
        head,
        dict(type='GCOptimWrapper', constructor='GCOptimWrapperConstructor',
             optimizer=dict(type='SGD', lr=0.1), paramwise_cfg=dict(gc=gc)))
    weights = {'deconv': head.upsample.weight,
               'conv': head.convs[0].conv.weight}
    before = {k: w.detach().clone() for k, w in weights.items()}
    mask_loss(head).backward()
    raw = {k: w.grad.clone() for k, w in weights.items()}
    wrapper.step()
    # With plain SGD the update is -lr times the gradient after GC.
    applied = {k: (before[k] - w.detach()) / 0.1 for k, w in weights.items()}
    # The deconv weight is (in=6, out=6, 2, 2): dims 0 and 1 differ in role.
    grad = raw['deconv']
    want = {
        'default': grad - grad.mean(dim=(1, 2, 3), keepdim=True),
        'input': grad - grad.mean(dim=(1, 2, 3), keepdim=True),
        'output': grad - grad.mean(dim=(0, 2, 3), keepdim=True),
        None: grad,
    }[rule]
    torch.testing.assert_close(applied['deconv'], want, rtol=1e-9, atol=1e-12)
    if rule == 'output':
        assert applied['deconv'].mean(dim=(0, 2, 3)).abs().max() < 1e-15
        assert applied['deconv'].mean(dim=(1, 2, 3)).abs().max() > 1e-6
    # Regular convs keep one row per output channel, whatever the rule.
    conv = raw['conv']
    torch.testing.assert_close(applied['conv'],
                               conv - conv.mean(dim=(1, 2, 3), keepdim=True),
                               rtol=1e-9, atol=1e-12)


def test_transposed_conv_output_rule_with_groups():
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose2d(4, 6, 3, groups=2,
                                             dtype=torch.float64))
    wrapper = build_optim_wrapper(
        model,
        dict(type='GCOptimWrapper', constructor='GCOptimWrapperConstructor',
             optimizer=dict(type='SGD', lr=0.1),
             paramwise_cfg=dict(gc=dict(transposed_conv='output'))))
    weight_group = next(g for g in wrapper.optimizer.param_groups
                        if g['params'][0] is model[0].weight)
    assert (weight_group['gc_out_dim'], weight_group['gc_groups']) == (1, 2)
    before = model[0].weight.detach().clone()
    model(torch.randn(2, 4, 5, 5, dtype=torch.float64)).pow(2).sum().backward()
    grad = model[0].weight.grad.clone()
    wrapper.step()
    applied = (before - model[0].weight.detach()) / 0.1
    # (in=4, out/groups=3, 3, 3) as (groups, in/groups, out/groups, 3, 3):
    # output channel o of group j is [j, :, o].
    blocks = grad.unflatten(0, (2, 2))
    want = blocks - blocks.mean(dim=(1, 3, 4), keepdim=True)
    torch.testing.assert_close(applied, want.flatten(0, 1), rtol=1e-9,
                               atol=1e-12)


def test_transposed_conv_skipped_by_a_gc_optimizer():
    head = mask_head()
    wrapper = build_optim_wrapper(
        head,
        dict(constructor='GCOptimWrapperConstructor',
             optimizer=dict(type='SGD_GC', lr=0.1),
             paramwise_cfg=dict(gc=dict(transposed_conv=None))))
    before = head.upsample.weight.detach().clone()
    mask_loss(head).backward()
    grad = head.upsample.weight.grad.clone()
    wrapper.step()
    torch.testing.assert_close(before - head.upsample.weight.detach(),
                               0.1 * grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize('rule', ['Output', 'none'])
def test_bad_transposed_conv_rule(rule):
    with pytest.raises(ValueError, match='paramwise_cfg.gc.transposed_conv'):
        build_optim_wrapper(
            mask_head(),
            dict(constructor='GCOptimWrapperConstructor',
                 optimizer=dict(type='SGD_GC', lr=0.1),
                 paramwise_cfg=dict(gc=dict(transposed_conv=rule))))


def _step_mask_head(optim_wrapper_cfg, rule):
    """One step of a fresh mask head under ``optim_wrapper_cfg``; its
    parameters after the step."""
    head = mask_head()
    wrapper = build_optim_wrapper(
        head,
        dict(optim_wrapper_cfg, constructor='GCOptimWrapperConstructor',
             paramwise_cfg=dict(gc=dict(transposed_conv=rule))))
    mask_loss(head).backward()
    wrapper.step()
    return {name: p.detach().clone() for name, p in head.named_parameters()}


# GC of the gradient: the optimizer's GC equals the same optimizer without
# GC behind GCOptimWrapper (weight decay 0, so GC sees the gradient alone).
@pytest.mark.parametrize('optimizer', [
    dict(type='SGD_GC', lr=0.1, momentum=0.9),
    dict(type='SGD_GC', lr=0.1, momentum=0.9, foreach=True),
    dict(type='SGD_GC', lr=0.1, momentum=0.9, fused=False),
    dict(type='SGD_GC', lr=0.1, momentum=0.9, fused=True),
    dict(type='Adam_GC', lr=0.1),
    dict(type='AdamW_GC', lr=0.1),
    dict(type='Adagrad_GC', lr=0.1),
], ids=lambda cfg: '-'.join(f'{k}={v}' for k, v in cfg.items()))
@pytest.mark.parametrize('rule', ['output', 'input'])
def test_gc_optimizers_apply_the_transposed_conv_rule(optimizer, rule):
    by_optimizer = _step_mask_head(dict(optimizer=optimizer), rule)
    by_wrapper = _step_mask_head(
        dict(type='GCOptimWrapper', optimizer=dict(optimizer, gc_mode=None)),
        rule)
    for name, weight in by_optimizer.items():
        torch.testing.assert_close(weight, by_wrapper[name], rtol=1e-9,
                                   atol=1e-12, msg=name)
    other = _step_mask_head(dict(optimizer=optimizer),
                            'input' if rule == 'output' else 'output')
    assert not torch.allclose(by_optimizer['upsample.weight'],
                              other['upsample.weight'])


@pytest.mark.parametrize('name', ['Adam_GC2', 'AdamW_GC2'])
def test_update_centralizing_optimizers_apply_the_output_rule(name):
    # The "2" variants centralize the update: each output channel's weights
    # keep their mean.
    before = mask_head().upsample.weight.detach()
    after = _step_mask_head(dict(optimizer=dict(type=name, lr=0.1,
                                                weight_decay=0.1)),
                            'output')['upsample.weight']
    delta = after - before
    assert delta.abs().max() > 1e-3
    torch.testing.assert_close(delta.mean(dim=(0, 2, 3)),
                               torch.zeros(delta.shape[1],
                                           dtype=delta.dtype),
                               rtol=0, atol=1e-12)


# Lookahead and Ranger around the optimizer that updates, and that optimizer
# alone (Ranger: RAdam_GC with Ranger's defaults).
RANGER_DEFAULTS = dict(lr=1e-3, betas=(0.95, 0.999), eps=1e-5,
                       weight_decay=0., decoupled_weight_decay=True)
WRAPPED_AND_ALONE = {
    'Lookahead(SGD_GC)': (
        dict(type='Lookahead', k=3,
             optimizer=dict(type='SGD_GC', lr=0.1, momentum=0.9,
                            weight_decay=1e-4)),
        dict(type='SGD_GC', lr=0.1, momentum=0.9, weight_decay=1e-4)),
    'Lookahead(AdamW)': (
        dict(type='Lookahead',
             optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.05)),
        dict(type='AdamW', lr=1e-3, weight_decay=0.05)),
    'Lookahead(Adam_GC)-defaults': (
        dict(type='Lookahead', optimizer=dict(type='Adam_GC')),
        dict(type='Adam_GC')),
    'Ranger-defaults': (dict(type='Ranger'),
                        dict(type='RAdam_GC', **RANGER_DEFAULTS)),
    'Ranger': (dict(type='Ranger', lr=0.01, weight_decay=0.1),
               dict(type='RAdam_GC', **dict(RANGER_DEFAULTS, lr=0.01,
                                            weight_decay=0.1))),
}


def groups_of(optim_wrapper, model):
    names = {id(p): n for n, p in model.named_parameters()}
    return [{k: ([names[id(p)] for p in v] if k == 'params' else v)
             for k, v in group.items()}
            for group in optim_wrapper.optimizer.param_groups]


@pytest.mark.parametrize('name', list(WRAPPED_AND_ALONE))
def test_lookahead_and_ranger_take_paramwise_cfg_as_their_inner_optimizer(
        name):
    """lr and decay multipliers (custom_keys, norm_decay_mult,
    bias_decay_mult) give Lookahead/Ranger the param groups the optimizer
    that updates gets alone (they failed: MMEngine's constructor looked for
    lr and weight_decay in the outer config)."""
    wrapped, alone = WRAPPED_AND_ALONE[name]
    paramwise = dict(custom_keys={'backbone': dict(lr_mult=0.1,
                                                   decay_mult=0.5)},
                     norm_decay_mult=0., bias_decay_mult=0.,
                     gc=dict(exclude=['roi_head']))
    got, want = [], []
    for cfg, groups in ((wrapped, got), (alone, want)):
        model = Detector()
        optim_wrapper = build_optim_wrapper(
            model, dict(constructor='GCOptimWrapperConstructor',
                        optimizer=cfg, paramwise_cfg=paramwise))
        groups.extend(groups_of(optim_wrapper, model))
    assert got == want
    lrs = {group['lr'] for group in got}
    base_lr = wrapped.get('lr', wrapped.get('optimizer', {}).get('lr', 1e-3))
    assert lrs == {base_lr, base_lr * 0.1}


@pytest.mark.parametrize('name', ['Lookahead(SGD_GC)', 'Ranger-defaults'])
def test_default_constructor_with_their_multipliers_is_refused_before_run(
        name):
    """MMEngine's default constructor would fail (lr) or drop the decay
    multipliers: tools/train.py's pre-run check names the constructor that
    takes them; with it (or without multipliers) the check passes."""
    pytest.importorskip('mmdet')
    from mmengine.config import Config

    from gc_mm.checks import ConfigError, check_optim_wrapper
    wrapped, _ = WRAPPED_AND_ALONE[name]
    paramwise = dict(norm_decay_mult=0., custom_keys={'backbone': {}})
    cfg = Config(dict(optim_wrapper=dict(optimizer=wrapped,
                                         paramwise_cfg=paramwise)))
    with pytest.raises(ConfigError, match='GCOptimWrapperConstructor'):
        check_optim_wrapper(cfg)
    cfg.optim_wrapper.constructor = 'GCOptimWrapperConstructor'
    check_optim_wrapper(cfg)
    check_optim_wrapper(Config(dict(optim_wrapper=dict(optimizer=wrapped))))
