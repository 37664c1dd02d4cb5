"""SGD with Gradient Centralization: SGD_GC, SGD_GCC, SGDW_GC, SGDW_GCC.

Update rules (t = step, P = GC under the optimizer's gc_mode)::

    SGD_GC / SGD_GCC (coupled L2, decay inside GC):
        d = P(g + wd * w)
    SGDW_GC / SGDW_GCC (decoupled decay, not centralized):
        d = P(g)
    both:
        buf = d                                   (t = 1)
        buf = momentum * buf + (1 - dampening) * d (t > 1)
        d = d + momentum * buf if nesterov else buf
        w = w - lr * d            (SGDW: w = w - lr * d - lr * wd * w_old)

SGD_GC equals ``torch.optim.SGD(weight_decay=0)`` fed with ``P(g + wd * w)``.

Example::

    optim_wrapper = dict(optimizer=dict(
        type='SGD_GC', lr=0.02, momentum=0.9, weight_decay=1e-4))

Laid out as torch.optim's SGD: the classes validate their arguments and
route each parameter to a path; the maths lives in one function per path,
which give the same numbers to float rounding:

- :func:`_single_tensor_sgd_gc`, the plain path: tensor by tensor, in the
  authors' order;
- :func:`_multi_tensor_sgd_gc` (``foreach``): each op of the step runs once
  per batch of tensors, not once per tensor (the default off the CPU);
- :func:`_fused_sgd_gc` (``fused``): the C++ kernel of
  :mod:`gc_mm.kernels`, for CPU tensors (the default on CPU when it was
  compiled at install), and the Triton kernel for CUDA tensors
  (``fused=True`` only).

Momentum is :func:`_momentum` for both Python paths (the kernel has it in
C++). After ``step()``, ``p.grad`` is what backward left there, on every
path (torch's optimizers never write it either).
"""
from typing import Iterator, List, Optional, Tuple

import torch
from mmengine.registry import OPTIMIZERS
from torch import Tensor
from torch.optim.sgd import sgd as torch_sgd

from .. import kernels
from ..centralize import centralize_, is_centralized
from .base import (CLASS_RULE, HALF_DTYPES, GCOptimizer, check_non_negative,
                   group_layout)
from .fused import (check_path_option, fast_path_takes, rows_order,
                    sgd_steps)

# What each path is called in errors and in docs/benchmark.md.
PATH_NAMES = {
    'fused': 'fused (C++ kernel)',
    'multi_tensor': 'multi-tensor (foreach)',
    'plain': 'plain (single-tensor)',
}


def _momentum(params: List[Tensor], directions: List[Tensor],
              momentum_buffers: List[Optional[Tensor]], momentum: float,
              dampening: float, nesterov: bool) -> List[Tensor]:
    """SGD's momentum, for the Python paths: updates ``momentum_buffers``
    in place and returns the directions of the update.

    A None in ``momentum_buffers`` is a parameter's first step: it is
    replaced by a new buffer, in the parameter's layout, holding the
    direction. (A path hands a new buffer back to its caller's list only
    once the parameter moved, so a step that fails leaves no buffer that
    the parameter's next step would take for a later one.)
    """
    started = [i for i, buf in enumerate(momentum_buffers) if buf is not None]
    if started:
        bufs = [momentum_buffers[i] for i in started]
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, [directions[i] for i in started],
                            alpha=1 - dampening)
    for i, buf in enumerate(momentum_buffers):
        if buf is None:
            momentum_buffers[i] = torch.empty_like(
                params[i], dtype=directions[i].dtype).copy_(directions[i])
    # Nesterov's direction in a new tensor: the plain path's direction may
    # be the gradient itself, which the step leaves as it is.
    if nesterov:
        return torch._foreach_add(directions, momentum_buffers,
                                  alpha=momentum)
    return list(momentum_buffers)


