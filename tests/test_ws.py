"""GC and Weight Standardization: the raw-weight gradient of mmcv's ConvWS2d
has zero row means already, so GC of it changes nothing and SGD_GC differs
from SGD on a WS model only through the weight-decay term; the constructor
skips WS layers with ``paramwise_cfg.gc.exclude_types``."""
import os.path as osp

import pytest
import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper

import gc_mm  # noqa: F401
from conftest import REPO
from gc_mm import SGD_GC, centralize_

pytest.importorskip('mmdet')  # see conftest.py
from mmcv.cnn import ConvAWS2d, ConvWS2d  # noqa: E402

LR, MOMENTUM, WD = 0.05, 0.9, 0.01


def row_means(tensor):
    return tensor.reshape(tensor.shape[0], -1).mean(dim=1)


def ws_loss(conv, dtype, seed=0):
    """A loss whose gradient has large row means for a plain conv."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(4, conv.in_channels, 9, 9, generator=generator,
                    dtype=dtype)
    target = torch.randn(4, conv.out_channels, 7, 7, generator=generator,
                         dtype=dtype)
    return ((conv(x) - target - 2)**2).mean()


@pytest.mark.parametrize('dtype,tol', [(torch.float64, 1e-14),
                                       (torch.float32, 1e-6)])
@pytest.mark.parametrize('layer', [ConvWS2d, ConvAWS2d])
def test_gc_of_the_raw_weight_gradient_is_a_no_op(dtype, tol, layer):
    torch.manual_seed(0)
    conv = layer(6, 5, 3).to(dtype)
    plain = nn.Conv2d(6, 5, 3).to(dtype)
    plain.load_state_dict(conv.state_dict(), strict=False)
    for module in (conv, plain):
        ws_loss(module, dtype).backward()
    grad = conv.weight.grad
    scale = grad.reshape(5, -1).norm(dim=1)
    # Each row's mean, relative to the row's norm: zero to float precision.
    assert (row_means(grad).abs() / scale).max() < tol
    centralized = grad.clone()
    centralize_([centralized])
    assert ((centralized - grad).abs().amax(dim=(1, 2, 3)) / scale).max() < tol
    # The same loss on a plain conv: rows far from zero-mean (the test can
    # tell a centralized gradient from one that is not).
    plain_grad = plain.weight.grad
    assert (row_means(plain_grad).abs() /
            plain_grad.reshape(5, -1).norm(dim=1)).min() > 1e-3


class WSNet(nn.Module):
    """Every weight with ndim > 1 weight-standardized (as the GN+WS
    configs' convs), GroupNorm between; float64."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = ConvWS2d(3, 8, 3).double()
        self.norm = nn.GroupNorm(2, 8).double()
        self.conv2 = ConvWS2d(8, 4, 3).double()

    def forward(self, x):
        return self.conv2(torch.relu(self.norm(self.conv1(x))))


def batches(steps=5):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(2, 3, 9, 9, generator=generator, dtype=torch.float64),
             torch.randn(2, 4, 5, 5, generator=generator, dtype=torch.float64))
            for _ in range(steps)]


def train(optimizer_cls, **kwargs):
    model = WSNet()
    optimizer = optimizer_cls(model.parameters(), lr=LR, momentum=MOMENTUM,
                              **kwargs)
    for x, target in batches():
        optimizer.zero_grad()
        ((model(x) - target + 1)**2).mean().backward()
        optimizer.step()
    return {n: p.detach() for n, p in model.named_parameters()}


