"""SGD_GC's paths (the C++ kernel, the multi-tensor path, the plain path)
against each other and the float64 reference: their routing, layouts,
closures, what they leave in p.grad, failures, and the kernel's builds."""
import importlib.machinery
import importlib.metadata
import io
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from mmengine.registry import OPTIMIZERS

import gc_mm.kernels
import gc_mm.optimizers.sgd as sgd  # registers the optimizers
from reference import SGD_NAMES, project
from test_optimizers import (HYPER_PARAMS, SHAPES, gradients,
                             initial_weights, run_gc_mm, run_reference)

PLAIN = {'fused': False, 'foreach': False}
# Each path asked for by name, and the default (on CPU the kernel built at
# install).
PATHS = [pytest.param({}, id='default'),
         pytest.param(PLAIN, id='plain'),
         pytest.param({'foreach': True}, id='foreach'),
         pytest.param({'fused': True}, id='fused')]
FAST_PATHS = PATHS[2:]
# The default on CPU: the kernel built at install, else the plain path (an
# install without a compiler; test_install_built_the_kernel_for_this_cpu
# fails then).
CPU_DEFAULT = 'plain' if gc_mm.kernels.installed('sgd') is None else 'fused'
# The path each of PATHS takes for a regular CPU tensor.
PATH_TAKEN = {'default': CPU_DEFAULT, 'plain': 'plain',
              'foreach': 'multi_tensor', 'fused': 'fused'}
# Hyper-parameters under which every part of the step shows: decay,
# dampened momentum (so a buffer read on a first step changes the result).
DAMPENED = HYPER_PARAMS['sgd'][3]


def path_id(path):
    """The id in PATHS of a path's options."""
    return {(): 'default', ('foreach', 'fused'): 'plain',
            ('foreach', ): 'foreach',
            ('fused', ): 'fused'}[tuple(sorted(path))]


@pytest.fixture
def taken(monkeypatch):
    """path -> the tensors SGD hands to that path's function, step by step
    (a list of shapes per call)."""
    calls = {path: [] for path in sgd._PATHS}
    for path, function in list(sgd._PATHS.items()):

        def record(params, *args, path=path, function=function, **kwargs):
            calls[path].append([tuple(p.shape) for p in params])
            return function(params, *args, **kwargs)

        monkeypatch.setitem(sgd._PATHS, path, record)
    return calls


@pytest.mark.parametrize('name', SGD_NAMES)
@pytest.mark.parametrize('path', [PATHS[0], *FAST_PATHS])
def test_fast_and_plain_paths_agree_with_mixed_groups_and_dtypes(name, path):
    """One group with GC off; float32, float64 and bfloat16 tensors."""
    weights, grads = initial_weights(), gradients()
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float32,
              torch.float64]
    results = []
    for options in (path, PLAIN):
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
    batches = [(cols, [(tuple(params[i].shape), params[i].dtype)
                       for i in batch])
               for batch, cols in sgd._batches(params, 'conv_fc', 216)]
    f32, f64 = torch.float32, torch.float64
    assert sorted(batches, key=str) == sorted([
        (27, [((6, 3, 3, 3), f32)]),  # with (8, 27) it would pass 216
        (27, [((8, 27), f32)]),
        (27, [((2, 3, 3, 3), f32)]),
        (27, [((4, 3, 3, 3), f64)]),
        (0, [((5, ), f32), ((7, ), f32)]),  # not centralized
        (2, [((6, 2, 1, 1), f32), ((3, 2), f32)]),
    ], key=str)


def gc_mm_installed() -> bool:
    try:
        importlib.metadata.distribution('gc_mm')
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


# tools/test_torch.sh runs gc_mm from its sources (PYTHONPATH): no install
# built a kernel there.
needs_install = pytest.mark.skipif(
    not gc_mm_installed(), reason='gc_mm is not installed here (run from '
    'its sources): no kernel was built at install')


