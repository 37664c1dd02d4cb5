"""gc_mm on each device (conftest.DEVICES): every GC optimizer on each path
it has there against the float64 reference (float64, float32,
channels_last; half precision with float32 statistics), RAdam_GC and
Ranger across the rectification boundary, state saved on one device and
resumed on it (bit-equal) or on the CPU, and GCOptimWrapper /
AmpGCOptimWrapper (float16 and bfloat16 autocast) against torch fed the
centralized gradients. The CPU cases keep this code run everywhere; on a GPU
``pytest -m cuda`` runs the CUDA ones (tools/analysis/device_check.sh)."""
import copy
import io

import numpy as np
import pytest
import torch
import torch.nn as nn
from mmengine.optim import build_optim_wrapper
from mmengine.registry import OPTIMIZERS

import gc_mm
import test_radam
from conftest import CUDA, DEVICES, needs_cpu_amp
from gc_mm import GCOptimWrapper
from reference import ALL_NAMES, SGD_NAMES
from test_optim_wrapper import (TORCH_OPTIMIZERS, TinyNet, assert_twins_equal,
                                batch, loss_of, run_twins, twin_params)
from test_optimizers import (F32, F64, HYPER_PARAMS, SHAPES, family, gradients, initial_weights, laid_out,
                             paths, run_reference, take_path)

LAYOUTS = [(F64, 'contiguous', 1e-12), (F32, 'contiguous', 2e-5),
           (F32, 'channels_last', 2e-5)]


def device_paths():
    """(name, path) for each path of each optimizer (test_optimizers'
    paths)."""
    return [pytest.param(name, path, id=f'{name}-{path}')
            for name in ALL_NAMES for path in paths(name)]


def skip_cpu_only(name, path, device):
    """SGD's ``fused=True`` is its C++ kernel on CPU and its Triton kernel
    on CUDA, where triton is installed; elsewhere it is refused when the
    group is built (test_sgd)."""
    if (device != 'cpu' and name in SGD_NAMES and path == 'fused'
            and not gc_mm.kernels.triton_available()):
        pytest.skip("SGD's fused path off the CPU needs triton")


def on(device, array, dtype, layout='contiguous'):
    # .to keeps a dense layout (channels_last) across devices.
    return laid_out(array, dtype, layout).to(device)


def step_on(device, opt, params, grads, dtype, layout='contiguous'):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = on(device, g, dtype, layout)
        opt.step()


def assert_reference(params, want, tol, what):
    for p, w, shape in zip(params, want, SHAPES):
        np.testing.assert_allclose(p.detach().cpu().double().numpy(), w,
                                   rtol=tol, atol=tol,
                                   err_msg=f'{what} {shape}')


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('name,path', device_paths())
@pytest.mark.parametrize('dtype,layout,tol', LAYOUTS,
                         ids=['float64', 'float32', 'channels_last'])
def test_parity_with_float64_reference(device, name, path, dtype, layout,
                                       tol, monkeypatch):
    """Each of the family's hyper-parameter sets, 6 steps."""
    skip_cpu_only(name, path, device)
    options = take_path(name, path, monkeypatch)
    for i, hp in enumerate(HYPER_PARAMS[family(name)]):
        weights, grads = initial_weights(), gradients()
        params = [nn.Parameter(on(device, w, dtype, layout))
                  for w in weights]
        opt = OPTIMIZERS.build(dict(type=name, params=params, **hp,
                                    **options))
        step_on(device, opt, params, grads, dtype, layout)
        assert all(p.device.type == device for p in params)
        if layout == 'channels_last':
            assert params[0].is_contiguous(memory_format=torch.channels_last)
        assert_reference(params, run_reference(name, hp, weights, grads),
                         tol, f'{name} hp {i}')


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('name', ALL_NAMES)
@pytest.mark.parametrize('dtype,tol', [(torch.bfloat16, 3e-2),
                                       (torch.float16, 5e-3)],
                         ids=['bfloat16', 'float16'])
