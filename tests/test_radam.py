"""RAdam_GC and Ranger against an independent float64 reference written
from the formulas (../shared/docs/gc_semantics.md, "Beyond plain GC"), and
against torch.optim.RAdam where the formulas coincide; one test per known
fault of popular RAdam/Ranger versions."""
import inspect
import io
import math
import os.path as osp
import sys

import numpy as np
import pytest
import torch
from mmengine.registry import OPTIMIZERS

import gc_mm  # noqa: F401  (registers the optimizers)
from conftest import REPO
from reference import project

# torch's RAdam takes decoupled_weight_decay from torch 2.2 on.
TORCH_RADAM_DECOUPLES = 'decoupled_weight_decay' in inspect.signature(
    torch.optim.RAdam).parameters
needs_torch_radamw = pytest.mark.skipif(
    not TORCH_RADAM_DECOUPLES,
    reason="this torch's RAdam has no decoupled_weight_decay (torch < 2.2)")

F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16
# conv weight, fc weight, bias, conv 1x1 weight.
SHAPES = [(6, 3, 3, 3), (5, 7), (5, ), (4, 6, 1, 1)]
# Ranger's defaults; with b2 = 0.999 the first five steps are un-adapted.
RANGER = dict(lr=1e-3, betas=(0.95, 0.999), eps=1e-5, weight_decay=0.,
              decoupled_weight_decay=True, gc_mode='conv_fc',
              gc_loc='gradient', k=6, alpha=0.5)


class RAdamReference:
    """RAdam (+ GC, + Lookahead) on float64 numpy arrays, one state per
    array index."""

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0., decoupled_weight_decay=False,
                 gc_mode='conv_fc', gc_loc='gradient', k=None, alpha=None):
        self.lr, self.eps, self.wd = lr, eps, weight_decay
        self.b1, self.b2 = betas
        self.decoupled = decoupled_weight_decay
        self.mode, self.loc = gc_mode, gc_loc
        self.k, self.alpha = k, alpha
        self.state = {}
        self.steps = 0

    def rho(self, t):
        rho_inf = 2 / (1 - self.b2) - 1
        return rho_inf, rho_inf - 2 * t * self.b2**t / (1 - self.b2**t)

    def step(self, weights, grads):
        out = []
        for i, (w, g) in enumerate(zip(weights, grads)):
            st = self.state.setdefault(i, dict(t=0, m=0., v=0., slow=w))
            st['t'] += 1
            t = st['t']
            d = g if self.decoupled else g + self.wd * w
            if self.loc == 'gradient':
                d = project(d, self.mode)
            if self.decoupled:
                w = w * (1 - self.lr * self.wd)
            st['m'] = self.b1 * st['m'] + (1 - self.b1) * d
            st['v'] = self.b2 * st['v'] + (1 - self.b2) * d * d
            m_hat = st['m'] / (1 - self.b1**t)
            rho_inf, rho_t = self.rho(t)
            if rho_t > 5:
                r = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf /
                              ((rho_inf - 4) * (rho_inf - 2) * rho_t))
                u = r * m_hat * math.sqrt(1 - self.b2**t) / (
                    np.sqrt(st['v']) + self.eps)
            else:
                u = m_hat
            if self.loc == 'update':
                u = project(u, self.mode)
            out.append(w - self.lr * u)
        self.steps += 1
        if self.k and self.steps % self.k == 0:
            for i, w in enumerate(out):
                st = self.state[i]
                st['slow'] = st['slow'] + self.alpha * (w - st['slow'])
                out[i] = st['slow']
        return out


def gradients(steps, shapes=SHAPES, seed=0):
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(s) for s in shapes] for _ in range(steps)]


def initial_weights(shapes=SHAPES, dtype=F64, seed=1):
    """Weights exact in ``dtype``, so only the updates' rounding differs
    from the reference."""
    rng = np.random.default_rng(seed)
    return [torch.tensor(rng.standard_normal(s)).to(dtype).double().numpy()
            for s in shapes]


def run(opt, params, grads, dtype):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = torch.tensor(g, dtype=dtype)
        opt.step()