def _single_tensor_sgd_gc(params: List[Tensor], grads: List[Tensor],
                          momentum_buffers: List[Optional[Tensor]], *,
                          gc_mode: Optional[str], lr: float,
                          weight_decay: float, momentum: float,
                          dampening: float, nesterov: bool,
                          decoupled_weight_decay: bool, out_dim: int = 0,
                          groups: int = 1) -> None:
    """The plain path: one tensor at a time, in the authors' order; any
    dtype, layout and size; ``out_dim`` and ``groups`` go to
    :func:`centralize_` (transposed convs per output unit). The direction
    ``d`` is a new tensor where it is not the gradient itself (decay or GC),
    so the gradient is left as backward made it, as by torch's optimizers
    (the authors' code wrote it in place: faster on CPU, where a new tensor
    costs page faults, but a second step on the same gradient then compounds
    the decay). Half-precision tensors are updated in float32 copies (their
    momentum buffers are float32)."""
    coupled_decay = weight_decay and not decoupled_weight_decay
    for i, (param, grad) in enumerate(zip(params, grads)):
        half = param.dtype in HALF_DTYPES
        work, direction = ((param.float(), grad.float()) if half else
                           (param, grad))
        # The direction in a new tensor where it differs from the gradient:
        # p.grad stays what backward left, as in torch's optimizers.
        if coupled_decay:
            direction = direction.add(work, alpha=weight_decay)
        if is_centralized(param, gc_mode):
            if direction is grad:
                direction = grad.clone()
            centralize_([direction], out_dim=out_dim, groups=groups)
        buf = momentum_buffers[i:i + 1]
        if momentum:
            (direction, ) = _momentum([work], [direction], buf, momentum,
                                      dampening, nesterov)
        if weight_decay and decoupled_weight_decay:
            work.mul_(1 - lr * weight_decay)
        work.add_(direction, alpha=-lr)
        if half:
            param.copy_(work)
        momentum_buffers[i] = buf[0]


def _batches(params: List[Tensor], gc_mode: Optional[str],
             max_elements: int) -> Iterator[Tuple[List[int], int]]:
    """Batches of the multi-tensor path, as indices into ``params``, with
    their row length (0: not centralized). A batch shares a device, a dtype
    and a row length, so its gradients, concatenated, are one matrix whose
    rows GC centralizes as each tensor's own; it holds at most
    ``max_elements`` (or one tensor)."""
    open_batches = {}
    for i, param in enumerate(params):
        cols = (param.numel() // param.shape[0]
                if is_centralized(param, gc_mode) else 0)
        key = (param.device, param.dtype, cols)
        batch, size = open_batches.get(key, ([], 0))
        if batch and size + param.numel() > max_elements:
            yield batch, cols
            batch, size = [], 0
        open_batches[key] = (batch + [i], size + param.numel())
    for (_, _, cols), (batch, _) in open_batches.items():
        yield batch, cols


def _multi_tensor_sgd_gc(params: List[Tensor], grads: List[Tensor],
                         momentum_buffers: List[Optional[Tensor]], *,
                         gc_mode: Optional[str], lr: float,
                         weight_decay: float, momentum: float,
                         dampening: float, nesterov: bool,
                         decoupled_weight_decay: bool) -> None:
    """The multi-tensor path, for tensors :func:`fast_path_takes`: each
    op of the step runs once per batch (torch's ``_foreach`` ops), so a GPU
    launches a few kernels per batch instead of several per tensor;
    transient memory at most the largest gradient."""
    largest = max(param.numel() for param in params)
    for batch, cols in _batches(params, gc_mode, largest):
        batch_params = [params[i] for i in batch]
        # The batch's directions, in one new buffer: GC centralizes them as
        # one matrix of rows, one reduction for the whole batch. Each
        # gradient is copied in its memory order (its rows stay rows), and
        # its direction is a view with its parameter's shape and layout.
        orders = [rows_order(param) for param in batch_params]
        flat = torch.cat([
            grads[i].permute(order).reshape(-1)
            for i, order in zip(batch, orders)
        ])
        directions = []
        for chunk, param, order in zip(
                flat.split([param.numel() for param in batch_params]),
                batch_params, orders):
            shape = [param.shape[dim] for dim in order]
            inverse = sorted(range(len(order)), key=order.__getitem__)
            directions.append(chunk.view(shape).permute(inverse))
        if weight_decay and not decoupled_weight_decay:
            torch._foreach_add_(directions, batch_params, alpha=weight_decay)
        if cols:
            centralize_([flat.view(-1, cols)])
        bufs = [momentum_buffers[i] for i in batch]
        if momentum:
            directions = _momentum(batch_params, directions, bufs, momentum,
                                   dampening, nesterov)
        if weight_decay and decoupled_weight_decay:
            torch._foreach_mul_(batch_params, 1 - lr * weight_decay)
        torch._foreach_add_(batch_params, directions, alpha=-lr)
        for i, buf in zip(batch, bufs):
            momentum_buffers[i] = buf


