"""Exact parity of every GC optimizer with the float64 reference, and the
torch-optimizer behaviour a runner relies on."""
import io

import numpy as np
import pytest
import torch
from mmengine.registry import OPTIMIZERS

import gc_mm.kernels
import gc_mm.optimizers.sgd  # registers the optimizers
from reference import ADAM_NAMES, ALL_NAMES, SGD_NAMES, Reference, project

# conv weight, conv 1x1 weight, fc weight, bias, a conv with rows of 1.
SHAPES = [(6, 3, 3, 3), (4, 6, 1, 1), (5, 7), (5, ), (3, 1, 1, 1)]
STEPS = 6

HYPER_PARAMS = {
    'sgd': [
        dict(lr=0.1),
        dict(lr=0.1, momentum=0.9, weight_decay=0.01),
        dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.001),
        dict(lr=0.05, momentum=0.8, dampening=0.3, weight_decay=0.1),
    ],
    'adam': [
        dict(lr=0.01),
        dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.1, eps=1e-6),
        dict(lr=0.02, weight_decay=0.05, amsgrad=True),
    ],
    'adagrad': [
        dict(lr=0.1),
        dict(lr=0.1, lr_decay=0.05, weight_decay=0.01,
             initial_accumulator_value=0.1, eps=1e-8),
    ],
}


def family(name):
    if name in SGD_NAMES:
        return 'sgd'
    return 'adam' if name in ADAM_NAMES else 'adagrad'


# SGD's paths besides its default (on CPU the kernel built at install, else
# the blocked path): the blocked one, the plain one, the multi-tensor one
# (the default on an accelerator) and the kernel.
SGD_OTHER_PATHS = [{'fused': False}, {'blocked': False}, {'foreach': True},
                   {'fused': True}]


def paths(name):
    """Each implementation path of an optimizer: SGD has four, and its
    default picks one of them."""
    return [{}, *SGD_OTHER_PATHS] if name in SGD_NAMES else [{}]


def cases():
    for name in ALL_NAMES:
        for i, hp in enumerate(HYPER_PARAMS[family(name)]):
            for path in paths(name):
                tag = '-'.join(f'{k}={v}' for k, v in path.items())
                yield pytest.param(name, {**hp, **path},
                                   id=f'{name}-{i}{"-" + tag if tag else ""}')


def gradients(seed=0, steps=STEPS, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(s) for s in shapes] for _ in range(steps)]


def initial_weights(seed=1, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s) for s in shapes]


def run_gc_mm(name, hp, dtype, weights, grads, **kwargs):
    params = [torch.tensor(w, dtype=dtype, requires_grad=True)
              for w in weights]
    opt = OPTIMIZERS.build(dict(type=name, params=params, **hp, **kwargs))
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = torch.tensor(g, dtype=dtype)
        opt.step()
    return [p.detach().double().numpy() for p in params], opt


def run_reference(name, hp, weights, grads, **kwargs):
    ref = Reference(name, **hp, **kwargs)
    for step_grads in grads:
        weights = ref.step(weights, step_grads)
    return weights


@pytest.mark.parametrize('name,hp', list(cases()))
@pytest.mark.parametrize('dtype,tol', [(torch.float64, 1e-12),
                                       (torch.float32, 2e-5)])
def test_parity_with_float64_reference(name, hp, dtype, tol):
    weights, grads = initial_weights(), gradients()
    got, _ = run_gc_mm(name, hp, dtype, weights, grads)
    want = run_reference(name, hp, weights, grads)
    for g, w, shape in zip(got, want, SHAPES):
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol,
                                   err_msg=f'{name} {shape}')


@pytest.mark.parametrize('name', ALL_NAMES)
def test_parity_differs_from_no_gc(name):
    """The reference is sensitive to GC: a GC-free run gives other numbers."""
    hp = HYPER_PARAMS[family(name)][1]
    weights, grads = initial_weights(), gradients()
    got, _ = run_gc_mm(name, hp, torch.float64, weights, grads)
    no_gc = run_reference(name, hp, weights, grads, gc_mode=None)
    assert not np.allclose(got[0], no_gc[0], atol=1e-6)


@pytest.mark.parametrize('name', ALL_NAMES)
def test_gc_mode_rule_and_group_switch(name):
    """conv (ndim 4) is always centralized; fc only under *_GC; a group with
    gc_mode=None is plain."""
    hp = HYPER_PARAMS[family(name)][1]
    weights, grads = initial_weights(), gradients()
    params = [torch.tensor(w, requires_grad=True) for w in weights]
    opt = OPTIMIZERS.build(
        dict(type=name, params=[{'params': params[:3]},
                                {'params': params[3:], 'gc_mode': None}],
             **hp))
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = torch.tensor(g)
        opt.step()
    want = run_reference(name, hp, weights[:3], [g[:3] for g in grads])
    plain = run_reference(name, hp, weights[3:], [g[3:] for g in grads],
                          gc_mode=None)
    for p, w in zip(params, want + plain):
        np.testing.assert_allclose(p.detach().numpy(), w, rtol=1e-12,
                                   atol=1e-12)
    # The fc weight is centralized under conv_fc only.
    fc_plain = run_reference(name, hp, weights[2:3], [g[2:3] for g in grads],
                             gc_mode=None)[0]
    assert np.allclose(want[2], fc_plain) == ('GCC' in name)