def build(cfg, weights, dtype=F64, groups=None):
    params = [torch.nn.Parameter(torch.tensor(w, dtype=dtype))
              for w in weights]
    if groups is not None:  # [(indices, options)]
        cfg = dict(cfg, params=[dict(params=[params[i] for i in indices],
                                     **options)
                                for indices, options in groups])
    else:
        cfg = dict(cfg, params=params)
    return params, OPTIMIZERS.build(cfg)


def test_rectification_boundary_of_the_reference():
    """The reference's own check: with b2 = 0.999 the variance is tractable
    (rho_t > 5) from step 6 on; with b2 = 0.8 from step 7."""
    ref = RAdamReference(betas=(0.9, 0.999))
    assert [ref.rho(t)[1] > 5 for t in range(1, 8)] == [False] * 5 + [True] * 2
    ref = RAdamReference(betas=(0.9, 0.8))
    assert [ref.rho(t)[1] > 5 for t in range(1, 9)] == [False] * 6 + [True] * 2


def test_ranger_is_lookahead_around_radam_gc_with_rangers_defaults():
    params, ranger = build(dict(type='Ranger'), initial_weights())
    assert (ranger.k, ranger.alpha) == (6, 0.5)
    assert type(ranger.optimizer).__name__ == 'RAdam_GC'
    group = ranger.param_groups[0]
    assert group is ranger.optimizer.param_groups[0]
    want = {key: value for key, value in RANGER.items()
            if key not in ('k', 'alpha')}
    assert {key: group[key] for key in want} == want


@pytest.mark.parametrize('decoupled', [False, True])
@pytest.mark.parametrize('dtype,tol', [(F64, 1e-14), (F32, 2e-6)])
@pytest.mark.parametrize('wrapped', ['RAdam_GC', 'Ranger'])
def test_gc_off_and_k1_equal_torch_radam_step_for_step(decoupled, dtype, tol,
                                                       wrapped):
    """GC off (and for Ranger k=1, alpha=1): torch.optim.RAdam, step for step
    across the rho_t <= 5 boundary, with either decay. (The plain path folds
    the scalars into one step size, so float32 agrees to rounding.)"""
    if decoupled and not TORCH_RADAM_DECOUPLES:
        pytest.skip("this torch's RAdam has no decoupled_weight_decay")
    hp = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1,
              decoupled_weight_decay=decoupled)
    weights, grads = initial_weights(), gradients(10)
    extra = dict(k=1, alpha=1.) if wrapped == 'Ranger' else {}
    params, opt = build(dict(type=wrapped, gc_mode=None, **hp, **extra),
                        weights, dtype)
    ours = [torch.nn.Parameter(torch.tensor(w, dtype=dtype)) for w in weights]
    torch_hp = dict(hp)
    if not decoupled:  # torch's default (and torch < 2.2 has no such key)
        del torch_hp['decoupled_weight_decay']
    theirs = torch.optim.RAdam(ours, foreach=False, **torch_hp)
    for step_grads in grads:
        for p, q, g in zip(params, ours, step_grads):
            p.grad = torch.tensor(g, dtype=dtype)
            q.grad = torch.tensor(g, dtype=dtype)
        opt.step()
        theirs.step()
        for p, q in zip(params, ours):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=tol,
                                       atol=tol)


def radam_reference(cfg, weights, grads, groups=None):
    """The reference over the optimizer's groups: [(indices, options)]."""
    cfg = {key: value for key, value in cfg.items() if key != 'type'}
    if cfg.pop('_ranger', False):
        cfg = dict(RANGER, **cfg)
    groups = groups or [(list(range(len(weights))), {})]
    out = [None] * len(weights)
    for indices, options in groups:
        ref = RAdamReference(**dict(cfg, **options))
        ws = [weights[i] for i in indices]
        for step_grads in grads:
            ws = ref.step(ws, [step_grads[i] for i in indices])
        for i, w in zip(indices, ws):
            out[i] = w
    return out