def _fused_sgd_gc(params: List[Tensor], grads: List[Tensor],
                  momentum_buffers: List[Optional[Tensor]], *,
                  gc_mode: Optional[str], lr: float, weight_decay: float,
                  momentum: float, dampening: float, nesterov: bool,
                  decoupled_weight_decay: bool) -> None:
    """The kernels, one call per device for all its tensors
    (:func:`fast_path_takes`): CPU tensors the C++ kernel
    (gc_mm/kernels/sgd.cpp, each tensor checked before any moves; called
    first), CUDA tensors (``fused=True``) the Triton kernel
    (gc_mm/kernels/triton_sgd.py). A kernel writes a first step's buffer,
    which enters ``momentum_buffers`` once every call returned."""
    first_steps, bufs, devices = [], list(momentum_buffers), {}
    for i, param in enumerate(params):
        first_steps.append(bool(momentum) and bufs[i] is None)
        if first_steps[-1]:
            bufs[i] = torch.empty_like(param)
        devices.setdefault(param.device, []).append(i)
    centralized = [is_centralized(param, gc_mode) for param in params]
    for device in sorted(devices, key=lambda device: not device.type == 'cpu'):
        index = devices[device]
        args = [[tensors[i] for i in index] for tensors in (
            params, grads, bufs, centralized, first_steps)]
        options = dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                       dampening=dampening, nesterov=nesterov)
        if device.type == 'cpu':
            sgd_steps(*args, decay='decoupled' if decoupled_weight_decay
                      else 'inside_gc', **options)
        else:
            from ..kernels import triton_sgd  # imports triton
            triton_sgd.sgd_steps(*args, decoupled=decoupled_weight_decay,
                                 **options)
    momentum_buffers[:] = bufs


_PATHS = {
    'fused': _fused_sgd_gc,
    'multi_tensor': _multi_tensor_sgd_gc,
    'plain': _single_tensor_sgd_gc,
}


