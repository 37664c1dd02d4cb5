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
    assert f'on 5 of 12 parameter tensors (147 of {n_all} parameters)' in text
    assert 'scalar_head.weight' in text and 'will not train' in text


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
