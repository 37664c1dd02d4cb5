"""GCOptimWrapper and AmpGCOptimWrapper: GC once per real update, after
unscaling, in a defined order with clipping, built from config dicts."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from mmengine.optim import build_optim_wrapper

import gc_mm
from conftest import REPO, needs_cpu_amp
from gc_mm import AmpGCOptimWrapper, GCOptimWrapper
from reference import project


class TinyNet(nn.Module):

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def batch(seed):
    torch.manual_seed(seed)
    return torch.randn(2, 3, 6, 6)


def loss_of(model, x):
    return model(x).pow(2).sum() * 10


def raw_grads(model, xs, scale=1.0):
    """Gradients of the summed losses, computed without any wrapper."""
    probe = TinyNet()
    probe.load_state_dict(model.state_dict())
    for x in xs:
        (loss_of(probe, x) * scale).backward()
    return {n: p.grad.detach().double().numpy()
            for n, p in probe.named_parameters()}


def weights(model):
    return {n: p.detach().double().numpy().copy()
            for n, p in model.named_parameters()}


def test_wrapper_equals_sgd_gc_without_decay():
    plain, wrapped = TinyNet(), TinyNet()
    sgd_gc = build_optim_wrapper(
        plain, dict(optimizer=dict(type='SGD_GC', lr=0.1, momentum=0.9)))
    gc_wrapper = build_optim_wrapper(
        wrapped,
        dict(type='GCOptimWrapper',
             optimizer=dict(type='SGD', lr=0.1, momentum=0.9)))
    assert isinstance(gc_wrapper, GCOptimWrapper)
    for seed in range(3):
        for model, wrapper in ((plain, sgd_gc), (wrapped, gc_wrapper)):
            wrapper.update_params(loss_of(model, batch(seed)))
    for (name, a), b in zip(plain.named_parameters(), wrapped.parameters()):
        # Float32 rounding apart (the kernel fuses multiply-adds).
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_wrapper_gc_is_of_the_raw_gradient_before_torch_decay():
    """Around torch SGD, the decay is added after GC: w -= lr (P(g) + wd w)."""
    model = TinyNet()
    wrapper = build_optim_wrapper(
        model,
        dict(type='GCOptimWrapper',
             optimizer=dict(type='SGD', lr=0.1, weight_decay=0.5)))
    before, x = weights(model), batch(0)
    grads = raw_grads(model, [x])
    wrapper.update_params(loss_of(model, x))
    after = weights(model)
    for name in before:
        want = before[name] - 0.1 * (project(grads[name], 'conv_fc') +
                                     0.5 * before[name])
        np.testing.assert_allclose(after[name], want, rtol=1e-5, atol=1e-6)


def test_accumulation_centralizes_once_per_real_update(monkeypatch):
    calls = []
    real = gc_mm.optim_wrapper.centralize_

    def counting(tensors, **options):
        calls.append(len(tensors))
        real(tensors, **options)

    monkeypatch.setattr(gc_mm.optim_wrapper, 'centralize_', counting)
    model = TinyNet()
    wrapper = build_optim_wrapper(
        model,
        dict(type='GCOptimWrapper', accumulative_counts=2,
             optimizer=dict(type='SGD', lr=0.1)))
    wrapper.initialize_count_status(model, 0, 4)
    before, xs = weights(model), [batch(0), batch(1)]
    grads = raw_grads(model, xs, scale=0.5)  # mmengine averages the losses
    wrapper.update_params(loss_of(model, xs[0]))
    assert calls == []
    # Between micro-batches the gradient is the raw one, not centralized.
    conv_grad = model.conv.weight.grad.double().numpy()
    assert not np.allclose(project(conv_grad, 'conv_fc'), conv_grad)
    wrapper.update_params(loss_of(model, xs[1]))
    assert calls == [4]  # one call, over the group's 4 gradients
    after = weights(model)
    for name in before:
        np.testing.assert_allclose(
            after[name],
            before[name] - 0.1 * project(grads[name], 'conv_fc'),
            rtol=1e-5, atol=1e-6)


def _clip(grads, max_norm):
    norm = np.sqrt(sum((g**2).sum() for g in grads.values()))
    factor = min(1.0, max_norm / (norm + 1e-6))
    return {n: g * factor for n, g in grads.items()}


def _centralize(grads):
    return {n: project(g, 'conv_fc') for n, g in grads.items()}


def direction(grads, gc_order, max_norm):
    """The update direction of SGD without momentum, in float64."""
    if gc_order == 'clip_then_gc':
        return _centralize(_clip(grads, max_norm))
    return _clip(_centralize(grads), max_norm)


@pytest.mark.parametrize('gc_order', ['clip_then_gc', 'gc_then_clip'])
def test_clip_order(gc_order):
    model = TinyNet()
    wrapper = build_optim_wrapper(
        model,
        dict(type='GCOptimWrapper', gc_order=gc_order,
             clip_grad=dict(max_norm=0.5),
             optimizer=dict(type='SGD', lr=0.1)))
    before, x = weights(model), batch(0)
    grads = raw_grads(model, [x])
    wrapper.update_params(loss_of(model, x))
    want = direction(grads, gc_order, 0.5)
    after = weights(model)
    for name in before:
        np.testing.assert_allclose(after[name],
                                   before[name] - 0.1 * want[name],
                                   rtol=1e-5, atol=1e-6)
    # The two orders really differ here, so the test tells them apart.
    other_order = ({'clip_then_gc', 'gc_then_clip'} - {gc_order}).pop()
    other = direction(grads, other_order, 0.5)
    assert not np.allclose(want['conv.weight'], other['conv.weight'])


@needs_cpu_amp
@pytest.mark.parametrize('gc_order', ['clip_then_gc', 'gc_then_clip'])
def test_amp_wrapper_clips_and_centralizes_unscaled_gradients_on_cpu(
        gc_order):
    """Clipping tells scaled from unscaled gradients (GC alone cannot: it is
    linear): clipped before unscaling, the step would be 1024x too short."""
    model = TinyNet()
    wrapper = build_optim_wrapper(
        model,
        dict(type='AmpGCOptimWrapper', loss_scale=1024., gc_order=gc_order,
             clip_grad=dict(max_norm=0.5),
             optimizer=dict(type='SGD', lr=0.1)))
    assert isinstance(wrapper, AmpGCOptimWrapper)
    assert wrapper.loss_scaler.get_scale() == 1024.
    before, x = weights(model), batch(0)
    grads = raw_grads(model, [x])
    clipped = grads if gc_order == 'clip_then_gc' else _centralize(grads)
    clipped_norm = np.sqrt(sum((g**2).sum() for g in clipped.values()))
    assert clipped_norm > 5 * 0.5  # the clipping bites
    wrapper.update_params(loss_of(model, x))
    want = direction(grads, gc_order, 0.5)
    after = weights(model)
    for name in before:
        np.testing.assert_allclose(after[name],
                                   before[name] - 0.1 * want[name],
                                   rtol=1e-4, atol=1e-6)
    # The clipped norm mmengine logs is the unscaled one.
    logged = wrapper.message_hub.get_scalar('train/grad_norm').current()
    assert logged == pytest.approx(clipped_norm, rel=1e-4)


@needs_cpu_amp
def test_amp_wrapper_skips_non_finite_step_and_lowers_scale():
    model = TinyNet()
    wrapper = build_optim_wrapper(
        model,
        dict(type='AmpGCOptimWrapper',
             optimizer=dict(type='SGD', lr=0.1, momentum=0.9)))
    scale = wrapper.loss_scaler.get_scale()
    before = weights(model)
    wrapper.update_params(loss_of(model, batch(0)) * float('inf'))
    after = weights(model)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])
    assert wrapper.loss_scaler.get_scale() < scale


@needs_cpu_amp
def test_amp_wrapper_runs_autocast_on_cpu_in_bfloat16():
    model = TinyNet()
    wrapper = build_optim_wrapper(
        model,
        dict(type='AmpGCOptimWrapper', optimizer=dict(type='SGD', lr=0.1)))
    with wrapper.optim_context(model):
        out = model(batch(0))
    assert out.dtype == torch.bfloat16


AMP_WITHOUT_MMCV = """
import sys
sys.modules['mmcv'] = None  # import mmcv fails, as where it is not installed
import torch
from gc_mm import AmpGCOptimWrapper
w = torch.nn.Parameter(torch.ones(2, 3))
wrapper = AmpGCOptimWrapper(torch.optim.SGD([w], lr=1.0))
with wrapper.optim_context(None):
    loss = (w * torch.arange(6.).reshape(2, 3)).sum()
