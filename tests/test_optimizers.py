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
# The paths that leave gradients untouched.
SGD_FAST_PATHS = [pytest.param({'fused': False}, id='blocked'),
                  pytest.param({'foreach': True}, id='foreach'),
                  pytest.param({'fused': True}, id='fused')]


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


@pytest.mark.parametrize('name', SGD_NAMES)
@pytest.mark.parametrize('path', SGD_FAST_PATHS)
def test_fast_and_plain_paths_agree_with_mixed_groups_and_dtypes(name, path):
    """One group with GC off; float32, float64 and bfloat16 tensors."""
    weights, grads = initial_weights(), gradients()
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float32,
              torch.float64]
    results = []
    for options in (path, {'blocked': False}):
        params = [torch.tensor(w, dtype=dtype, requires_grad=True)
                  for w, dtype in zip(weights, dtypes)]
        opt = OPTIMIZERS.build(
            dict(type=name, params=[{'params': params[:3]},
                                    {'params': params[3:], 'gc_mode': None}],
                 lr=0.1, momentum=0.9, weight_decay=0.01, **options))
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = torch.tensor(g, dtype=p.dtype)
            opt.step()
        results.append(params)
    for fast, plain in zip(*results):
        torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name', SGD_NAMES)
@pytest.mark.parametrize('block', [1, 8, 40])
def test_fast_path_blocks_of_rows_match_reference(name, block, monkeypatch):
    """Small blocks: several per tensor, and rows longer than a block."""
    monkeypatch.setattr(gc_mm.optimizers.sgd, '_BLOCK_ELEMENTS', block)
    for hp in HYPER_PARAMS['sgd']:
        weights, grads = initial_weights(), gradients()
        got, _ = run_gc_mm(name, hp, torch.float64, weights, grads,
                           fused=False)
        want = run_reference(name, hp, weights, grads)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)


# Shapes that split the fused kernel's work: rows longer than its block of
# partial sums (1024) with a remainder, rows shared among threads (over
# 2**15 elements), a long 1-D tensor (split by elements), a conv.
FUSED_SHAPES = [(3, 2500), (40, 1001), (70001, ), (64, 33, 3, 3)]
# Several tensors per row length (27: three convs and, under 'conv_fc', an
# fc), more than the largest tensor (216) holds, so the multi-tensor path
# stacks tensors in a batch and splits a row length into several batches.
BATCHED_SHAPES = [(6, 3, 3, 3), (5, ), (8, 27), (4, 3, 3, 3), (7, ),
                  (2, 3, 3, 3), (6, 2, 1, 1), (3, 2)]


@pytest.mark.parametrize('name', SGD_NAMES)
@pytest.mark.parametrize('path,shapes', [
    pytest.param({'fused': True}, FUSED_SHAPES, id='fused'),
    pytest.param({'foreach': True}, BATCHED_SHAPES, id='foreach'),
])
def test_paths_on_shapes_that_split_their_work_match_reference(
        name, path, shapes):
    for hp in HYPER_PARAMS['sgd']:
        weights = initial_weights(shapes=shapes)
        grads = gradients(steps=3, shapes=shapes)
        got, _ = run_gc_mm(name, hp, torch.float64, weights, grads, **path)
        want = run_reference(name, hp, weights, grads)
        for g, w, shape in zip(got, want, shapes):
            np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12,
                                       err_msg=f'{name} {shape} {hp}')


def test_multi_tensor_batches_share_device_dtype_and_row_length():
    params = [torch.zeros(s) for s in BATCHED_SHAPES]
    params[3] = params[3].double()
    batches = [(cols, [(tuple(p.shape), p.dtype) for p in batch])
               for batch, cols in gc_mm.optimizers.sgd._batches(
                   params, 'conv_fc', 216)]
    f32, f64 = torch.float32, torch.float64
    assert sorted(batches, key=str) == sorted([
        (27, [((6, 3, 3, 3), f32)]),  # with (8, 27) it would pass 216
        (27, [((8, 27), f32)]),
        (27, [((2, 3, 3, 3), f32)]),
        (27, [((4, 3, 3, 3), f64)]),
        (0, [((5, ), f32), ((7, ), f32)]),  # not centralized
        (2, [((6, 2, 1, 1), f32), ((3, 2), f32)]),
    ], key=str)


def test_install_built_the_kernel_for_this_cpu():
    """tools/install.sh compiles the kernel, so SGD's default on CPU runs
    it without a compile on first use."""
    kernel = gc_mm.kernels.installed('sgd')
    assert kernel is not None, (
        'gc_mm was installed without its kernel: reinstall with '
        'pip install --no-build-isolation --use-pep517 -e .')
    assert kernel.torch_version == torch.__version__.split('+')[0]


def test_installed_kernel_is_not_used_with_another_torch(monkeypatch):
    """After a torch upgrade the installed build is left alone (with a
    warning to reinstall) and SGD takes the blocked path."""
    monkeypatch.setattr(torch, '__version__', '9.9.9')
    assert gc_mm.kernels.installed.__wrapped__('sgd') is None
    gc_mm.kernels.installed.cache_clear()
    try:
        params = [torch.nn.Parameter(torch.ones(4, 3))]
        opt = OPTIMIZERS.build(dict(type='SGD_GC', params=params, lr=0.1))
        params[0].grad = torch.ones(4, 3)
        opt.step()  # the blocked path, no kernel
        assert gc_mm.kernels.installed('sgd') is None
    finally:
        gc_mm.kernels.installed.cache_clear()