def test_half_precision_keeps_float32_statistics(device, name, dtype, tol):
    hp = HYPER_PARAMS[family(name)][1]
    # Weights exact in the half type: only the updates' rounding differs.
    weights = [torch.tensor(w).to(dtype).double().numpy()
               for w in initial_weights()]
    grads = gradients(steps=3)
    params = [nn.Parameter(on(device, w, dtype)) for w in weights]
    opt = OPTIMIZERS.build(dict(type=name, params=params, **hp))
    step_on(device, opt, params, grads, dtype)
    assert_reference(params, run_reference(name, hp, weights, grads), tol,
                     name)
    for state in opt.state.values():
        for key, value in state.items():
            if torch.is_tensor(value) and key != 'step':
                assert value.dtype == torch.float32, key
                assert value.device.type == device, key


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('name,path', device_paths())
def test_state_round_trip(device, name, path, monkeypatch):
    """Saved after 3 of 6 steps (torch.save, weights_only load): resumed on
    the same device it ends bit-equal to the uninterrupted run; loaded onto
    the CPU (map_location) and resumed there, equal to the reference."""
    skip_cpu_only(name, path, device)
    hp = HYPER_PARAMS[family(name)][-1]
    weights, grads = initial_weights(), gradients()

    def build(where):
        params = [nn.Parameter(on(where, w, F64)) for w in weights]
        return params, OPTIMIZERS.build(
            dict(type=name, params=params, **hp,
                 **take_path(name, path, monkeypatch)))

    params, opt = build(device)
    step_on(device, opt, params, grads[:3], F64)
    saved = [p.detach().clone() for p in params]
    checkpoint = io.BytesIO()
    torch.save(opt.state_dict(), checkpoint)
    step_on(device, opt, params, grads[3:], F64)

    for where in (device, 'cpu'):
        resumed, opt2 = build(where)
        with torch.no_grad():
            for p, s in zip(resumed, saved):
                p.copy_(s)
        checkpoint.seek(0)
        opt2.load_state_dict(
            torch.load(checkpoint, map_location=where, weights_only=True))
        for value in opt2.state[resumed[0]].values():
            if torch.is_tensor(value) and value.dim():
                assert value.device.type == where
        step_on(where, opt2, resumed, grads[3:], F64)
        if where == device:
            for a, b in zip(params, resumed):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
        else:
            assert_reference(resumed, run_reference(name, hp, weights, grads),
                             1e-12, f'{name} resumed on {where}')


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('name', ['RAdam_GC', 'Ranger'])
@pytest.mark.parametrize('case', list(test_radam.CASES))
@pytest.mark.parametrize('dtype,tol', [(F64, 1e-12), (F32, 2e-5)],
                         ids=['float64', 'float32'])
def test_radam_and_ranger_match_reference(device, name, case, dtype, tol):
    """20 steps across the rho_t <= 5 boundary (and, for Ranger, three
    synchronizations of its slow weights), two groups with other betas."""
    hp = dict(lr=0.01, **test_radam.CASES[case])
    weights = test_radam.initial_weights(dtype=dtype)
    grads = test_radam.gradients(20)
    params = [nn.Parameter(on(device, w, dtype)) for w in weights]
    groups = [dict(params=[params[i] for i in indices], **options)
              for indices, options in test_radam.GROUPS]
    opt = OPTIMIZERS.build(dict(type=name, params=groups, **hp))
    step_on(device, opt, params, grads, dtype)
    ref = dict(hp, _ranger=True) if name == 'Ranger' else hp
    want = test_radam.radam_reference(ref, weights, grads, test_radam.GROUPS)
    for p, w, shape in zip(params, want, test_radam.SHAPES):
        np.testing.assert_allclose(p.detach().cpu().double().numpy(), w,
                                   rtol=tol, atol=tol, err_msg=str(shape))


@pytest.mark.parametrize('name', SGD_NAMES)
@pytest.mark.parametrize('momentum', [0., 0.9])
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_sgd_fused_on_cuda_takes_the_triton_kernel(name, momentum,
                                                   monkeypatch):
    """One launch per step for all the tensors (float32 and float64 ones in
    two), none left to another path; the reference's numbers."""
    triton_sgd = pytest.importorskip('gc_mm.kernels.triton_sgd')
    calls = []
    original = triton_sgd.sgd_steps
    monkeypatch.setattr(triton_sgd, 'sgd_steps', lambda *args, **kwargs: (
        calls.append(len(args[0])), original(*args, **kwargs)))
    hp = dict(lr=0.05, momentum=momentum, weight_decay=0.01)
    weights, grads = initial_weights(), gradients()
    params = [nn.Parameter(on('cuda', w, F64 if i % 2 else F32))
              for i, w in enumerate(weights)]
    opt = OPTIMIZERS.build(dict(type=name, params=params, fused=True, **hp))
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = on('cuda', g, p.dtype)
        opt.step()
    assert calls == [len(SHAPES)] * len(grads)
    assert_reference(params, run_reference(name, hp, weights, grads), 2e-5,
                     name)