@needs_install
def test_install_built_the_kernel_for_this_cpu():
    """tools/install.sh compiles the kernel, for this CPU's instruction set
    and with OpenMP where torch has it, so SGD's default on CPU runs it
    without a compile on first use."""
    kernel = gc_mm.kernels.installed('sgd')
    assert kernel is not None, (
        'gc_mm was installed without its kernel: reinstall with '
        'pip install --no-build-isolation --use-pep517 -e .')
    assert kernel.torch_version == torch.__version__.split('+')[0]
    assert kernel.__name__.endswith(
        gc_mm.kernels.flags.module_name('sgd'))
    assert kernel.openmp == torch.backends.openmp.is_available()


@pytest.mark.parametrize(
    'build', [pytest.param('installed', marks=needs_install),
              'built on first use'])
@pytest.mark.parametrize('name', SGD_NAMES)
def test_both_kernel_builds_match_reference(build, name, monkeypatch):
    """The installed kernel and the one fused=True compiles on first use
    (torch's extension builder, cached in its extension directory), each
    through the optimizer, against the float64 reference."""
    kernel = (gc_mm.kernels.installed('sgd') if build == 'installed' else
              gc_mm.kernels.build('sgd'))
    assert kernel is not None
    assert (kernel is gc_mm.kernels.installed('sgd')) == (build ==
                                                          'installed')
    monkeypatch.setattr(gc_mm.kernels, 'load', lambda name: kernel)
    shapes = SHAPES + FUSED_SHAPES
    for hp in HYPER_PARAMS['sgd']:
        weights = initial_weights(shapes=shapes)
        grads = gradients(steps=3, shapes=shapes)
        got, _ = run_gc_mm(name, hp, torch.float64, weights, grads,
                           fused=True)
        want = run_reference(name, hp, weights, grads)
        for g, w, shape in zip(got, want, shapes):
            np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12,
                                       err_msg=f'{name} {shape} {hp}')


def test_installed_kernel_is_not_used_with_another_torch(monkeypatch, taken):
    """After a torch upgrade the installed build is left alone (with a
    warning to reinstall) and SGD's default on CPU is the plain path."""
    monkeypatch.setattr(torch, '__version__', '9.9.9')
    assert gc_mm.kernels.installed.__wrapped__('sgd') is None
    gc_mm.kernels.installed.cache_clear()
    try:
        params = [torch.nn.Parameter(torch.ones(4, 3))]
        opt = OPTIMIZERS.build(dict(type='SGD_GC', params=params, lr=0.1))
        params[0].grad = torch.ones(4, 3)
        opt.step()
        assert gc_mm.kernels.installed('sgd') is None
        assert taken == {'fused': [], 'multi_tensor': [],
                         'plain': [[(4, 3)]]}
    finally:
        gc_mm.kernels.installed.cache_clear()


def test_installed_kernel_that_does_not_load_is_not_used(monkeypatch,
                                                         tmp_path):
    """A kernel whose library does not load with this torch (built against
    another one: undefined symbols) is left alone with a warning, as one
    built for another torch version; before, it was skipped in silence."""
    module = f'_{gc_mm.kernels.module_name("sgd")}'
    (tmp_path / (module + importlib.machinery.EXTENSION_SUFFIXES[0])
     ).write_bytes(b'not a shared library')
    monkeypatch.setattr(gc_mm.kernels, '__path__',
                        [str(tmp_path), *gc_mm.kernels.__path__])
    monkeypatch.delitem(sys.modules, f'gc_mm.kernels.{module}', raising=False)
    logged = []
    monkeypatch.setattr(gc_mm.kernels, 'print_log',
                        lambda message, **kwargs: logged.append(message))
    assert gc_mm.kernels.installed.__wrapped__('sgd') is None
    assert len(logged) == 1 and 'does not load with torch' in logged[0]


@pytest.mark.parametrize('device,options,path', [
    ('cpu', {}, CPU_DEFAULT),
    ('meta', {}, 'multi_tensor'),  # any device but the CPU
    ('cpu', {'fused': False}, 'plain'),  # the default, less the kernel
    ('meta', {'fused': False}, 'multi_tensor'),
    ('cpu', {'foreach': True}, 'multi_tensor'),
    ('cpu', {'foreach': False}, CPU_DEFAULT),  # the default, less foreach
    ('meta', {'foreach': False}, 'plain'),
    ('cpu', PLAIN, 'plain'),
    ('meta', PLAIN, 'plain'),
    ('cpu', {'fused': True}, 'fused'),
])
def test_default_path_depends_on_the_device(device, options, path, taken):
    params = [torch.nn.Parameter(torch.ones(s, device=device))
              for s in SHAPES]
    opt = OPTIMIZERS.build(dict(type='SGD_GC', params=params, lr=0.1,
                                momentum=0.9, **options))
    assert type(opt).path(opt.param_groups[0], device == 'cpu') == path
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert {name for name, calls in taken.items() if calls} == {path}