@pytest.mark.parametrize('device,options,path', [
    ('cpu', {}, '_update_fused'),  # the kernel installed
    ('meta', {}, '_update_multi_tensor'),  # any device but the CPU
    ('cpu', {'fused': False}, '_update_blocked'),
    ('cpu', {'foreach': True}, '_update_multi_tensor'),
    ('cpu', {'blocked': False}, 'plain'),
    ('meta', {'foreach': False}, '_update_blocked'),
])
def test_default_path_depends_on_the_device(device, options, path,
                                            monkeypatch):
    taken = []
    for name in ('_update_blocked', '_update_multi_tensor', '_update_fused',
                 '_update_tensor'):
        original = getattr(gc_mm.optimizers.sgd._SGDBase, name)
        monkeypatch.setattr(
            gc_mm.optimizers.sgd._SGDBase, name,
            lambda self, *args, name=name, original=original: (
                taken.append(name), original(self, *args)))
    params = [torch.nn.Parameter(torch.ones(s, device=device))
              for s in SHAPES]
    opt = OPTIMIZERS.build(dict(type='SGD_GC', params=params, lr=0.1,
                                momentum=0.9, **options))
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert set(taken) == {'_update_tensor' if path == 'plain' else path}


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


@pytest.mark.parametrize('path', SGD_FAST_PATHS)
def test_momentum_starts_per_tensor_when_grads_arrive_late(path):
    """A tensor whose gradient first comes at step 2 starts its momentum
    then, batched with tensors already under way."""
    weights, grads = initial_weights(), gradients(steps=3)
    results = []
    for options in (path, {'blocked': False}):
        params = [torch.tensor(w, requires_grad=True) for w in weights]
        opt = OPTIMIZERS.build(dict(
            type='SGD_GC', params=params, **HYPER_PARAMS['sgd'][2],
            **options))
        for step, step_grads in enumerate(grads):
            for i, (p, g) in enumerate(zip(params, step_grads)):
                p.grad = None if step == 0 and i % 2 else torch.tensor(g)
            opt.step()
        results.append(params)
    for fast, plain in zip(*results):
        torch.testing.assert_close(fast, plain, rtol=1e-12, atol=1e-12)


def test_fused_path_gives_the_same_bits_on_any_number_of_threads():
    """Rows are split among threads, each row summed by one of them, so
    the thread count does not change a bit of the result."""
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            got, _ = run_gc_mm('SGD_GC', HYPER_PARAMS['sgd'][2],
                               torch.float32,
                               initial_weights(shapes=FUSED_SHAPES),
                               gradients(steps=2, shapes=FUSED_SHAPES),
                               fused=True)
            results.append(got)
    finally:
        torch.set_num_threads(threads)
    for got in results[1:]:
        for a, b in zip(results[0], got):
            np.testing.assert_array_equal(a, b)


def test_kernel_built_on_first_use_matches_the_installed_one():
    """Without an installed kernel, fused=True compiles the same source with
    the same flags on first use (cached in torch's extension directory)."""
    built = gc_mm.kernels.build('sgd')
    assert built is not gc_mm.kernels.installed('sgd')
    results = []
    for kernel in (built, gc_mm.kernels.installed('sgd')):
        torch.manual_seed(0)
        w, g, buf = (torch.randn(*FUSED_SHAPES[1]) for _ in range(3))
        kernel.sgd_gc_step(w, g, buf, True, 0.1, 0.01, 0.9, 0., True, False,
                           False)
        results.append((w, buf))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('path', SGD_FAST_PATHS)
def test_fast_paths_leave_gradients_untouched(path):
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    opt = OPTIMIZERS.build(dict(type='SGD_GC', params=params, lr=0.1,
                                momentum=0.9, weight_decay=0.1, **path))
    for p in params:
        p.grad = torch.randn(p.shape)
    before = [p.grad.clone() for p in params]
    opt.step()
    opt.step()
    for p, g in zip(params, before):
        assert torch.equal(p.grad, g)


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


@pytest.mark.parametrize('path', [{}, *SGD_OTHER_PATHS])
def test_empty_parameters_are_stepped_over(path):
    """A model may hold empty tensors (a zero-width layer): every path
    steps, and the other parameters move as they would without them."""
    weights, grads = initial_weights(), gradients(steps=2)
    want, _ = run_gc_mm('SGD_GC', HYPER_PARAMS['sgd'][1], torch.float64,
                        weights, grads, **path)
    empty = [torch.nn.Parameter(torch.empty(0, 3, dtype=torch.float64)),
             torch.nn.Parameter(torch.empty(4, 0, 3, 3, dtype=torch.float64))]
    params = [torch.tensor(w, requires_grad=True) for w in weights]
    opt = OPTIMIZERS.build(dict(type='SGD_GC', params=empty + params,
                                **HYPER_PARAMS['sgd'][1], **path))
    for step_grads in grads:
        for p in empty:
            p.grad = torch.zeros_like(p)
        for p, g in zip(params, step_grads):
            p.grad = torch.tensor(g)
        opt.step()
    for p, w in zip(params, want):
        np.testing.assert_array_equal(p.detach().numpy(), w)
