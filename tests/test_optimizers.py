"""Exact parity of every GC optimizer with the float64 reference, and the
torch-optimizer behaviour a runner relies on."""
import io

import numpy as np
import pytest
import torch
from mmengine.registry import OPTIM_WRAPPERS, OPTIMIZERS

import gc_mm.optim_wrapper  # registers the wrappers
import gc_mm.optimizers.adam  # registers the optimizers
from conftest import needs_cpu_amp
from gc_mm.optimizers import GCOptimizer
from reference import (ADAM_NAMES, ALL_NAMES, SGD_NAMES, Reference,
                       default_mode, project)

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


# SGD's paths: its default (on CPU the kernel built at install, else the
# plain path; elsewhere the multi-tensor one) and each one asked for.
SGD_PATHS = {'default': {}, 'fused': {'fused': True},
             'foreach': {'foreach': True},
             'plain': {'fused': False, 'foreach': False}}
# The Adam and Adagrad families: the C++ kernel on CPU (fused=True builds
# it on first use where it was not installed) or the plain path; Adam_GC and
# Adam_GCC also hand float32/float64 tensors to torch's fused Adam (on CUDA;
# on CPU when the kernel is off and the tests let them).
ADAPTIVE_PATHS = {'default': {}, 'fused': {'fused': True},
                  'plain': {'fused': False}}
TORCH_FUSED_NAMES = ('Adam_GC', 'Adam_GCC')


def paths(name):
    """Each implementation path of an optimizer, by name."""
    if name in SGD_NAMES:
        return list(SGD_PATHS)
    torch_fused = ['torch_fused'] if name in TORCH_FUSED_NAMES else []
    return ['fused', *torch_fused, 'plain']


def take_path(name, path, monkeypatch):
    """Send the next steps of ``name`` down ``path``: the options to build
    it with, and (Adam) the devices torch's fused Adam is used on."""
    if name in SGD_NAMES:
        return dict(SGD_PATHS[path])
    if (path == 'torch_fused'
            and 'cpu' not in gc_mm.optimizers.adam._torch_fused_adam_devices()):
        pytest.skip("this torch's fused Adam has no CPU kernel (torch < 2.4)")
    devices = ('cpu', 'cuda') if path == 'torch_fused' else ()
    monkeypatch.setattr(gc_mm.optimizers.adam, '_torch_fused_adam_devices',
                        lambda: devices)
    return {'fused': path == 'fused'}


def all_paths():
    return [pytest.param(name, path, id=f'{name}-{path}')
            for name in ALL_NAMES for path in paths(name)]


def cases():
    for name in ALL_NAMES:
        for i, hp in enumerate(HYPER_PARAMS[family(name)]):
            options = SGD_PATHS if name in SGD_NAMES else ADAPTIVE_PATHS
            for path, path_options in options.items():
                yield pytest.param(name, {**hp, **path_options},
                                   id=f'{name}-{i}-{path}')


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


def assert_params_match_reference(params, name, hp, weights, grads):
    """float64 parameters after the steps equal the reference's, to 1e-12."""
    want = run_reference(name, hp, weights, grads)
    for p, w, shape in zip(params, want, SHAPES):
        np.testing.assert_allclose(p.detach().numpy(), w, rtol=1e-12,
                                   atol=1e-12, err_msg=shape)


def test_every_registered_gc_optimizer_is_tested():
    """The tests parametrized over ALL_NAMES cover the whole registry
    (RAdam_GC has its own reference, in test_radam.py)."""
    registered = {
        name for name, cls in OPTIMIZERS.module_dict.items()
        if isinstance(cls, type) and issubclass(cls, GCOptimizer)}
    assert registered == set(ALL_NAMES) | {'RAdam_GC'}


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
@pytest.mark.parametrize('path', ['plain', 'fused'])
def test_equal_to_torch_where_formulas_coincide(name, hp, torch_cls, tol,
                                                gc_mode, path):
    """1-D tensors are never centralized, and with gc_mode=None nothing is:
    then SGD_GC, Adam_GC and Adagrad_GC are torch's SGD, Adam and Adagrad.
    The plain path does torch's arithmetic in torch's order: bit-equal for
    SGD and Adagrad. The C++ kernel (built on first use where it was not
    installed) agrees to float32 rounding."""
    shapes = [(7, )] if gc_mode == 'class' else SHAPES
    weights = initial_weights(shapes=shapes)
    grads = gradients(shapes=shapes)
    extra = {} if gc_mode == 'class' else {'gc_mode': None}
    if path == 'plain':
        extra.update(SGD_PATHS['plain'] if name in SGD_NAMES else
                     {'fused': False})
    else:
        extra['fused'] = True
        tol = max(tol, 1e-6)
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