@pytest.mark.parametrize('name', ['SGD_GC', 'SGDW_GC', 'Adam_GC', 'AdamW_GC'])
def test_row_means_of_weights_stay_fixed_without_decay(name):
    """GC projects the update: with SGD (and the "2" variants in general) a
    row's mean weight never moves."""
    hp = dict(lr=0.1, momentum=0.9) if 'SGD' in name else dict(lr=0.01)
    weights, grads = initial_weights(), gradients()
    got, _ = run_gc_mm(name, hp, torch.float64, weights, grads)
    if 'SGD' in name:
        for before, after in zip(weights[:3], got[:3]):
            np.testing.assert_allclose(
                project(after - before, 'conv_fc'), after - before,
                atol=1e-12)
    # The row of length 1 is frozen by GC.
    np.testing.assert_array_equal(got[4], weights[4])


TORCH_EQUIVALENTS = [
    ('SGD_GC', dict(lr=0.1, momentum=0.9, weight_decay=0.01),
     torch.optim.SGD, 0.),
    ('SGD_GC', dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
     torch.optim.SGD, 0.),
    ('Adam_GC', dict(lr=0.01, weight_decay=0.01, amsgrad=True),
     torch.optim.Adam, 1e-6),
    ('Adagrad_GC', dict(lr=0.1, lr_decay=0.01, weight_decay=0.01,
                        initial_accumulator_value=0.1), torch.optim.Adagrad,
     0.),
]


@pytest.mark.parametrize('name,hp,torch_cls,tol', TORCH_EQUIVALENTS)
@pytest.mark.parametrize('gc_mode', ['class', None])
def test_equal_to_torch_where_formulas_coincide(name, hp, torch_cls, tol,
                                                gc_mode):
    """1-D tensors are never centralized, and with gc_mode=None nothing is:
    then SGD_GC, Adam_GC and Adagrad_GC are torch's SGD, Adam and Adagrad."""
    shapes = [(7, )] if gc_mode == 'class' else SHAPES
    weights = initial_weights(shapes=shapes)
    grads = gradients(shapes=shapes)
    extra = {} if gc_mode == 'class' else {'gc_mode': None}
    # The plain path does torch's arithmetic in torch's order: bit-equal.
    # (The fast path agrees with the plain path to rounding, tested above.)
    if name in SGD_NAMES:
        extra['blocked'] = False
    got, _ = run_gc_mm(name, hp, torch.float32, weights, grads, **extra)
    params = [torch.tensor(w, dtype=torch.float32, requires_grad=True)
              for w in weights]
    opt = torch_cls(params, foreach=False, **hp)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = torch.tensor(g, dtype=torch.float32)
        opt.step()
    for g, p in zip(got, params):
        np.testing.assert_allclose(g, p.detach().double().numpy(), rtol=tol,
                                   atol=tol)