def test_half_precision_and_empty_tensors_take_the_plain_path(taken):
    """What the kernel and the multi-tensor path cannot do never reaches
    them: half precision (its maths in float32), and empty tensors."""
    params = [torch.nn.Parameter(torch.ones(4, 3, dtype=dtype))
              for dtype in (torch.float32, torch.float64, torch.bfloat16,
                            torch.float16)]
    params.append(torch.nn.Parameter(torch.ones(0, 3)))
    for options in ({'fused': True}, {'foreach': True}):
        opt = OPTIMIZERS.build(dict(type='SGD_GC', params=params, lr=0.1,
                                    **options))
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    assert taken['plain'] == [[(4, 3), (4, 3), (0, 3)]] * 2
    assert taken['fused'] == taken['multi_tensor'] == [[(4, 3), (4, 3)]]


def test_fused_and_foreach_together_are_refused():
    with pytest.raises(ValueError, match='fused=True and foreach=True'):
        OPTIMIZERS.build(dict(type='SGD_GC', lr=0.1, fused=True,
                              foreach=True,
                              params=[torch.nn.Parameter(torch.ones(2))]))


def test_blocked_is_gone_and_old_checkpoints_load():
    """The cache-blocked path was removed: its option is refused, and a
    checkpoint of an optimizer that had it loads and resumes."""
    w = torch.nn.Parameter(torch.randn(4, 3))
    with pytest.raises(TypeError, match='blocked'):
        OPTIMIZERS.build(dict(type='SGD_GC', params=[w], lr=0.1,
                              blocked=False))
    opt = OPTIMIZERS.build(dict(type='SGD_GC', params=[w], lr=0.1,
                                momentum=0.9))
    w.grad = torch.randn(4, 3)
    opt.step()
    old = opt.state_dict()
    old['param_groups'][0]['blocked'] = True
    resumed = OPTIMIZERS.build(dict(type='SGD_GC', params=[w], lr=0.1,
                                    momentum=0.9))
    resumed.load_state_dict(old)
    assert 'blocked' not in resumed.param_groups[0]
    resumed.step()
    assert 'blocked' not in resumed.state_dict()['param_groups'][0]


def test_path_options_are_the_running_optimizers():
    """fused and foreach choose a path, not the maths: a checkpoint brings
    back the state, not the path it was saved with."""
    assert sgd._SGDBase.path_options == ('fused', 'foreach')
    w = torch.nn.Parameter(torch.randn(4, 3))
    saved = OPTIMIZERS.build(dict(type='SGD_GC', params=[w], lr=0.1,
                                  momentum=0.9, fused=True))
    w.grad = torch.randn(4, 3)
    saved.step()
    opt = OPTIMIZERS.build(dict(type='SGD_GC', params=[w], lr=0.1,
                                momentum=0.9, **PLAIN))
    opt.load_state_dict(saved.state_dict())
    assert (opt.param_groups[0]['fused'],
            opt.param_groups[0]['foreach']) == (False, False)


@pytest.mark.parametrize('path', PATHS)
def test_momentum_starts_per_tensor_when_grads_arrive_late(path):
    """A tensor whose gradient first comes at step 2 starts its momentum
    then, batched with tensors already under way."""
    weights, grads = initial_weights(), gradients(steps=3)
    params = [torch.tensor(w, requires_grad=True) for w in weights]
    opt = OPTIMIZERS.build(dict(type='SGD_GC', params=params, **DAMPENED,
                                **path))
    for step, step_grads in enumerate(grads):
        for i, (p, g) in enumerate(zip(params, step_grads)):
            p.grad = None if step == 0 and i % 2 else torch.tensor(g)
        opt.step()
    for i, (p, w) in enumerate(zip(params, weights)):
        want = run_reference('SGD_GC', DAMPENED, [w],
                             [[g[i]] for g in grads[i % 2:]])[0]
        np.testing.assert_allclose(p.detach().numpy(), want, rtol=1e-12,
                                   atol=1e-12)