wrapper.update_params(loss)
print(w.tolist())
"""


@needs_cpu_amp
def test_amp_wrapper_runs_on_cpu_without_mmcv():
    """torch and mmengine alone (the GPU check's and a torch-only venv's
    stack): the CPU wrapper has no mmcv ops to run in float32, and steps."""
    path = os.pathsep.join([REPO, os.environ.get('PYTHONPATH', '')])
    proc = subprocess.run([sys.executable, '-c', AMP_WITHOUT_MMCV],
                          capture_output=True, text=True, timeout=300,
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 1 - lr * P(g): the gradient's rows [0 1 2] and [3 4 5], centralized.
    assert eval(proc.stdout.strip().splitlines()[-1]) == [[2., 1., 0.]] * 2


@pytest.mark.skipif(hasattr(torch.amp, 'GradScaler'),
                    reason='this torch has a loss scaler for the CPU')
def test_amp_wrapper_on_cpu_is_refused_without_a_cpu_loss_scaler():
    """torch < 2.3 has no GradScaler for the CPU: refused in one line when
    built (a step would go unscaled and unchecked), arguments checked
    first."""
    model = TinyNet()
    with pytest.raises(ValueError, match='gc_order'):
        build_optim_wrapper(model, dict(type='AmpGCOptimWrapper',
                                        gc_order='late',
                                        optimizer=dict(type='SGD', lr=0.1)))
    with pytest.raises(RuntimeError,
                       match=r'^AMP on cpu needs torch.amp.GradScaler'):
        build_optim_wrapper(model, dict(type='AmpGCOptimWrapper',
                                        optimizer=dict(type='SGD', lr=0.1)))


@needs_cpu_amp
def test_amp_wrapper_state_dict_round_trip():
    model = TinyNet()
    cfg = dict(type='AmpGCOptimWrapper', loss_scale=dict(init_scale=256.),
               optimizer=dict(type='SGD', lr=0.1, momentum=0.9))
    wrapper = build_optim_wrapper(model, cfg)
    wrapper.update_params(loss_of(model, batch(0)))
    state = wrapper.state_dict()
    assert 'loss_scaler' in state
    other = build_optim_wrapper(TinyNet(), cfg)
    other.load_state_dict(state)
    assert other.loss_scaler.get_scale() == wrapper.loss_scaler.get_scale()


@pytest.mark.parametrize('wrapper_type', [
    'GCOptimWrapper', pytest.param('AmpGCOptimWrapper', marks=needs_cpu_amp)])
def test_wrapper_refuses_double_gc(wrapper_type):
    with pytest.raises(ValueError, match='centralize twice'):
        build_optim_wrapper(
            TinyNet(),
            dict(type=wrapper_type, optimizer=dict(type='SGD_GC', lr=0.1)))
    # With the optimizer's GC off, the wrapper's GC is the only one.
    build_optim_wrapper(
        TinyNet(),
        dict(type=wrapper_type,
             optimizer=dict(type='SGD_GC', lr=0.1, gc_mode=None)))
    # With the wrapper's GC off, it is a plain (AMP) wrapper around SGD_GC.
    build_optim_wrapper(
        TinyNet(),
        dict(type=wrapper_type, gc_mode=None,
             optimizer=dict(type='SGD_GC', lr=0.1)))


@pytest.mark.parametrize('bad,match', [
    (dict(gc_mode='fc'), 'gc_mode'),
    (dict(gc_order='first'), 'gc_order'),
    (dict(loss_scale='static'), 'loss_scale'),
])
def test_wrapper_bad_arguments(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build_optim_wrapper(
            TinyNet(),
            dict(type='AmpGCOptimWrapper', optimizer=dict(type='SGD', lr=0.1),
                 **bad))


def closure_of(wrapper, model, x):
    def closure():
        wrapper.zero_grad()
        loss = loss_of(model, x)
        loss.backward()
        return loss
    return closure


def test_closure_gradients_are_clipped_and_centralized():
    """The optimizer steps with what the closure computes: those gradients
    are clipped and centralized, not the stale ones present before."""
    model = TinyNet()
    wrapper = build_optim_wrapper(
        model,
        dict(type='GCOptimWrapper', clip_grad=dict(max_norm=0.5),
             optimizer=dict(type='SGD', lr=0.1)))
    loss_of(model, batch(1)).backward()  # stale gradients
    before, x = weights(model), batch(0)
    grads = raw_grads(model, [x])
    loss = wrapper.step(closure=closure_of(wrapper, model, x))
    want = direction(grads, 'clip_then_gc', 0.5)
    after = weights(model)
    for name in before:
        np.testing.assert_allclose(after[name],
                                   before[name] - 0.1 * want[name],
                                   rtol=1e-5, atol=1e-6, err_msg=name)
    # step() returns the closure's loss, as torch's optimizers do.
    assert loss.item() == pytest.approx(loss_of(TinyNet(), x).item())


@pytest.mark.parametrize('wrapper_type', ['OptimWrapper', 'GCOptimWrapper'])
def test_lbfgs_steps_within_the_centralized_subspace(wrapper_type):
    """LBFGS evaluates the closure several times per step; its direction is
    a combination of the gradients it saw, so with each of them centralized
    the weights' row means do not move (and they do without GC)."""
    model = TinyNet()
    wrapper = build_optim_wrapper(
        model,
        dict(type=wrapper_type,
             optimizer=dict(type='LBFGS', lr=0.5, max_iter=4)))
    before, x = weights(model), batch(0)
    wrapper.step(closure=closure_of(wrapper, model, x))
    state = wrapper.optimizer.state[wrapper.optimizer.param_groups[0][
        'params'][0]]
    assert state['func_evals'] > 1
    after = weights(model)
    for name in ('conv.weight', 'fc.weight'):
        delta = after[name] - before[name]
        row_means = np.abs(delta - project(delta, 'conv_fc')).max()
        if wrapper_type == 'GCOptimWrapper':
            assert row_means < 1e-6 * np.abs(delta).max(), name
        else:
            assert row_means > 1e-3 * np.abs(delta).max(), name