def _save_load(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize('name,hp', [
    pytest.param(name, {**HYPER_PARAMS[family(name)][-1], **path},
                 id=f'{name}{"-plain" if path else ""}')
    for name in ALL_NAMES for path in paths(name)])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_resumes_identically(name, hp, dtype):
    grads = gradients(steps=6)
    weights = initial_weights()

    def make():
        params = [torch.tensor(w, dtype=dtype, requires_grad=True)
                  for w in weights]
        return params, OPTIMIZERS.build(dict(type=name, params=params, **hp))

    def run(params, opt, steps):
        for step_grads in steps:
            for p, g in zip(params, step_grads):
                p.grad = torch.tensor(g, dtype=dtype)
            opt.step()

    params, opt = make()
    run(params, opt, grads[:3])
    saved_params = [p.detach().clone() for p in params]
    saved_state = _save_load(opt.state_dict())
    run(params, opt, grads[3:])

    resumed, opt2 = make()
    with torch.no_grad():
        for p, s in zip(resumed, saved_params):
            p.copy_(s)
    opt2.load_state_dict(saved_state)
    for state in opt2.state.values():
        for key, value in state.items():
            if torch.is_tensor(value) and key != 'step':
                assert value.dtype == (torch.float32 if dtype ==
                                       torch.bfloat16 else dtype), key
    run(resumed, opt2, grads[3:])
    for a, b in zip(params, resumed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize('name', ALL_NAMES)
@pytest.mark.parametrize('dtype,tol', [(torch.bfloat16, 3e-2),
                                       (torch.float16, 5e-3)])
def test_half_precision_keeps_float32_statistics(name, dtype, tol):
    hp = HYPER_PARAMS[family(name)][1]
    weights = [w.astype(np.float64) for w in initial_weights()]
    # Weights exactly representable in the half type, so only the update's
    # rounding differs from the reference.
    weights = [torch.tensor(w).to(dtype).double().numpy() for w in weights]
    grads = gradients(steps=3)
    got, opt = run_gc_mm(name, hp, dtype, weights, grads)
    want = run_reference(name, hp, weights, grads)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol)
    for state in opt.state.values():
        for key, value in state.items():
            if torch.is_tensor(value):
                assert value.dtype == torch.float32, key


@pytest.mark.parametrize('name', ['Adam_GC', 'Adam_GCC'])
@pytest.mark.parametrize('torch_fused', [True, False],
                         ids=['torch-fused', 'plain'])
def test_adam_gc_paths_match_reference(name, torch_fused, monkeypatch):
    """Adam_GC(C) hands the update to torch's fused Adam on CPU and CUDA
    and takes the plain path elsewhere; both match the reference."""
    calls = []
    original = torch._fused_adam_
    monkeypatch.setattr(torch, '_fused_adam_', lambda *args, **kwargs: (
        calls.append(len(args[0])), original(*args, **kwargs)))
    if not torch_fused:
        monkeypatch.setattr(gc_mm.optimizers.adam,
                            '_TORCH_FUSED_ADAM_DEVICES', ())
    for hp in HYPER_PARAMS['adam']:
        weights, grads = initial_weights(), gradients()
        got, _ = run_gc_mm(name, hp, torch.float64, weights, grads)
        want = run_reference(name, hp, weights, grads)
        for g, w, shape in zip(got, want, SHAPES):
            np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12,
                                       err_msg=f'{name} {shape} {hp}')
    # One call per step, for all the tensors of the group.
    assert calls == ([len(SHAPES)] * len(grads) * len(HYPER_PARAMS['adam'])
                     if torch_fused else [])


def test_params_without_grad_are_skipped_and_groups_work():
    a = torch.nn.Parameter(torch.randn(4, 3))
    b = torch.nn.Parameter(torch.randn(4, 3))
    opt = OPTIMIZERS.build(
        dict(type='SGD_GC', params=[a], lr=0.1, momentum=0.9))
    opt.add_param_group({'params': [b], 'lr': 0.5, 'gc_mode': None})
    assert opt.param_groups[1]['momentum'] == 0.9
    b_before = b.detach().clone()
    a.grad = torch.ones(4, 3)
    opt.step()
    assert torch.equal(b, b_before) and b not in opt.state
    a.grad = torch.randn(4, 3)
    b.grad = torch.randn(4, 3)
    expected_b = b.detach() - 0.5 * b.grad  # plain SGD, first momentum step
    opt.step()
    torch.testing.assert_close(b.detach(), expected_b)
    opt.zero_grad()
    assert a.grad is None and b.grad is None


def test_loads_a_state_dict_without_gc_options():
    """A checkpoint of torch's SGD (or an older gc_mm) lacks gc_mode and
    blocked: the defaults fill them in."""
    w = torch.nn.Parameter(torch.randn(4, 3))
    torch_opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    w.grad = torch.randn(4, 3)
    torch_opt.step()
    opt = OPTIMIZERS.build(dict(type='SGD_GC', params=[w], lr=0.1,
                                momentum=0.9))
    opt.load_state_dict(torch_opt.state_dict())
    assert opt.param_groups[0]['gc_mode'] == 'conv_fc'
    assert opt.param_groups[0]['blocked'] is True
    opt.step()


def test_closure_is_evaluated_with_grad():
    w = torch.nn.Parameter(torch.randn(3, 4))
    opt = OPTIMIZERS.build(dict(type='Adam_GC', params=[w], lr=0.1))

    def closure():
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() > 0 and opt.state[w]['step'] == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('name', ALL_NAMES)
def test_cuda_matches_cpu(name):
    hp = HYPER_PARAMS[family(name)][1]
    weights, grads = initial_weights(), gradients()
    cpu, _ = run_gc_mm(name, hp, torch.float32, weights, grads)
    params = [torch.tensor(w, dtype=torch.float32, device='cuda',
                           requires_grad=True) for w in weights]
    opt = OPTIMIZERS.build(dict(type=name, params=params, **hp))
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = torch.tensor(g, dtype=torch.float32, device='cuda')
        opt.step()
    for c, p in zip(cpu, params):
        np.testing.assert_allclose(p.detach().cpu().double().numpy(), c,
                                   rtol=1e-5, atol=1e-5)