class _SGDBase(GCOptimizer):
    """SGD with momentum and GC (Yong et al., ECCV 2020).

    Args:
        params: parameters or param-group dicts to optimize.
        lr (float): learning rate. Defaults to 0.01.
        momentum (float): momentum factor. Defaults to 0.
        dampening (float): dampening of the momentum. Defaults to 0.
        weight_decay (float): L2 factor (coupled for SGD_*, decoupled for
            SGDW_*). Defaults to 0.
        nesterov (bool): Nesterov momentum. Defaults to False.
        gc_mode (str | None): 'conv_fc', 'conv' or None (GC off); defaults to
            the class's rule ('conv_fc' for *_GC, 'conv' for *_GCC). A param
            group may set its own; None there turns GC off for that group.
        fused (bool | None): the C++ kernel, for CPU parameters (each row
            summed while the one before it is updated, then updated while
            in cache; rows split among threads). True: use it, compiling
            it on first use if it was not installed (then cached in
            torch's extension directory); for CUDA parameters, the Triton
            kernel (gc_mm/kernels/triton_sgd.py: a row's sum and update in
            one program, every tensor in one launch; needs triton, which
            torch's CUDA wheels bring); refused for parameters elsewhere.
            Defaults to None.
        foreach (bool | None): the multi-tensor path (the tensors of a
            group batched by device, dtype and row length, each op of the
            step run once per batch with torch's ``_foreach`` ops). Defaults
            to None.

    ``fused=False, foreach=False`` is the plain path, tensor by tensor.
    With both None (the default) CPU parameters take the kernel if it was
    compiled at install (``pip install --no-build-isolation --use-pep517
    -e .``, as tools/install.sh does) and the plain path if not (faster
    there than the multi-tensor path, see docs/benchmark.md); parameters
    elsewhere take the multi-tensor path, where kernel launches dominate.
    False rules a path out of that choice (``fused=False``: the plain path
    on CPU, the multi-tensor path elsewhere).
    ``fused`` and ``foreach`` choose a path, not the maths: a checkpoint
    loaded into this optimizer keeps the values it was built with.

    All paths give the same numbers to float rounding and leave the
    gradients as backward left them. Parameters the fast paths
    cannot take (half precision, empty, or a gradient or buffer in another
    memory layout than the parameter) take the plain path on every setting.
    """

    decoupled_weight_decay = False
    path_options = ('fused', 'foreach')
    kernel = 'sgd'
    supports_sparse = True

    @property
    def coupled_decay(self) -> bool:
        return not self.decoupled_weight_decay
    cuda_kernel = True

    def __init__(self,
                 params,
                 lr: float = 0.01,
                 momentum: float = 0.,
                 dampening: float = 0.,
                 weight_decay: float = 0.,
                 nesterov: bool = False,
                 gc_mode: Optional[str] = CLASS_RULE,
                 fused: Optional[bool] = None,
                 foreach: Optional[bool] = None):
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            gc_mode=gc_mode,
            fused=fused,
            foreach=foreach)
        super().__init__(params, defaults)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # Older checkpoints carry 'blocked', the option of a path since
        # removed: it means nothing now.
        for group in self.param_groups:
            group.pop('blocked', None)

    def _check_group(self, group: dict) -> None:
        check_non_negative(group, 'lr', 'momentum', 'dampening',
                           'weight_decay')
        if group['nesterov'] and (group['momentum'] <= 0
                                  or group['dampening'] != 0):
            raise ValueError('nesterov=True needs momentum > 0 and '
                             f"dampening = 0, got momentum={group['momentum']}"
                             f", dampening={group['dampening']}")
        for name in ('foreach', 'fused'):
            check_path_option(group, name)
        if group['fused'] and group['foreach']:
            raise ValueError('fused=True and foreach=True ask for two paths: '
                             'set one of them')

    @staticmethod
    def path(group: dict, on_cpu: bool) -> str:
        """The path ('fused', 'multi_tensor' or 'plain') a regular tensor
        of ``group`` takes, on CPU or elsewhere."""
        fused, foreach = group['fused'], group['foreach']
        if fused:
            return 'fused'
        if foreach:
            return 'multi_tensor'
        # None leaves the choice to the device's default, False rules the
        # path out of it.
        if (fused is None and on_cpu
                and kernels.installed('sgd') is not None):
            return 'fused'
        if foreach is None and not on_cpu:
            return 'multi_tensor'
        return 'plain'

    def _update_group(self, group: dict, params: List[Tensor]) -> None:
        momentum = group['momentum']
        # Routed once per group and device kind, then per tensor only where
        # the fast paths cannot take it.
        # The kernel and the multi-tensor path centralize rows along dim 0;
        # a transposed conv's output units (GCOptimWrapperConstructor's
        # transposed_conv='output') take the plain path.
        layout = group_layout(group)
        rows_along_dim0 = layout == dict(out_dim=0, groups=1)
        by_device = {on_cpu: self.path(group, on_cpu) if rows_along_dim0
                     else 'plain' for on_cpu in (True, False)}
        routed = {path: ([], [], []) for path in _PATHS}
        sparse = []
        for param in params:
            if param.grad.is_sparse:
                sparse.append(param)
                continue
            buf = None
            if momentum:
                state = self.state[param]
                buf = state.get('momentum_buffer')
                # A buffer made before the parameter changed layout,
                # device or dtype follows it (_like; skipped, per tensor
                # and step, where nothing changed).
                if buf is not None and (buf.stride() != param.stride()
                                        or buf.dtype != param.dtype
                                        or buf.device != param.device):
                    buf = state['momentum_buffer'] = self._like(param, buf)
            grad = param.grad
            path = by_device[param.is_cpu]
            if path != 'plain' and not fast_path_takes(param, grad, buf):
                path = 'plain'
            path_params, grads, bufs = routed[path]
            path_params.append(param)
            grads.append(grad)
            bufs.append(buf)
        if sparse:
            self._update_sparse(group, sparse)
        options = dict(
            gc_mode=group['gc_mode'],
            lr=group['lr'],
            weight_decay=group['weight_decay'],
            momentum=momentum,
            dampening=group['dampening'],
            nesterov=group['nesterov'],
            decoupled_weight_decay=self.decoupled_weight_decay)
        for path, (path_params, grads, bufs) in routed.items():
            if not path_params:
                continue
            try:
                _PATHS[path](path_params, grads, bufs, **options,
                             **(layout if path == 'plain' else {}))
            except Exception as error:
                raise RuntimeError(f'{type(self).__name__} {PATH_NAMES[path]} '
                                   f'path: {error}') from error
            finally:
                # Also after a failure midway: the buffers of the parameters
                # that moved (a path hands a first step's buffer back only
                # then), so their next step continues their momentum and
                # the others' next step is their first.
                if momentum:
                    for param, buf in zip(path_params, bufs):
                        if buf is not None:
                            self.state[param]['momentum_buffer'] = buf

    def _update_sparse(self, group: dict, params: List[Tensor]) -> None:
        """torch's SGD step of sparse gradients (GC off for them and no
        coupled decay: checked before anything moved), its momentum buffer
        sparse as torch's; SGDW's decay first, on the dense weights."""
        lr, weight_decay = group['lr'], group['weight_decay']
        if weight_decay and self.decoupled_weight_decay:
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        momentum = group['momentum']
        bufs = [self.state[param].get('momentum_buffer') if momentum
                else None for param in params]
        torch_sgd(params, [param.grad for param in params], bufs,
                  has_sparse_grad=True, foreach=False, weight_decay=0.,
                  momentum=momentum, lr=lr, dampening=group['dampening'],
                  nesterov=group['nesterov'], maximize=False)
        if momentum:
            for param, buf in zip(params, bufs):
                self.state[param]['momentum_buffer'] = buf


@OPTIMIZERS.register_module()
class SGD_GC(_SGDBase):
    __doc__ = _SGDBase.__doc__ + '\n    Coupled L2 inside GC, conv and fc.'
    default_gc_mode = 'conv_fc'


@OPTIMIZERS.register_module()
class SGD_GCC(_SGDBase):
    __doc__ = _SGDBase.__doc__ + '\n    Coupled L2 inside GC, conv only.'
    default_gc_mode = 'conv'


@OPTIMIZERS.register_module()
class SGDW_GC(_SGDBase):
    __doc__ = _SGDBase.__doc__ + '\n    Decoupled decay, conv and fc.'
    default_gc_mode = 'conv_fc'
    decoupled_weight_decay = True


@OPTIMIZERS.register_module()
class SGDW_GCC(_SGDBase):
    __doc__ = _SGDBase.__doc__ + '\n    Decoupled decay, conv only.'
    default_gc_mode = 'conv'
    decoupled_weight_decay = True