@needs_cpu_amp
def test_amp_wrapper_refuses_closures_before_anything_moves():
    """GradScaler cannot step with a closure; refused before the gradients
    are unscaled, so a plain step() afterwards is still exact."""
    model = TinyNet()
    wrapper = build_optim_wrapper(
        model,
        dict(type='AmpGCOptimWrapper', loss_scale=1024.,
             optimizer=dict(type='SGD', lr=0.1)))
    before, x = weights(model), batch(0)
    grads = raw_grads(model, [x])
    wrapper.backward(loss_of(model, x))
    scaled = {n: p.grad.clone() for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match='AmpGCOptimWrapper.*closure'):
        wrapper.step(closure=closure_of(wrapper, model, x))
    for name, param in model.named_parameters():
        assert torch.equal(param.grad, scaled[name]), name
        np.testing.assert_array_equal(weights(model)[name], before[name])
    wrapper.step()
    after = weights(model)
    for name in before:
        np.testing.assert_allclose(
            after[name], before[name] - 0.1 * project(grads[name], 'conv_fc'),
            rtol=1e-4, atol=1e-6)


class SparseNet(nn.Module):
    """A dense fc first, so a step that centralized before checking would
    have changed its gradient."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3, 2)
        self.embedding = nn.Embedding(5, 3, sparse=True)

    def forward(self, index):
        return self.fc(self.embedding(index)).pow(2).sum()


@pytest.mark.parametrize('wrapper_type', [
    'GCOptimWrapper', pytest.param('AmpGCOptimWrapper', marks=needs_cpu_amp)])
def test_sparse_gradient_is_refused_before_anything_moves(wrapper_type):
    model = SparseNet()
    wrapper = build_optim_wrapper(
        model,
        dict(type=wrapper_type, optimizer=dict(type='SGD', lr=0.1)))
    wrapper.backward(model(torch.tensor([0, 2])))
    before = {n: (p.detach().clone(), p.grad.clone())
              for n, p in model.named_parameters()}
    with pytest.raises(
            RuntimeError,
            match=r'sparse gradient \(param group 0, shape \(5, 3\)\)'):
        wrapper.step()
    for name, param in model.named_parameters():
        weight, grad = before[name]
        assert torch.equal(param, weight), name
        assert torch.equal(param.grad.to_dense(), grad.to_dense()), name


def test_sparse_gradient_that_gc_skips_steps():
    model = SparseNet()
    wrapper = build_optim_wrapper(
        model,
        dict(type='GCOptimWrapper', gc_mode='conv',
             optimizer=dict(type='SGD', lr=0.1)))
    weight = model.embedding.weight.detach().clone()
    wrapper.update_params(model(torch.tensor([0, 2])))
    assert not torch.equal(model.embedding.weight, weight)


@pytest.mark.parametrize('key,value,match', [
    ('wrapper_gc_mode', 'fc', 'param group 1 wrapper_gc_mode'),
    ('gc_mode', None, "param group 1 of SGD has a 'gc_mode' key"),
    ('gc_out_dim', 2, 'param group 1: out_dim must be 0 or 1'),
])
def test_bad_param_group_keys_are_refused_when_built(key, value, match):
    """gc_mode in a torch optimizer's group was this wrapper's per-group key
    before; ignoring it now would centralize what it excluded."""
    model = TinyNet()
    optimizer = torch.optim.SGD(
        [dict(params=model.conv.parameters()),
         dict(params=model.fc.parameters(), **{key: value})], lr=0.1)
    with pytest.raises(ValueError, match=match):
        GCOptimWrapper(optimizer)


# GCOptimWrapper's own step of torch's SGD, Adam and AdamW on CPU (GC and
# the update in one pass, gradients left as backward made them), against
# the torch optimizer fed centralized gradients. conv, fc, bias, 1x1 conv.
FUSED_SHAPES = [(6, 3, 3, 3), (5, 7), (5, ), (4, 6, 1, 1)]
TORCH_OPTIMIZERS = {
    'SGD-momentum-decay': (torch.optim.SGD,
                           dict(lr=0.1, momentum=0.9, weight_decay=0.01)),
    'SGD-nesterov': (torch.optim.SGD, dict(lr=0.05, momentum=0.9,
                                           nesterov=True, weight_decay=1e-3)),
    'SGD-dampening': (torch.optim.SGD, dict(lr=0.1, momentum=0.8,
                                            dampening=0.3)),
    'SGD-plain': (torch.optim.SGD, dict(lr=0.1, weight_decay=0.1)),
    'Adam-decay': (torch.optim.Adam, dict(lr=0.01, weight_decay=0.1)),
    'Adam-amsgrad': (torch.optim.Adam, dict(lr=0.02, betas=(0.8, 0.99),
                                            amsgrad=True)),
    'AdamW': (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.05)),
    'AdamW-amsgrad': (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.05,
                                              amsgrad=True, eps=1e-6)),
}


def twin_params(dtype, seed=1):
    torch.manual_seed(seed)
    weights = [torch.randn(s, dtype=dtype) for s in FUSED_SHAPES]
    return ([nn.Parameter(w.clone()) for w in weights],
            [nn.Parameter(w.clone()) for w in weights])


def run_twins(wrapper, twin, wrapped_params, twin_params_, steps, clip=None,
              seed=0):
    """Steps the wrapper and its twin (the torch optimizer fed clipped,
    then centralized gradients) on the same random gradients; returns
    whether each step left the wrapper's gradients uncentralized (rows of
    the conv weight's gradient with a mean far from 0)."""
    torch.manual_seed(seed)
    uncentralized = []
    for _ in range(steps):
        grads = [torch.randn_like(p) for p in wrapped_params]
        for p, q, g in zip(wrapped_params, twin_params_, grads):
            p.grad, q.grad = g.clone(), g.clone()
        wrapper.step()
        if clip is not None:
            nn.utils.clip_grad_norm_(twin_params_, clip)
        gc_mm.centralize.centralize_([q.grad for q in twin_params_])
        twin.step()
        grad = wrapped_params[0].grad
        row_means = grad.double().mean(dim=(1, 2, 3))
        # Centralized, a row's mean is rounding: ~1e-9 in float32, ~1e-3 in
        # bfloat16 (raw, ~0.2 here).
        limit = 2e-2 if grad.dtype == torch.bfloat16 else 1e-5
        uncentralized.append(bool(row_means.abs().max() > limit))
    return uncentralized


