"""SGD_GC's paths (the C++ kernel, the multi-tensor path, the plain path)
against each other and the float64 reference, their routing, and the
kernel's builds."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from mmengine.registry import OPTIMIZERS

import gc_mm.kernels
import gc_mm.optimizers.sgd  # registers the optimizers
from reference import SGD_NAMES
from test_optimizers import (HYPER_PARAMS, SGD_OTHER_PATHS, SHAPES,
                             gradients, initial_weights, run_gc_mm,
                             run_reference)

# The paths that leave gradients untouched.
SGD_FAST_PATHS = [pytest.param({'fused': False}, id='blocked'),
                  pytest.param({'foreach': True}, id='foreach'),
                  pytest.param({'fused': True}, id='fused')]


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


def test_fused_path_refuses_parameters_off_cpu():
    """Checked when the group is added (and again at each step)."""
    with pytest.raises(RuntimeError, match='fused=True.*CPU.*meta'):
        OPTIMIZERS.build(dict(type='SGD_GC', lr=0.1, fused=True, params=[
            torch.nn.Parameter(torch.empty(4, 3, device='meta'))]))
    opt = build('SGD_GC', lr=0.1, fused=True)
    with pytest.raises(RuntimeError, match='param group 1 .* on meta'):
        opt.add_param_group({'params': [
            torch.nn.Parameter(torch.empty(2, 2, device='meta'))]})
    assert len(opt.param_groups) == 1


def test_kernel_build_without_a_compiler_says_so(tmp_path):
    """The build on first use (fused=True where the kernel was not
    installed), for real with no usable compiler, in a fresh process and an
    empty extension cache: the error names the kernel and the way out."""
    script = 'import gc_mm.kernels; gc_mm.kernels.build("sgd")\n'
    env = dict(os.environ, CXX=str(tmp_path / 'no-such-compiler'),
               TORCH_EXTENSIONS_DIR=str(tmp_path / 'extensions'))
    result = subprocess.run([sys.executable, '-c', script], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert 'gc_mm/kernels/sgd.cpp' in result.stderr
    assert 'fused=None' in result.stderr