# Two groups whose betas put the rho_t <= 5 boundary at different steps
# (6 and 7), and whose Lookahead syncs at steps 6, 12, 18.
GROUPS = [([0, 2], {}), ([1, 3], dict(betas=(0.9, 0.8)))]
CASES = {
    'gradient-decoupled': dict(weight_decay=0.1),
    'gradient-coupled': dict(weight_decay=0.1, decoupled_weight_decay=False),
    'update-decoupled': dict(weight_decay=0.1, gc_loc='update'),
    'update-coupled-conv': dict(weight_decay=0.1, gc_loc='update',
                                decoupled_weight_decay=False,
                                gc_mode='conv'),
}


@pytest.mark.parametrize('case', list(CASES))
@pytest.mark.parametrize('dtype,tol', [(F64, 1e-12), (F32, 2e-5),
                                       (BF16, 3e-2)])
@pytest.mark.parametrize('fused', [True, False])
def test_ranger_matches_reference_for_20_steps(case, dtype, tol, fused):
    """GC and Lookahead (k=6), groups with different betas, 20 steps across
    the rho_t <= 5 boundary and three synchronizations; the rectified steps
    on the C++ kernel (built on first use where it was not installed) or on
    the plain path."""
    hp = dict(lr=0.01, **CASES[case])
    weights, grads = initial_weights(dtype=dtype), gradients(20)
    params, opt = build(dict(type='Ranger', fused=fused, **hp), weights,
                        dtype, groups=GROUPS)
    run(opt, params, grads, dtype)
    want = radam_reference(dict(hp, _ranger=True), weights, grads, GROUPS)
    for p, w, shape in zip(params, want, SHAPES):
        np.testing.assert_allclose(p.detach().double().numpy(), w, rtol=tol,
                                   atol=tol, err_msg=str(shape))
    for state in opt.state.values():
        for key, value in state.items():
            if torch.is_tensor(value):
                assert value.dtype == (F32 if dtype == BF16 else dtype), key


def test_reference_is_sensitive_to_gc_lookahead_and_rectification():
    """The parity test above could not pass with GC, Lookahead or the
    rectification missing: each changes the result."""
    hp = dict(lr=0.01, weight_decay=0.1)
    weights, grads = initial_weights(), gradients(20)
    want = radam_reference(dict(hp, _ranger=True), weights, grads)[0]
    for other in (dict(gc_mode=None), dict(k=None), dict(betas=(0.95, 0.5))):
        got = radam_reference(dict(hp, _ranger=True, **other), weights,
                              grads)[0]
        assert not np.allclose(got, want, atol=1e-6), other


def test_rectification_is_per_group_and_per_parameter_step():
    """Fault: (step, rho_t, step size) cached by ``step % 10`` and shared by
    every group. Here the groups differ in b2 (boundary at steps 6 and 7),
    and a parameter added at step 11 takes its own un-adapted steps while
    the others are rectified (a cache indexed by step % 10 would hand it
    step 1's entry only by luck, and the wrong one at its step 2)."""
    weights, grads = initial_weights(), gradients(16)
    hp = dict(lr=0.01, gc_mode='conv_fc')
    params, opt = build(dict(type='RAdam_GC', **hp), weights, F64,
                        groups=[([0], {}), ([1], dict(betas=(0.9, 0.8)))])
    run(opt, params[:2], grads[:10], F64)
    late = [torch.nn.Parameter(torch.tensor(w)) for w in weights[2:]]
    opt.add_param_group(dict(params=late, betas=(0.9, 0.8)))
    run(opt, params[:2] + late, grads[10:], F64)
    want = radam_reference(hp, weights[:2], grads,
                           [([0], {}), ([1], dict(betas=(0.9, 0.8)))])
    want += radam_reference(dict(hp, betas=(0.9, 0.8)), weights[2:],
                            [g[2:] for g in grads[10:]])
    for p, w in zip(params[:2] + late, want):
        np.testing.assert_allclose(p.detach().numpy(), w, rtol=1e-12,
                                   atol=1e-12)
    assert [opt.state[p]['step'] for p in params[:2] + late] == [16, 16, 6, 6]