def assert_twins_equal(wrapper, twin, wrapped_params, twin_params_, tol):
    for p, q in zip(wrapped_params, twin_params_):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol)
    # torch's own state, as torch's step would have left it.
    ours, theirs = wrapper.optimizer.state_dict(), twin.state_dict()
    assert ours['state'].keys() == theirs['state'].keys()
    for index, state in ours['state'].items():
        assert state.keys() == theirs['state'][index].keys()
        for key, value in state.items():
            torch.testing.assert_close(value, theirs['state'][index][key],
                                       rtol=tol, atol=tol, msg=key)


@pytest.mark.skipif(gc_mm.kernels.installed('adaptive') is None
                    or gc_mm.kernels.installed('sgd') is None,
                    reason='the fused wrapper step needs the installed '
                    'kernels')
@pytest.mark.parametrize('name', list(TORCH_OPTIMIZERS))
@pytest.mark.parametrize('implementation', ['fused', 'for-loop'])
@pytest.mark.parametrize('dtype,tol', [(torch.float32, 2e-6),
                                       (torch.float64, 1e-12)])
@pytest.mark.parametrize('clip', [None, 1.0])
def test_fused_step_equals_torch_on_centralized_gradients(
        name, implementation, dtype, tol, clip):
    """After the first step (torch's own, which makes its state), the
    wrapper steps torch's optimizer itself, in one pass, and leaves the
    gradients uncentralized; parameters and torch's state stay equal to torch
    fed clipped, centralized gradients, for 6 steps."""
    cls, hp = TORCH_OPTIMIZERS[name]
    options = dict(fused=True) if implementation == 'fused' else dict(
        foreach=False)
    wrapped, twin_ps = twin_params(dtype)
    wrapper = GCOptimWrapper(
        cls(wrapped, **options, **hp),
        clip_grad=None if clip is None else dict(max_norm=clip))
    twin = cls(twin_ps, **options, **hp)
    uncentralized = run_twins(wrapper, twin, wrapped, twin_ps, 6, clip)
    assert uncentralized == [False] + [True] * 5
    assert_twins_equal(wrapper, twin, wrapped, twin_ps, tol)