def laid_out(array, dtype, layout='contiguous'):
    """A tensor holding ``array`` in ``layout``: 'channels_last' (4-D
    tensors; the others stay contiguous), 'transposed' (dims in reverse
    order: dense, not contiguous), 'sliced' (every other element of a wider
    tensor: not dense)."""
    tensor = torch.tensor(array, dtype=dtype)
    if layout == 'channels_last' and tensor.ndim == 4:
        return tensor.to(memory_format=torch.channels_last)
    if layout == 'transposed' and tensor.ndim > 1:
        dims = tuple(reversed(range(tensor.ndim)))
        return tensor.permute(dims).contiguous().permute(dims)
    if layout == 'sliced':
        wide = torch.zeros(tensor.shape + (2, ), dtype=dtype)
        wide[..., 0] = tensor
        return wide[..., 0]
    return tensor


# Tolerance against the float64 reference, by the least precise dtype of a
# run (the parity tests' and the half-precision test's).
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 3e-2}
F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16


def resumes():
    """(name, before, after): the path, dtype and layout a run is saved
    from after 3 steps and resumed into for 3 more."""
    for name in ALL_NAMES:
        names_paths = paths(name)
        first = names_paths[0]
        for path in names_paths:  # the same run, resumed: bit-equal
            for dtype in (F32, BF16):
                yield name, (path, dtype, 'contiguous'), (path, dtype,
                                                          'contiguous')
        others = [p for p in names_paths if p != 'default']
        for before in others:  # across paths
            for after in others:
                if after != before:
                    yield name, (before, F64, 'contiguous'), (after, F64,
                                                              'contiguous')
        for path in names_paths:  # across layouts
            yield name, (path, F32, 'channels_last'), (path, F32,
                                                       'contiguous')
            yield name, (path, F32, 'contiguous'), (path, F32,
                                                    'channels_last')
        for before, after in [(F64, F32), (F32, F64), (BF16, F32),
                              (F32, BF16)]:  # across dtypes
            yield name, (first, before, 'contiguous'), (first, after,
                                                        'contiguous')


def _resume_id(name, before, after):
    parts = [name] + [
        str(a if a == b else f'{a}-to-{b}').replace('torch.', '')
        for a, b in zip(before, after)]
    return '-'.join(parts)


@pytest.mark.parametrize('name,before,after', [
    pytest.param(*case, id=_resume_id(*case)) for case in resumes()])
def test_state_dict_round_trip_resumes(name, before, after, monkeypatch):
    """A run saved after 3 steps and resumed for 3 more, in another path,
    layout or dtype, ends where an uninterrupted run does: bit-equal to
    it if nothing changes, else equal to the float64 reference to the
    precision of the dtypes involved. The resumed optimizer keeps the path
    options it was built with, and its state has its parameters' layout
    (float32 for half-precision parameters)."""
    hp = HYPER_PARAMS[family(name)][-1]
    grads = gradients(steps=6)
    # Weights exact in bfloat16, so only the updates' rounding differs.
    weights = [torch.tensor(w).to(BF16).double().numpy()
               for w in initial_weights()]

    def make(path, dtype, layout):
        options = take_path(name, path, monkeypatch)
        params = [torch.nn.Parameter(laid_out(w, dtype, layout))
                  for w in weights]
        return params, OPTIMIZERS.build(
            dict(type=name, params=params, **hp, **options)), options

    def run(params, opt, steps, dtype, layout):
        for step_grads in steps:
            for p, g in zip(params, step_grads):
                p.grad = laid_out(g, dtype, layout)
            opt.step()

    params, opt, _ = make(*before)
    run(params, opt, grads[:3], *before[1:])
    saved_params = [p.detach().clone() for p in params]
    saved_state = _save_load(opt.state_dict())
    run(params, opt, grads[3:], *before[1:])

    resumed, opt2, options = make(*after)
    with torch.no_grad():
        for p, s in zip(resumed, saved_params):
            p.copy_(s)
    opt2.load_state_dict(saved_state)
    for key in type(opt2).path_options:
        assert opt2.param_groups[0][key] == options.get(key), key
    for p in resumed:
        for key, value in opt2.state[p].items():
            if torch.is_tensor(value) and key != 'step':
                assert value.dtype == (F32 if p.dtype == BF16 else
                                       p.dtype), key
                assert value.stride() == p.stride(), key
    run(resumed, opt2, grads[3:], *after[1:])
    if before == after:
        for a, b in zip(params, resumed):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    else:
        tol = max(TOLERANCE[before[1]], TOLERANCE[after[1]])
        want = run_reference(name, hp, weights, grads)
        for p, w, shape in zip(resumed, want, SHAPES):
            np.testing.assert_allclose(p.detach().double().numpy(), w,
                                       rtol=tol, atol=tol, err_msg=shape)


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