def test_fused_path_splits_rows_among_threads_and_gives_the_same_bits():
    """Rows are split among threads, each row summed by one of them, so
    the thread count does not change a bit of the result; with two threads
    the kernel does run on two."""
    kernel = gc_mm.kernels.load('sgd')
    assert kernel.openmp == torch.backends.openmp.is_available()
    results, used = [], []
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
            # Work for three threads or more: rows of a centralized tensor,
            # elements of another.
            for centralized in (True, False):
                w, g = torch.randn(96, 1024), torch.randn(96, 1024)
                kernel.sgd_gc_steps([w], [g], [None], [centralized],
                                    [False], 0.1, 0., 'none', 0., 0., False)
                used.append(kernel.last_step_threads())
    finally:
        torch.set_num_threads(threads)
    assert used == [1, 1, 2, 2, 3, 3]
    for got in results[1:]:
        for a, b in zip(results[0], got):
            np.testing.assert_array_equal(a, b)


DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.mark.parametrize('path', PATHS)
@pytest.mark.parametrize('dtype', DTYPES, ids=str)
@pytest.mark.parametrize('name', ['SGD_GC', 'SGDW_GC'])
def test_what_each_path_leaves_in_grad(path, dtype, name):
    """After step(), with and without decay, momentum, Nesterov: every
    path and dtype leaves p.grad as backward left it, bit for bit and in
    its layout, as torch's SGD (the plain path used to leave the direction
    d = P(g + wd*w) there)."""
    for hp in HYPER_PARAMS['sgd']:
        params = [torch.nn.Parameter(torch.randn(s).to(dtype))
                  for s in SHAPES]
        params[0] = torch.nn.Parameter(params[0].detach().to(
            memory_format=torch.channels_last))
        opt = OPTIMIZERS.build(dict(type=name, params=params, **hp, **path))
        for _ in range(2):
            for p in params:
                p.grad = torch.randn(p.shape).to(dtype)
            params[0].grad = params[0].grad.to(
                memory_format=torch.channels_last)
            before = [(p.grad.clone(), p.grad.stride(),
                       p.detach().double().numpy().copy()) for p in params]
            opt.step()
            for p, (grad, stride, w) in zip(params, before):
                assert p.grad.stride() == stride
                assert torch.equal(p.grad, grad)


def _layout(array, layout):
    """A float64 tensor of ``array`` in a memory layout: 'contiguous',
    'channels_last' (4-D) or 'column_major' (dims reversed in memory, so
    for ndim > 1 a row is not one block)."""
    tensor = torch.tensor(np.ascontiguousarray(array))
    if layout == 'channels_last' and tensor.ndim == 4:
        return tensor.to(memory_format=torch.channels_last)
    if layout == 'column_major':
        dims = list(reversed(range(tensor.ndim)))
        return tensor.permute(dims).contiguous().permute(dims)
    return tensor


@pytest.mark.parametrize('path', PATHS)
@pytest.mark.parametrize('layout', ['channels_last', 'column_major',
                                    'grad_only'])
def test_layouts_match_reference(path, layout, taken):
    """Parameters and gradients in channels_last (the fast paths take them
    as they are), column-major (rows not in one block: the plain path), and
    contiguous parameters with non-contiguous gradients (the plain path),
    for every optimizer and option."""
    for name in SGD_NAMES:
        for hp in HYPER_PARAMS['sgd']:
            weights, grads = initial_weights(), gradients(steps=3)
            param_layout = 'contiguous' if layout == 'grad_only' else layout
            grad_layout = ('column_major' if layout == 'grad_only' else
                           layout)
            params = [torch.nn.Parameter(_layout(w, param_layout))
                      for w in weights]
            opt = OPTIMIZERS.build(dict(type=name, params=params, **hp,
                                        **path))
            for step_grads in grads:
                for p, g in zip(params, step_grads):
                    p.grad = _layout(g, grad_layout)
                opt.step()
            want = run_reference(name, hp, weights, grads)
            for p, w in zip(params, want):
                np.testing.assert_allclose(p.detach().numpy(), w, rtol=1e-12,
                                           atol=1e-12,
                                           err_msg=f'{name} {hp}')
                if hp.get('momentum'):
                    buf = opt.state[p]['momentum_buffer']
                    assert buf.stride() == p.stride()
    fast = PATH_TAKEN[path_id(path)]
    shapes = {s for calls in taken.values() for call in calls for s in call}
    if layout == 'channels_last' or fast == 'plain':
        assert {s for call in taken[fast] for s in call} == shapes
    else:  # only tensors whose layouts are the contiguous one go fast
        assert {s for call in taken['plain'] for s in call} == shapes - {
            (5, ), (3, 1, 1, 1)}