@pytest.mark.skipif(gc_mm.kernels.installed('adaptive') is None,
                    reason='without the installed kernel the wrapper never '
                    'steps fused: there is no guard to test')
@pytest.mark.parametrize('why', ['step hook', 'maximize', 'bfloat16',
                                 'gc_then_clip'])
def test_fused_step_steps_aside_where_it_cannot(why):
    """Where the one-pass step cannot stand in for torch's (a step hook it
    would skip, an option it lacks, a dtype, GC before clipping), every
    step centralizes the gradients and calls torch's
    step: same numbers, hooks run."""
    dtype = torch.bfloat16 if why == 'bfloat16' else torch.float32
    hp = dict(lr=0.01, weight_decay=0.05, maximize=why == 'maximize')
    wrapped, twin_ps = twin_params(dtype)
    optimizer = torch.optim.AdamW(wrapped, **hp)
    calls = []
    if why == 'step hook':
        optimizer.register_step_pre_hook(lambda *args: calls.append(1))
    wrapper = GCOptimWrapper(
        optimizer,
        gc_order='gc_then_clip' if why == 'gc_then_clip' else 'clip_then_gc')
    twin = torch.optim.AdamW(twin_ps, **hp)
    uncentralized = run_twins(wrapper, twin, wrapped, twin_ps, 4)
    assert uncentralized == [False] * 4
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-6
    assert_twins_equal(wrapper, twin, wrapped, twin_ps, tol)
    assert calls == ([1] * 4 if why == 'step hook' else [])
    # Control: without the obstacle the same run steps fused from its second
    # step (gradients left as they were), so a guard that let the obstacle
    # through would show above.
    wrapped, twin_ps = twin_params(torch.float32)
    hp['maximize'] = False
    wrapper = GCOptimWrapper(torch.optim.AdamW(wrapped, **hp))
    twin = torch.optim.AdamW(twin_ps, **hp)
    uncentralized = run_twins(wrapper, twin, wrapped, twin_ps, 4)
    assert uncentralized == [False] + [True] * 3