@pytest.mark.parametrize('name', TORCH_FUSED_NAMES)
@pytest.mark.parametrize('path', ['torch_fused', 'plain'])
def test_adam_gc_paths_match_reference(name, path, monkeypatch):
    """Adam_GC(C) without the kernel hands the update to torch's fused
    Adam (its public functional API) on CPU and CUDA and takes the plain
    path elsewhere; both match the reference."""
    calls = []
    original = gc_mm.optimizers.adam.adam
    monkeypatch.setattr(gc_mm.optimizers.adam, 'adam', lambda *args, **kw: (
        calls.append((len(args[0]), kw['fused'])), original(*args, **kw)))
    options = take_path(name, path, monkeypatch)
    for hp in HYPER_PARAMS['adam']:
        weights, grads = initial_weights(), gradients()
        got, _ = run_gc_mm(name, hp, torch.float64, weights, grads, **options)
        want = run_reference(name, hp, weights, grads)
        for g, w, shape in zip(got, want, SHAPES):
            np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12,
                                       err_msg=f'{name} {shape} {hp}')
    # One call per step, for all the tensors of the group.
    assert calls == ([(len(SHAPES), True)] * len(grads) *
                     len(HYPER_PARAMS['adam']) if path == 'torch_fused'
                     else [])


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
    """A checkpoint of torch's SGD (or an older gc_mm) lacks gc_mode: the
    defaults fill it in; its path options (fused, foreach) do not win
    over the running optimizer's."""
    w = torch.nn.Parameter(torch.randn(4, 3))
    torch_opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    w.grad = torch.randn(4, 3)
    torch_opt.step()
    opt = OPTIMIZERS.build(dict(type='SGD_GC', params=[w], lr=0.1,
                                momentum=0.9, fused=False, foreach=False))
    opt.load_state_dict(torch_opt.state_dict())
    group = opt.param_groups[0]
    assert group['gc_mode'] == 'conv_fc'
    assert group['fused'] is False and group['foreach'] is False
    opt.step()


@pytest.mark.cuda
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


@pytest.mark.parametrize('name,path', all_paths())
def test_step_uses_the_gradients_its_closure_computes(name, path,
                                                      monkeypatch):
    """step(closure) runs the closure with grad enabled (step itself runs
    without) and updates with the gradients it leaves, not older ones."""
    hp = HYPER_PARAMS[family(name)][1]
    options = take_path(name, path, monkeypatch)
    weights, grads = initial_weights(), gradients(steps=3)
    params = [torch.nn.Parameter(torch.tensor(w)) for w in weights]
    opt = OPTIMIZERS.build(dict(type=name, params=params, **hp, **options))
    for step_grads in grads:

        def closure():
            assert torch.is_grad_enabled()
            opt.zero_grad()
            # A loss whose gradient is this step's.
            loss = sum((p * torch.tensor(g)).sum()
                       for p, g in zip(params, step_grads))
            loss.backward()
            return loss

        for p in params:  # stale gradients, which the closure replaces
            p.grad = torch.full_like(p, 100.)
        loss = opt.step(closure)
        assert loss.requires_grad
    assert_params_match_reference(params, name, hp, weights, grads)


@pytest.mark.parametrize('name,path', all_paths())
@pytest.mark.parametrize('param_layout,grad_layout', [
    ('channels_last', 'channels_last'), ('channels_last', 'contiguous'),
    ('contiguous', 'channels_last'), ('transposed', 'transposed'),
    ('transposed', 'contiguous'), ('contiguous', 'transposed'),
    ('sliced', 'contiguous'), ('contiguous', 'sliced')])
def test_parameters_and_gradients_in_any_layout_match_reference(
        name, path, param_layout, grad_layout, monkeypatch):
    """channels_last, transposed (dense, not contiguous) and sliced (not
    dense) parameters and gradients, in any pairing, on every path."""
    hp = HYPER_PARAMS[family(name)][-1]
    options = take_path(name, path, monkeypatch)
    weights, grads = initial_weights(), gradients()
    params = [torch.nn.Parameter(laid_out(w, F64, param_layout))
              for w in weights]
    opt = OPTIMIZERS.build(dict(type=name, params=params, **hp, **options))
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = laid_out(g, F64, grad_layout)
        opt.step()
    assert_params_match_reference(params, name, hp, weights, grads)