@pytest.mark.parametrize('decoupled', [False, True])
def test_first_moment_is_never_the_step_direction(decoupled):
    """Fault: in the un-rectified steps the first moment is used as the
    step direction and decay or GC is written into it. With GC of the
    update, steps 1-5 must leave m the plain average of g + wd * w (or g),
    never centralized or decayed."""
    hp = dict(lr=0.05, weight_decay=0.2, decoupled_weight_decay=decoupled,
              gc_loc='update')
    weights, grads = initial_weights(), gradients(5)
    params, opt = build(dict(type='RAdam_GC', **hp), weights)
    m = [0.] * len(params)
    for step_grads in grads:
        before = [p.detach().numpy().copy() for p in params]
        run(opt, params, [step_grads], F64)
        for i, (p, g, w) in enumerate(zip(params, step_grads, before)):
            fed = g if decoupled else g + 0.2 * w
            m[i] = 0.9 * m[i] + 0.1 * fed
            np.testing.assert_allclose(opt.state[p]['exp_avg'].numpy(),
                                       m[i], rtol=1e-12, atol=1e-12)
            assert not np.allclose(project(m[i], 'conv_fc'), m[i]) or (
                p.ndim == 1)
    assert_reference(params, hp, weights, grads)


def assert_reference(params, hp, weights, grads, tol=1e-12):
    want = radam_reference(hp, weights, grads)
    for p, w in zip(params, want):
        np.testing.assert_allclose(p.detach().double().numpy(), w, rtol=tol,
                                   atol=tol)


@pytest.mark.parametrize('name', ['RAdam_GC', 'Ranger'])
def test_step_uses_the_gradients_its_closure_computes(name):
    """Fault: the closure ignored. step(closure) runs it with grad enabled,
    returns its loss, and steps with the gradients it leaves."""
    hp = dict(lr=0.01, weight_decay=0.1)
    weights, grads = initial_weights(), gradients(8)
    params, opt = build(dict(type=name, **hp), weights)
    for step_grads in grads:

        def closure():
            assert torch.is_grad_enabled()
            opt.zero_grad()
            loss = sum((p * torch.tensor(g)).sum()
                       for p, g in zip(params, step_grads))
            loss.backward()
            return loss

        for p in params:  # stale gradients the closure replaces
            p.grad = torch.full_like(p, 100.)
        assert opt.step(closure).requires_grad
    ref = dict(hp, _ranger=True) if name == 'Ranger' else hp
    assert_reference(params, ref, weights, grads)