def torch_implementations(cls, device):
    """torch's implementations of ``cls`` on ``device``: fused where torch
    has it there, foreach, for-loop."""
    param = nn.Parameter(torch.zeros(1, device=device))
    param.grad = torch.zeros_like(param)
    found = {'foreach': dict(foreach=True), 'for-loop': dict(foreach=False)}
    try:
        cls([param], lr=0.1, fused=True).step()
        found['fused'] = dict(fused=True)
    except (RuntimeError, ValueError, TypeError):  # TypeError: no fused SGD
        pass
    return found


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('name', list(TORCH_OPTIMIZERS))
@pytest.mark.parametrize('dtype,tol', [(F32, 2e-6), (F64, 1e-12)],
                         ids=['float32', 'float64'])
@pytest.mark.parametrize('clip', [None, 1.0], ids=['no-clip', 'clip'])
def test_gc_optim_wrapper_equals_torch_on_centralized_gradients(
        device, name, dtype, tol, clip):
    """GCOptimWrapper around each of torch's implementations on the device,
    6 steps: parameters and torch's state equal torch fed clipped, then
    centralized gradients."""
    cls, hp = TORCH_OPTIMIZERS[name]
    for implementation, options in torch_implementations(cls,
                                                         device).items():
        wrapped, twins = [[nn.Parameter(p.detach().to(device)) for p in ps]
                          for ps in twin_params(dtype)]
        wrapper = GCOptimWrapper(
            cls(wrapped, **options, **hp),
            clip_grad=None if clip is None else dict(max_norm=clip))
        twin = cls(twins, **options, **hp)
        run_twins(wrapper, twin, wrapped, twins, 6, clip)
        assert_twins_equal(wrapper, twin, wrapped, twins, tol)


@pytest.mark.parametrize('device,dtype', [
    # CPU autocast takes bfloat16 only
    pytest.param('cpu', 'bfloat16', marks=needs_cpu_amp),
    pytest.param(CUDA.values[0], 'float16', marks=CUDA.marks),
    pytest.param(CUDA.values[0], 'bfloat16', marks=CUDA.marks)
], ids=['cpu-bfloat16', 'cuda-float16', 'cuda-bfloat16'])
def test_amp_gc_optim_wrapper_centralizes_unscaled_gradients(
        device, dtype, monkeypatch):
    """Three AMP steps (autocast in ``dtype``, loss scaled by 1024): the
    weights equal SGD's with momentum fed the unscaled, centralized
    gradients of the same autocast forward."""
    # The same convolution algorithms for the model and its twin.
    monkeypatch.setattr(torch.backends.cudnn, 'deterministic', True)
    monkeypatch.setattr(torch.backends.cudnn, 'benchmark', False)
    model = TinyNet().to(device)
    twin = copy.deepcopy(model)
    wrapper = build_optim_wrapper(
        model, dict(type='AmpGCOptimWrapper', dtype=dtype, loss_scale=1024.,
                    optimizer=dict(type='SGD', lr=0.1, momentum=0.9)))
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    for step in range(3):
        x = batch(step).to(device)
        with wrapper.optim_context(model):
            out = model(x)
            assert out.dtype == getattr(torch, dtype)
            loss = loss_of(model, x)
        wrapper.backward(loss)
        wrapper.step()
        rows = model.conv.weight.grad.double().flatten(1).mean(1)
        assert rows.abs().max() < 1e-6  # GC of the unscaled gradient
        wrapper.zero_grad()
        with torch.autocast(device, dtype=getattr(torch, dtype)):
            (loss_of(twin, x) * 1024.).backward()
        for p in twin.parameters():
            p.grad /= 1024.
        gc_mm.centralize_([p.grad for p in twin.parameters()])
        twin_opt.step()
        twin_opt.zero_grad()
    assert wrapper.loss_scaler.get_scale() == 1024.
    for (key, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=key)