def _set(key, value):
    def change(group):
        group[key] = value
    return change


# Options torch's SGD and Adam take when changed between steps (by a
# scheduler, e.g. MMEngine's momentum schedulers, or by hand), with state an
# earlier step left: (optimizer, options, the change after step 2).
OPTIONS_CHANGED = {
    'SGD-momentum-to-0': (torch.optim.SGD, dict(
        lr=0.1, momentum=0.9, weight_decay=0.01), _set('momentum', 0.)),
    'SGD-momentum-from-0': (torch.optim.SGD, dict(lr=0.1, weight_decay=0.01),
                            _set('momentum', 0.9)),
    'SGD-nesterov-off': (torch.optim.SGD, dict(
        lr=0.05, momentum=0.9, nesterov=True), _set('nesterov', False)),
    'SGD-nesterov-momentum-to-0': (torch.optim.SGD, dict(
        lr=0.05, momentum=0.9, nesterov=True), _set('momentum', 0.)),
    'SGD-dampening': (torch.optim.SGD, dict(lr=0.1, momentum=0.9),
                      _set('dampening', 0.5)),
    'Adam-amsgrad-off': (torch.optim.Adam, dict(lr=0.01, amsgrad=True),
                         _set('amsgrad', False)),
    'AdamW-betas-decay': (torch.optim.AdamW, dict(lr=0.01),
                          lambda g: g.update(betas=(0.5, 0.9),
                                             weight_decay=0.1)),
}