def save_load(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize('name', ['RAdam_GC', 'Ranger'])
@pytest.mark.parametrize('dtype', [F32, BF16])
@pytest.mark.parametrize('stop', [4, 6, 9])
def test_resume_is_bit_exact(name, dtype, stop):
    """Fault: state that does not resume. Saved after ``stop`` steps
    (before, at and after the first synchronization and the rho_t
    boundary), loaded into a new optimizer (through torch.save with
    weights_only), 20 steps in all: bit-equal to the uninterrupted run."""
    hp = dict(lr=0.01, weight_decay=0.1, gc_loc='update')
    weights, grads = initial_weights(dtype=dtype), gradients(20)
    params, opt = build(dict(type=name, **hp), weights, dtype, groups=GROUPS)
    run(opt, params, grads[:stop], dtype)
    saved = save_load(opt.state_dict())
    saved_params = [p.detach().clone() for p in params]
    run(opt, params, grads[stop:], dtype)

    resumed, opt2 = build(dict(type=name, **hp), weights, dtype,
                          groups=GROUPS)
    with torch.no_grad():
        for p, s in zip(resumed, saved_params):
            p.copy_(s)
    opt2.load_state_dict(saved)
    run(opt2, resumed, grads[stop:], dtype)
    for a, b in zip(params, resumed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(params, resumed):
        for key, value in opt.state[a].items():
            torch.testing.assert_close(opt2.state[b][key], value, rtol=0,
                                       atol=0)
    if name == 'Ranger':
        assert opt2.lookahead_steps == opt.lookahead_steps == 20


@pytest.mark.parametrize('dtype', [F64, F32, BF16])
@pytest.mark.parametrize('loc', ['gradient', 'update'])
@pytest.mark.parametrize('fused', [True, False])
def test_what_step_leaves_in_grad(dtype, loc, fused):
    """README: every path (the plain one, RAdam's un-adapted first steps,
    the kernel's rectified steps from the sixth), gc_loc and dtype leaves
    p.grad as backward left it, as torch's RAdam (the plain path with
    gc_loc='gradient' used to leave P(g + wd * w) there)."""
    hp = dict(lr=0.01, weight_decay=0.1, gc_loc=loc, fused=fused)
    weights, grads = initial_weights(dtype=dtype), gradients(6)
    params, opt = build(dict(type='RAdam_GC', **hp), weights, dtype)
    for step, step_grads in enumerate(grads, 1):
        step_grads = [torch.tensor(g, dtype=dtype) for g in step_grads]
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
        for p, g in zip(params, step_grads):
            assert torch.equal(p.grad, g), step


def test_gc_of_the_update_keeps_row_means_fixed():
    """With gc_loc='update' and no decay, each weight row's mean never moves;
    with gc_mode='conv' the fc weight is not centralized."""
    weights, grads = initial_weights(), gradients(8)
    params, opt = build(dict(type='RAdam_GC', lr=0.05, gc_loc='update'),
                        weights)
    run(opt, params, grads, F64)
    for p, w in zip(params, weights):
        if p.ndim > 1:
            delta = p.detach().numpy() - w
            np.testing.assert_allclose(project(delta, 'conv_fc'), delta,
                                       atol=1e-12)
    params, opt = build(dict(type='RAdam_GC', lr=0.05, gc_mode='conv'),
                        weights)
    run(opt, params, grads, F64)
    fc_plain = radam_reference(dict(lr=0.05, gc_mode=None), weights,
                               grads)[1]
    np.testing.assert_allclose(params[1].detach().numpy(), fc_plain,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('cfg,message', [
    (dict(type='RAdam_GC', gc_loc='weights'), "gc_loc must be 'gradient'"),
    (dict(type='RAdam_GC', decoupled_weight_decay=1),
     'decoupled_weight_decay must be a bool'),
    (dict(type='RAdam_GC', betas=(0.9, 1.0)), 'betas must be two numbers'),
    (dict(type='RAdam_GC', gc_mode='fc'), 'gc_mode must be'),
    (dict(type='Ranger', k=0), 'k must be a positive int'),
    (dict(type='Ranger', alpha=1.5), r'alpha must be a number in \(0, 1\]'),
    (dict(type='Ranger', lr=-1.), 'lr must be a non-negative number'),
])
def test_bad_options_are_refused_naming_them(cfg, message):
    with pytest.raises(ValueError, match=message):
        build(cfg, initial_weights())
    params, opt = build(dict(type='RAdam_GC'), initial_weights()[:1])
    if cfg['type'] == 'RAdam_GC':  # a bad group leaves the optimizer as is
        options = {k: v for k, v in cfg.items() if k != 'type'}
        extra = torch.nn.Parameter(torch.zeros(3))
        with pytest.raises(ValueError, match=message):
            opt.add_param_group(dict(params=[extra], **options))
        assert len(opt.param_groups) == 1


@needs_torch_radamw  # the benchmark's torch RAdam decouples the decay
def test_benchmark_radam_variants_build_and_step():
    """tools/analysis/benchmark_gc.py --families radam: every variant builds
    and steps (timings are reported, never asserted); torch's RAdam is
    among them, the timed steps are rectified ones."""
    sys.path.insert(0, osp.join(REPO, 'tools/analysis'))
    try:
        import benchmark_gc
    finally:
        sys.path.pop(0)
    shapes = [(8, 3, 3, 3), (8, ), (10, 8)]
    results = benchmark_gc.time_steps(shapes, 'radam', torch.device('cpu'),
                                      1, 0)
    assert {'torch RAdam foreach', 'gc_mm RAdam_GC (gradient)',
            'gc_mm Ranger (k=6)'} <= set(results)
    assert all(r['ms'] > 0 for r in results.values())
    assert benchmark_gc.RADAM_RECTIFIED_FROM == next(
        t for t in range(1, 10)
        if RAdamReference(betas=benchmark_gc.RADAM['betas']).rho(t)[1] > 5)