@pytest.mark.parametrize('name,path', all_paths())
def test_parameters_may_change_layout_between_steps(name, path, monkeypatch):
    """model.to(memory_format=torch.channels_last) after some steps: the
    state made in the old layout is used in the new one."""
    hp = HYPER_PARAMS[family(name)][-1]
    options = take_path(name, path, monkeypatch)
    weights, grads = initial_weights(), gradients()
    params = [torch.nn.Parameter(torch.tensor(w)) for w in weights]
    opt = OPTIMIZERS.build(dict(type=name, params=params, **hp, **options))
    for step, step_grads in enumerate(grads):
        if step == 3:
            for p in params:
                p.data = laid_out(p.data.numpy(), F64, 'channels_last')
        for p, g in zip(params, step_grads):
            p.grad = laid_out(g, F64, 'channels_last' if step >= 3 else
                              'contiguous')
        opt.step()
    assert_params_match_reference(params, name, hp, weights, grads)


@pytest.mark.parametrize('name,path', all_paths())
def test_complex_parameters_are_refused_before_anything_moves(
        name, path, monkeypatch):
    """Refused when added (ValueError naming the optimizer, the group and
    the shape), and at the step for a parameter made complex since, before
    any parameter moves."""
    options = dict(lr=0.1, **take_path(name, path, monkeypatch))
    real = torch.nn.Parameter(torch.randn(4, 3, 3, 3))
    complex_ = torch.nn.Parameter(torch.randn(5, 3, dtype=torch.complex64))
    refused = (rf'{name} cannot update a torch.complex64 parameter '
               rf'\(param group {{}}, shape \(5, 3\)\)')
    with pytest.raises(ValueError, match=refused.format(0)):
        OPTIMIZERS.build(dict(type=name, params=[real, complex_], **options))
    opt = OPTIMIZERS.build(dict(type=name, params=[real], **options))
    with pytest.raises(ValueError, match=refused.format(1)):
        opt.add_param_group({'params': [complex_]})
    assert len(opt.param_groups) == 1

    later = torch.nn.Parameter(torch.randn(5, 3))
    opt.add_param_group({'params': [later]})
    later.data = later.data.to(torch.complex64)  # as module.to(dtype) does
    real.grad = torch.randn(4, 3, 3, 3)
    later.grad = torch.randn(5, 3, dtype=torch.complex64)
    before = real.detach().clone()
    with pytest.raises(ValueError, match=refused.format(1)):
        opt.step()
    assert torch.equal(real, before) and not opt.state


@pytest.mark.parametrize('name,path', all_paths())
@pytest.mark.parametrize('dtype', [F64, F32, BF16, torch.float16])
def test_what_step_leaves_in_grad(name, path, dtype, monkeypatch):
    hp = HYPER_PARAMS[family(name)][1]  # with weight decay
    options = take_path(name, path, monkeypatch)
    weights = initial_weights()
    params = [torch.nn.Parameter(torch.tensor(w, dtype=dtype))
              for w in weights]
    opt = OPTIMIZERS.build(dict(type=name, params=params, **hp, **options))
    for step_grads in gradients(steps=2):
        grads = [torch.tensor(g, dtype=dtype) for g in step_grads]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        # README: the gradient as backward left it, on every path and
        # dtype, as torch's optimizers leave it (the authors' code, and
        # gc_mm's plain paths before, centralized it in place).
        for p, g in zip(params, grads):
            assert torch.equal(p.grad, g), tuple(p.shape)


@pytest.mark.parametrize('wrapper', [
    'GCOptimWrapper', pytest.param('AmpGCOptimWrapper', marks=needs_cpu_amp)])
def test_wrappers_leave_the_centralized_gradient_in_grad(wrapper):
    """README's table: the wrappers centralize p.grad in place (after the
    loss scaler unscaled it, under AMP) before the wrapped optimizer's
    step; torch's SGD then leaves it as it is."""
    weights, grads = initial_weights(), gradients(steps=1)[0]
    params = [torch.nn.Parameter(torch.tensor(w, dtype=F32))
              for w in weights]
    optim_wrapper = OPTIM_WRAPPERS.build(dict(
        type=wrapper, optimizer=torch.optim.SGD(params, lr=0.1)))
    # A loss whose gradient is ``grads`` (scaled by the AMP wrapper).
    loss = sum((p * torch.tensor(g, dtype=F32)).sum()
               for p, g in zip(params, grads))
    optim_wrapper.backward(loss)
    optim_wrapper.step()
    for p, g in zip(params, grads):
        np.testing.assert_allclose(p.grad.double().numpy(),
                                   project(g, 'conv_fc'), rtol=1e-5,
                                   atol=1e-6)
