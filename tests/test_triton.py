"""gc_mm/kernels/triton_sgd.py, SGD_GC's fused step for CUDA tensors, run
here by Triton's interpreter (TRITON_INTERPRET=1, on CPU tensors) against
the float64 reference: every SGD rule, with and without momentum,
Nesterov, dampening and decay, float32 and float64 tensors in one call,
tensors with and without GC (one cut into several programs), channels_last,
and a tensor whose first step comes later than the others'; and compiled
for an H100 (sm_90) without a GPU. It runs on CUDA in tests/test_devices.py
(SGD_GC's fused path there)."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

pytest.importorskip('triton')

# In a process of its own: the interpreter is chosen when the kernel is
# defined, and no other test may get an interpreted kernel.
SCRIPT = r"""
import json, sys
import numpy as np
import torch
sys.path.insert(0, 'tests')
from reference import SGD_NAMES, Reference, default_mode
from gc_mm.kernels import triton_sgd

# conv, 1x1 conv, fc, bias, rows of 1, an fc without GC under GCC cut into
# several programs (CHUNK), channels_last conv.
SHAPES = [(6, 3, 3, 3), (4, 6, 1, 1), (5, 7), (5, ), (3, 1, 1, 1),
          (3, triton_sgd.CHUNK + 100), (4, 3, 2, 2)]
LATE = 2  # the tensor whose gradients start at step 2
HPS = [dict(lr=0.1), dict(lr=0.1, momentum=0.9, weight_decay=0.01),
       dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.001),
       dict(lr=0.05, momentum=0.8, dampening=0.3, weight_decay=0.1)]
STEPS = 4
rng = np.random.default_rng(0)
results = []
for name in SGD_NAMES:
    for h, hp in enumerate(HPS):
        weights = [rng.standard_normal(s) for s in SHAPES]
        grads = [[rng.standard_normal(s) for s in SHAPES]
                 for _ in range(STEPS)]
        def reference(**options):
            ref = Reference(name, **hp, **options)
            out = list(weights)
            for t, step_grads in enumerate(grads):
                # The late tensor is not stepped before its first gradient.
                stepped = ref.step(out, step_grads)
                if t < LATE:
                    stepped[1] = out[1]
                    ref.state.pop(1, None)
                out = stepped
            return out
        want, without_gc = reference(), reference(gc_mode=None)
        dtypes = [torch.float64 if i % 2 else torch.float32
                  for i in range(len(SHAPES))]
        params = [torch.tensor(w, dtype=d) for w, d in zip(weights, dtypes)]
        params[-1] = params[-1].to(memory_format=torch.channels_last)
        bufs = [None] * len(params)
        mode = default_mode(name)
        for t, step_grads in enumerate(grads):
            index = [i for i in range(len(params)) if i != 1 or t >= LATE]
            first = [bool(hp.get('momentum')) and bufs[i] is None
                     for i in index]
            for i, f in zip(index, first):
                if f:
                    bufs[i] = torch.empty_like(params[i])
            g = [torch.tensor(step_grads[i], dtype=dtypes[i]) for i in index]
            g[-1] = g[-1].to(memory_format=torch.channels_last)
            triton_sgd.sgd_steps(
                [params[i] for i in index], g, [bufs[i] for i in index],
                [params[i].ndim >= {'conv_fc': 2, 'conv': 4}[mode]
                 for i in index], first, lr=hp['lr'],
                weight_decay=hp.get('weight_decay', 0.),
                decoupled=name.startswith('SGDW'),
                momentum=hp.get('momentum', 0.),
                dampening=hp.get('dampening', 0.),
                nesterov=hp.get('nesterov', False))
        for i, (p, w, v) in enumerate(zip(params, want, without_gc)):
            got = p.double().numpy()
            results.append([name, h, i, str(p.dtype),
                            float(np.abs(got - w).max()),
                            float(np.abs(got - v).max())])
print(json.dumps(results))
"""


def test_triton_sgd_kernel_matches_reference():
    path = os.pathsep.join([REPO, os.environ.get('PYTHONPATH', '')])
    proc = subprocess.run(
        [sys.executable, '-c', SCRIPT], cwd=REPO, capture_output=True,
        text=True, timeout=600,
        env=dict(os.environ, TRITON_INTERPRET='1', PYTHONPATH=path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 4 * 4 * 7
    for name, hp, index, dtype, error, gc_error in results:
        tol = 1e-12 if dtype == 'torch.float64' else 2e-5
        assert error < tol, (name, hp, index, dtype, error)
        # Where GC applies, the same steps without it end far away.
        centralized = (0, 1, 6) if 'GCC' in name else (0, 1, 2, 5, 6)
        if index in centralized:
            assert gc_error > 1e-4, (name, hp, index, gc_error)


@pytest.mark.parametrize('dtype', ['fp32', 'fp64'])
@pytest.mark.parametrize('coupled', [True, False])
def test_triton_sgd_kernel_compiles_for_hopper(dtype, coupled):
    """The interpreter runs the kernel as Python; the compiler (PTX and
    machine code for sm_90, an H100's, without a GPU) also checks what the
    interpreter lets through (types across branches, pointer casts)."""
    compiler = pytest.importorskip('triton.compiler')
    backends = pytest.importorskip('triton.backends.compiler')
    import triton
    import triton.language as tl

    from gc_mm.kernels import triton_sgd
    signature = {'table': '*i64', 'n': 'i32', 'row_tensor': '*i64',
                 'hyper': f'*{dtype}', 'DTYPE': 'constexpr',
                 'COUPLED': 'constexpr', 'MOMENTUM': 'constexpr',
                 'NESTEROV': 'constexpr', 'BLOCK': 'constexpr'}
    for momentum, nesterov in [(False, False), (True, False), (True, True)]:
        source = compiler.ASTSource(
            fn=triton_sgd._sgd_rows, signature=signature,
            constexprs=dict(DTYPE=getattr(tl, {'fp32': 'float32',
                                               'fp64': 'float64'}[dtype]),
                            COUPLED=coupled, MOMENTUM=momentum,
                            NESTEROV=nesterov, BLOCK=triton_sgd.BLOCK))
        kernel = triton.compile(source,
                                target=backends.GPUTarget('cuda', 90, 32))
        assert '.visible .entry _sgd_rows' in kernel.asm['ptx']
        assert kernel.asm['cubin']