def use_built_kernels(monkeypatch):
    """The kernels built on first use stand in for the installed ones."""
    built = {name: gc_mm.kernels.load(name) for name in ('sgd', 'adaptive')}
    monkeypatch.setattr(gc_mm.kernels, 'installed', built.get)


@pytest.mark.parametrize('name', list(OPTIONS_CHANGED))
def test_fused_step_takes_every_option_torch_takes(name, monkeypatch):
    """Whatever torch's optimizer accepts mid-run (momentum reaching 0 with
    a momentum buffer left in its state, amsgrad switched off with its
    maximum kept, ...), the wrapper's fused step equals torch's step on
    P(g) (it used to hand the kernel a momentum buffer torch ignores, which
    the kernel refused). The kernels built on first use stand in for the
    installed ones, so this runs in both installs."""
    use_built_kernels(monkeypatch)
    cls, hp, change = OPTIONS_CHANGED[name]
    wrapped, twin_ps = twin_params(torch.float64)
    wrapper = GCOptimWrapper(cls(wrapped, **hp))
    twin = cls(twin_ps, **hp)
    run_twins(wrapper, twin, wrapped, twin_ps, 2)
    for optimizer in (wrapper.optimizer, twin):
        change(optimizer.param_groups[0])
    uncentralized = run_twins(wrapper, twin, wrapped, twin_ps, 4, seed=1)
    assert_twins_equal(wrapper, twin, wrapped, twin_ps, 1e-12)
    # The fused step ran (it leaves the gradients as backward made them),
    # from the step torch made the state it needs.
    first_fused = 1 if name == 'SGD-momentum-from-0' else 0
    assert uncentralized == [False] * first_fused + [True] * (4 - first_fused)


def test_fused_step_with_a_momentum_scheduler_reaching_0(monkeypatch):
    """MMEngine's LinearMomentum down to 0 around torch's SGD (the case that
    crashed): the run equals torch's SGD on P(g) with the same schedule."""
    from mmengine.optim.scheduler import LinearMomentum
    use_built_kernels(monkeypatch)
    hp = dict(lr=0.1, momentum=0.9, weight_decay=0.01)
    wrapped, twin_ps = twin_params(torch.float64)
    wrapper = GCOptimWrapper(torch.optim.SGD(wrapped, **hp))
    twin = torch.optim.SGD(twin_ps, **hp)
    schedulers = [LinearMomentum(optimizer, start_factor=1., end_factor=0.,
                                 end=3, by_epoch=False)
                  for optimizer in (wrapper, twin)]
    for seed in range(6):
        run_twins(wrapper, twin, wrapped, twin_ps, 1, seed=seed)
        for scheduler in schedulers:
            scheduler.step()
    assert wrapper.optimizer.param_groups[0]['momentum'] == 0
    assert_twins_equal(wrapper, twin, wrapped, twin_ps, 1e-12)