def reference(weight_decay):
    """SGD with momentum by hand, float64, in which the decay term of a
    weight is centralized, ``d = g + wd * P(w)``, and the gradient is not
    (``g`` of a WS weight has zero row means)."""
    model = WSNet()
    buffers = {}
    for x, target in batches():
        model.zero_grad()
        ((model(x) - target + 1)**2).mean().backward()
        with torch.no_grad():
            for name, p in model.named_parameters():
                decay = p.clone()
                if p.ndim > 1:
                    decay -= p.mean(dim=(1, 2, 3), keepdim=True)
                d = p.grad + weight_decay * decay
                buffers[name] = (d if name not in buffers else
                                 MOMENTUM * buffers[name] + d)
                p -= LR * buffers[name]
    return {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize('path', [{}, dict(fused=False, foreach=False)])
def test_sgd_gc_on_a_ws_model_is_sgd_but_for_the_decay(path):
    # Without weight decay, GC changes nothing: SGD_GC ends where SGD does.
    gc, plain = train(SGD_GC, weight_decay=0, **path), train(
        torch.optim.SGD, weight_decay=0)
    for name in gc:
        torch.testing.assert_close(gc[name], plain[name], rtol=0, atol=1e-13)
    # With it, GC removes the row means of wd * w from the update, and that
    # is all it changes: SGD_GC ends at the reference that centralizes only
    # the decay term, and away from torch's SGD.
    gc = train(SGD_GC, weight_decay=WD, **path)
    plain = train(torch.optim.SGD, weight_decay=WD)
    want = reference(WD)
    for name in gc:
        torch.testing.assert_close(gc[name], want[name], rtol=0, atol=1e-13)
    differs = (gc['conv1.weight'] - plain['conv1.weight']).abs().max()
    assert differs > 1e-6


# ---------------------------------------------------------------------------
# paramwise_cfg.gc.exclude_types


class ConvWSChild(ConvWS2d):
    pass


class Mixed(nn.Module):

    def __init__(self):
        super().__init__()
        self.ws = ConvWS2d(3, 4, 3)
        self.ws_child = ConvWSChild(4, 4, 1)
        self.conv = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 2)


def gc_modes(model, **gc):
    wrapper = build_optim_wrapper(model, dict(
        constructor='GCOptimWrapperConstructor',
        optimizer=dict(type='SGD_GC', lr=0.1, momentum=0.9),
        paramwise_cfg=dict(gc=gc)))
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: group['gc_mode']
            for group in wrapper.optimizer.param_groups
            for p in group['params']}


@pytest.mark.parametrize('types', [['ConvWS'], ['ConvWS2d'], [ConvWS2d],
                                   'ConvWS'])
def test_exclude_types_skips_ws_layers_and_their_subclasses(types):
    modes = gc_modes(Mixed(), exclude_types=types)
    assert modes['ws.weight'] is None and modes['ws_child.weight'] is None
    assert modes['conv.weight'] == modes['fc.weight'] == 'conv_fc'
    assert gc_modes(Mixed())['ws.weight'] == 'conv_fc'


@pytest.mark.parametrize('types,match', [
    (['ConvAWS'], "the model has no module of type 'ConvAWS'"),
    (['ConvWs'], "no module of type 'ConvWs'"),
    ([3], 'exclude_types must be a list of module classes or class names'),
])
def test_bad_exclude_types(types, match):
    with pytest.raises(ValueError, match=match):
        gc_modes(Mixed(), exclude_types=types)


def test_gn_ws_config_skips_exactly_its_ws_convs():
    """The GN+WS GC twin with exclude_types=['ConvWS']: every ConvWS2d
    weight of the model is left out, every other conv and fc keeps GC."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules()
    cfg = Config.fromfile(osp.join(REPO, 'configs/mask_rcnn_r50_gn_ws_gc.py'))
    cfg.model.backbone.init_cfg = None
    model = MODELS.build(cfg.model)
    modes = gc_modes(model, exclude_types=['ConvWS'])
    ws = {f'{n}.weight' for n, m in model.named_modules()
          if isinstance(m, ConvWS2d)}
    assert len(ws) > 50  # backbone, neck, RPN, box and mask heads
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(trained) > 150  # frozen stem and stage 1 are not in groups
    for name, param in trained:
        if param.ndim > 1:
            assert (modes[name] is None) == (name in ws), name