def _save_load(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize('path', PATHS)
@pytest.mark.parametrize('saved,resumed', [
    ('channels_last', 'contiguous'), ('contiguous', 'channels_last'),
    ('column_major', 'contiguous'), ('channels_last', 'column_major')])
def test_resume_into_another_layout(path, saved, resumed):
    """Momentum buffers saved from a model in one memory layout, resumed in
    a model in another (a checkpoint of a channels_last run), on every
    path: the numbers of an uninterrupted run, and the buffers follow the
    parameters."""
    weights, grads = initial_weights(), gradients(steps=4)
    hp = DAMPENED

    def run(layout, weights, grads, state=None, **options):
        params = [torch.nn.Parameter(_layout(w, layout)) for w in weights]
        opt = OPTIMIZERS.build(dict(type='SGD_GC', params=params, **hp,
                                    **options))
        if state is not None:
            opt.load_state_dict(state)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = _layout(g, layout)
            opt.step()
        return params, opt

    params, opt = run(saved, weights, grads[:2], **PLAIN)
    state = _save_load(opt.state_dict())
    params, opt = run(resumed, [p.detach().numpy() for p in params],
                      grads[2:], state, **path)
    want = run_reference('SGD_GC', hp, weights, grads)
    for p, w in zip(params, want):
        np.testing.assert_allclose(p.detach().numpy(), w, rtol=1e-12,
                                   atol=1e-12)
        assert opt.state[p]['momentum_buffer'].stride() == p.stride()


@pytest.mark.parametrize('path', PATHS)
def test_model_converted_to_channels_last_after_the_optimizer_was_built(
        path, taken):
    """The buffers are re-laid like their parameters, and the fast paths
    keep them."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 3).double()
    weights = [p.detach().numpy().copy() for p in conv.parameters()]
    opt = OPTIMIZERS.build(dict(type='SGD_GC', params=conv.parameters(),
                                **DAMPENED, **path))
    grads = gradients(steps=4, shapes=[w.shape for w in weights])
    for step, step_grads in enumerate(grads):
        if step == 2:
            conv.to(memory_format=torch.channels_last)
            assert not conv.weight.is_contiguous()
        for p, g in zip(conv.parameters(), step_grads):
            p.grad = torch.empty_like(p).copy_(torch.tensor(g))
        opt.step()
    want = run_reference('SGD_GC', DAMPENED, weights, grads)
    for p, w in zip(conv.parameters(), want):
        np.testing.assert_allclose(p.detach().numpy(), w, rtol=1e-12,
                                   atol=1e-12)
        assert opt.state[p]['momentum_buffer'].stride() == p.stride()
    fast = PATH_TAKEN[path_id(path)]
    assert taken[fast][2:] == [[(8, 3, 3, 3), (8, )]] * 2


class _Failure(RuntimeError):
    pass


def _fail_on_second_call(function):
    calls = []

    def fail(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise _Failure('injected failure')
        return function(*args, **kwargs)

    return fail


@pytest.mark.parametrize('path', PATHS[1:])
def test_failed_step_names_its_path_and_leaves_no_unwritten_buffer(
        path, monkeypatch):
    """The step fails after the first tensor moved (the second GC of the
    Python paths) or, on the kernel, in its one call for all the tensors
    (which checks them all before any moves): the error names the path; a
    tensor that moved keeps its buffer, the others have none, so the next
    step is their first (with dampening a buffer read then would show in
    the numbers)."""
    fused = path == PATHS[3].values[0]
    if fused:
        kernel, calls = gc_mm.kernels.load('sgd'), []

        class FailingOnce:
            @staticmethod
            def sgd_gc_steps(*args):
                calls.append(1)
                if len(calls) == 1:
                    raise _Failure('injected failure')
                return kernel.sgd_gc_steps(*args)

        monkeypatch.setattr(gc_mm.kernels, 'load', lambda name: FailingOnce)
    else:
        monkeypatch.setattr(sgd, 'centralize_',
                            _fail_on_second_call(sgd.centralize_))
    weights, grads = initial_weights(), gradients(steps=2)
    params = [torch.tensor(w, requires_grad=True) for w in weights]
    opt = OPTIMIZERS.build(dict(type='SGD_GC', params=params, **DAMPENED,
                                **path))
    for p, g in zip(params, grads[0]):
        p.grad = torch.tensor(g)
    taken = sgd.PATH_NAMES[PATH_TAKEN[path_id(path)]]
    with pytest.raises(RuntimeError,
                       match='^' + re.escape(f'SGD_GC {taken} path: '
                                             'injected failure')):
        opt.step()
    moved = [not np.array_equal(p.detach().numpy(), w)
             for p, w in zip(params, weights)]
    assert moved == [not fused, False, False, False, False]
    assert ['momentum_buffer' in opt.state[p] for p in params] == moved
    for p, g in zip(params, grads[1]):
        p.grad = torch.tensor(g)
    opt.step()
    for p, w, i in zip(params, weights, range(len(params))):
        steps = grads if moved[i] else grads[1:]
        want = run_reference('SGD_GC', DAMPENED, [w],
                             [[g[i]] for g in steps])[0]
        np.testing.assert_allclose(p.detach().numpy(), want, rtol=1e-12,
                                   atol=1e-12)


@pytest.mark.parametrize('path', PATHS)
@pytest.mark.parametrize('name', SGD_NAMES)
def test_step_with_closure_uses_the_gradients_it_computes(path, name):
    """step(closure) runs the closure with grad enabled (step itself runs
    without) and steps with the gradients it produced, not the ones there
    before."""
    weights, grads = initial_weights(), gradients(steps=3)
    params = [torch.tensor(w, requires_grad=True) for w in weights]
    hp = HYPER_PARAMS['sgd'][2]
    opt = OPTIMIZERS.build(dict(type=name, params=params, **hp, **path))
    for step_grads in grads:
        for p in params:
            p.grad = torch.full_like(p, 100.)  # stale: must not be used
        directions = [torch.tensor(g) for g in step_grads]

        def closure():
            opt.zero_grad()
            loss = sum((p * d).sum() for p, d in zip(params, directions))
            loss.backward()  # d(loss)/dp = d
            return loss

        loss = opt.step(closure)
        assert torch.is_tensor(loss) and loss.requires_grad
    want = run_reference(name, hp, weights, grads)
    for p, w in zip(params, want):
        np.testing.assert_allclose(p.detach().numpy(), w, rtol=1e-12,
                                   atol=1e-12)


@pytest.mark.parametrize('path', PATHS)
def test_complex_parameters_are_refused_before_any_parameter_moves(path):
    real = torch.nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
    opt = OPTIMIZERS.build(dict(type='SGD_GC', params=[real], lr=0.1,
                                momentum=0.9, **path))
    with pytest.raises((ValueError, RuntimeError), match='complex'):
        opt.add_param_group({'params': [torch.nn.Parameter(
            torch.randn(3, 4, dtype=torch.complex128))]})
    # A parameter made complex after the optimizer was built.
    late = torch.nn.Parameter(torch.randn(2, 4, dtype=torch.float64))
    opt.add_param_group({'params': [late]})
    late.data = torch.randn(2, 4, dtype=torch.complex128)
    real.grad = torch.randn(3, 4, dtype=torch.float64)
    late.grad = torch.randn(2, 4, dtype=torch.complex128)
    before = real.detach().clone()
    with pytest.raises((ValueError, RuntimeError), match='complex'):
        opt.step()
    assert torch.equal(real, before) and not opt.state


@pytest.mark.parametrize('path', PATHS)
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


def test_fused_path_refuses_parameters_off_cpu():
    """Checked when the group is added (and again at each step)."""
    with pytest.raises(RuntimeError, match='fused=True.*CPU.*meta'):
        OPTIMIZERS.build(dict(type='SGD_GC', lr=0.1, fused=True, params=[
            torch.nn.Parameter(torch.empty(4, 3, device='meta'))]))
    opt = OPTIMIZERS.build(dict(type='SGD_GC', lr=0.1, fused=True, params=[
        torch.nn.Parameter(torch.randn(4, 3, 3, 3))]))
    with pytest.raises(RuntimeError, match='param group 1 .* on meta'):
        opt.add_param_group({'params': [
            torch.nn.Parameter(torch.empty(2, 2, device='meta'))]})
    assert len(opt.param_groups) == 1


def test_kernel_build_without_a_compiler_says_so(tmp_path):
    """The build on first use (fused=True where the kernel was not
    installed), for real with no usable compiler, in a fresh process and an
    empty extension cache: the error names the path, the kernel and the way
    out, and comes before any parameter moved (here one of another group,
    on the plain path)."""
    script = '''
import torch, gc_mm.kernels
from gc_mm.optimizers import SGD_GC
gc_mm.kernels.installed = lambda name: None  # an install without it
plain = torch.nn.Parameter(torch.ones(3, 4))
fused = torch.nn.Parameter(torch.ones(3, 4))
opt = SGD_GC([{'params': [plain], 'fused': False},
              {'params': [fused], 'fused': True}], lr=0.1)
plain.grad = fused.grad = torch.ones(3, 4)
try:
    opt.step()
finally:
    print('moved' if (plain != 1).any() or (fused != 1).any() else 'still')
'''
    env = dict(os.environ, CXX=str(tmp_path / 'no-such-compiler'),
               TORCH_EXTENSIONS_DIR=str(tmp_path / 'extensions'))
    result = subprocess.run([sys.executable, '-c', script], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    # The last line: importing mmengine may log (deepspeed's accelerator
    # notice goes to stdout where deepspeed is installed).
    assert result.stdout.strip().splitlines()[-1] == 'still'
    assert 'SGD_GC fused (C++ kernel) path:' in result.stderr
    assert 'gc_mm/kernels/sgd.cpp' in result.stderr
    assert 'fused=None' in result.stderr


@pytest.mark.parametrize('bad', ['grad dtype', 'grad layout', 'state size'])
@pytest.mark.parametrize('name', ['sgd', 'adaptive'])
def test_kernel_checks_every_tensor_before_any_moves(name, bad):
    """A kernel's one call for a list of tensors refuses a bad tensor
    anywhere in the list, naming it, before the first tensor moves."""
    kernel = gc_mm.kernels.load(name)
    torch.manual_seed(0)
    params = [torch.randn(4, 3), torch.randn(5, 2)]
    grads = [torch.randn(4, 3), torch.randn(5, 2)]
    states = [torch.zeros(4, 3), torch.zeros(5, 2)]
    if bad == 'grad dtype':
        grads[1] = grads[1].double()
    elif bad == 'grad layout':
        grads[1] = torch.randn(2, 5).t()
    else:
        states[1] = torch.zeros(4)
    before = [p.clone() for p in params]
    if name == 'sgd':
        what = 'fused SGD: ' + ('momentum_buffer' if bad == 'state size'
                                else 'grad')
        step = lambda: kernel.sgd_gc_steps(  # noqa: E731
            params, grads, states, [True, True], [False, False], 0.1, 0.,
            'none', 0.9, 0., False)
    else:
        what = 'fused adaptive step: ' + ('exp_avg_sq' if bad == 'state size'
                                          else 'grad')
        step = lambda: kernel.adaptive_gc_steps(  # noqa: E731
            params, grads, [None, None], states, [None, None],
            ['gradient', 'gradient'], 0., 'none', 1., 0., 1., 1., 1.,
            [1., 1.], 1e-10, [0.1, 0.1])
    with pytest.raises(RuntimeError, match=f'{what} must be'):
        step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
