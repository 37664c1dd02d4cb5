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

Four paths give the same numbers to float rounding. By default CPU
parameters take the C++ kernel compiled at install (``fused``, see
:mod:`gc_mm.kernels`; without one, the cache-blocked path of eager torch
ops) and parameters elsewhere the multi-tensor path (``foreach``: each op
of the step runs once per batch of tensors, not once per tensor). The
plain path (``blocked=False``) is the authors' order, tensor by tensor.
"""
import math
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from mmengine.registry import OPTIMIZERS
from torch import Tensor

from .. import kernels
from ..centralize import centralize_, is_centralized
from .base import CLASS_RULE, HALF_DTYPES, GCOptimizer, check_non_negative


# Elements per block of the fast path: 4 MB of float32, so a block of grad,
# param, buffer and scratch stays in a CPU's last-level cache.
_BLOCK_ELEMENTS = 1 << 20


def _block_shape(param: Tensor) -> Tuple[int, int]:
    """(rows, columns) of one block of the fast path: whole rows, as many as
    fit in _BLOCK_ELEMENTS on a CPU (at least one), all on an accelerator."""
    rows = param.shape[0] if param.ndim > 1 else 1
    cols = param.numel() // rows if rows else 0
    if not param.is_cpu or cols == 0:  # all rows; or empty, nothing to do
        return rows, cols
    return max(1, min(rows, _BLOCK_ELEMENTS // cols)), cols


def _batches(params: List[Tensor], gc_mode: Optional[str],
             max_elements: int) -> Iterator[Tuple[List[Tensor], int]]:
    """Batches of the multi-tensor path, with their row length (0: not
    centralized). A batch shares a device, a dtype and a row length, so its
    gradients, concatenated, are one matrix whose rows GC centralizes as
    each tensor's own; it holds at most ``max_elements`` (or one tensor)."""
    open_batches = {}
    for param in params:
        cols = (param.numel() // param.shape[0]
                if is_centralized(param, gc_mode) else 0)
        key = (param.device, param.dtype, cols)
        batch, size = open_batches.get(key, ([], 0))
        if batch and size + param.numel() > max_elements:
            yield batch, cols
            batch, size = [], 0
        open_batches[key] = (batch + [param], size + param.numel())
    for (_, _, cols), (batch, _) in open_batches.items():
        yield batch, cols


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
            it on first use if it was not installed (45-50 s on 2 cores,
            then cached);
            refused for parameters off the CPU. None: use it on CPU if it
            was compiled at install (``pip install --no-build-isolation
            --use-pep517 -e .``, as tools/install.sh does) and no other
            path is asked for below. Defaults to None.
        foreach (bool | None): the multi-tensor path (the tensors of a
            group batched by device, dtype and row length, each op of the
            step run once per batch with torch's ``_foreach`` ops, so a GPU
            launches a few kernels per batch instead of several per tensor;
            transient memory at most the largest gradient). None: on for
            parameters off the CPU, where kernel launches dominate. Defaults
            to None.
        blocked (bool): where neither of the above applies, rows in
            cache-sized blocks (True) or the plain path in the authors'
            order (False: gradients used as scratch; with ``fused=None`` it
            also turns the installed kernel off). Defaults to True.

    All paths give the same numbers to float rounding; all but the plain
    one leave gradients untouched. Half-precision, empty and non-contiguous
    parameters always take the plain path.
    """

    decoupled_weight_decay = False

    def __init__(self,
                 params,
                 lr: float = 0.01,
                 momentum: float = 0.,
                 dampening: float = 0.,
                 weight_decay: float = 0.,
                 nesterov: bool = False,
                 gc_mode: Optional[str] = CLASS_RULE,
                 fused: Optional[bool] = None,
                 foreach: Optional[bool] = None,
                 blocked: bool = True):
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            gc_mode=gc_mode,
            fused=fused,
            foreach=foreach,
            blocked=blocked)
        super().__init__(params, defaults)

    def _check_group(self, group: dict) -> None:
        check_non_negative(group, 'lr', 'momentum', 'dampening',
                           'weight_decay')
        if group['nesterov'] and (group['momentum'] <= 0
                                  or group['dampening'] != 0):
            raise ValueError('nesterov=True needs momentum > 0 and '
                             f"dampening = 0, got momentum={group['momentum']}"
                             f", dampening={group['dampening']}")
        if not isinstance(group['blocked'], bool):
            raise ValueError(
                f"blocked must be True or False, got {group['blocked']!r}")
        for name in ('foreach', 'fused'):
            if not (group[name] is None or isinstance(group[name], bool)):
                raise ValueError(f'{name} must be None (automatic), True or '
                                 f'False, got {group[name]!r}')

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for param in group['params']:
            try:
                self._check_device(param, group, len(self.param_groups) - 1)
            except RuntimeError:
                self.param_groups.pop()  # leave the optimizer as it was
                raise

    def _check_param(self, param: Tensor, group: dict, index: int) -> None:
        super()._check_param(param, group, index)
        self._check_device(param, group, index)

    def _check_device(self, param: Tensor, group: dict, index: int) -> None:
        if group['fused'] is True and not param.is_cpu:
            raise RuntimeError(
                f'{type(self).__name__}(fused=True) runs on CPU parameters '
                f'only (gc_mm has no {param.device.type} kernel yet); param '
                f'group {index} has one on {param.device}. Use the default '
                'path (fused=None), which runs on any device.')

    @staticmethod
    def path(group: dict, on_cpu: bool) -> str:
        """The path ('fused', 'multi_tensor', 'plain' or 'blocked') a
        regular tensor of ``group`` takes, on CPU or elsewhere, in the order
        docs/benchmark.md gives."""
        if group['fused']:
            return 'fused'
        if not on_cpu if group['foreach'] is None else group['foreach']:
            return 'multi_tensor'
        if not group['blocked']:
            return 'plain'
        if (group['fused'] is None and on_cpu
                and kernels.installed('sgd') is not None):
            return 'fused'
        return 'blocked'

    def _update_group(self, group: dict, params) -> None:
        # The fast paths leave gradients untouched and hold no memory
        # between steps. Half-precision (float32 maths), empty and
        # non-contiguous tensors take the plain path on every setting.
        paths = {name: [] for name in ('fused', 'plain', 'blocked',
                                       'multi_tensor')}
        # Decided once per group and device kind, not per tensor: routing
        # each tensor was half the step's Python time (0.3 of 0.7 ms on
        # R50, where the kernel takes about 25).
        by_device = {on_cpu: paths[self.path(group, on_cpu)]
                     for on_cpu in (True, False)}
        for param in params:
            if param.dtype in HALF_DTYPES or param.numel() == 0 or not (
                    param.is_contiguous() and param.grad.is_contiguous()):
                paths['plain'].append(param)
            else:
                by_device[param.is_cpu].append(param)
        if paths['fused']:
            self._update_fused(group, paths['fused'])
        if paths['plain']:
            super()._update_group(group, paths['plain'])
        if paths['blocked']:
            self._update_blocked(group, paths['blocked'])
        if paths['multi_tensor']:
            self._update_multi_tensor(group, paths['multi_tensor'])

    def _update_blocked(self, group: dict, params: List[Tensor]) -> None:
        # Blocks of whole rows that fit in the CPU cache, so each element of
        # grad, param and buffer is read from memory once and every later op
        # of the step hits the cache; GC is row-local, so a block of rows is
        # centralized exactly as the whole. The direction lives in a scratch
        # buffer (one block; a whole tensor on an accelerator).
        scratch = {}  # one block per dtype and device, for the whole step
        for param in params:
            key = (param.dtype, param.device)
            if key not in scratch:
                # Allocated once at its largest, so the step touches fresh
                # pages once (a growing buffer would fault on each regrowth).
                scratch[key] = param.new_empty(max(
                    math.prod(_block_shape(p)) for p in params
                    if (p.dtype, p.device) == key))
            self._update_in_blocks(param, group, scratch[key])

    def _update_multi_tensor(self, group: dict, params: List[Tensor]) -> None:
        lr, weight_decay = group['lr'], group['weight_decay']
        momentum, dampening = group['momentum'], group['dampening']
        largest = max(param.numel() for param in params)
        for batch, cols in _batches(params, group['gc_mode'], largest):
            # The batch's directions, in one buffer: GC centralizes them as
            # one matrix of rows, one reduction for the whole batch.
            flat = torch.cat([param.grad.view(-1) for param in batch])
            directions = [
                chunk.view_as(param) for chunk, param in zip(
                    flat.split([param.numel() for param in batch]), batch)
            ]
            if weight_decay and not self.decoupled_weight_decay:
                torch._foreach_add_(directions, batch, alpha=weight_decay)
            if cols:
                centralize_([flat.view(-1, cols)])
            if momentum:
                bufs, new_bufs, new_directions = [], [], []
                old_bufs, old_directions = [], []
                for param, direction in zip(batch, directions):
                    buf, first_step = self._momentum_buffer(param, momentum)
                    bufs.append(buf)
                    if first_step:
                        new_bufs.append(buf)
                        new_directions.append(direction)
                    else:
                        old_bufs.append(buf)
                        old_directions.append(direction)
                if new_bufs:
                    torch._foreach_copy_(new_bufs, new_directions)
                if old_bufs:
                    torch._foreach_mul_(old_bufs, momentum)
                    torch._foreach_add_(old_bufs, old_directions,
                                        alpha=1 - dampening)
                if group['nesterov']:
                    torch._foreach_add_(directions, bufs, alpha=momentum)
                else:
                    directions = bufs
            if weight_decay and self.decoupled_weight_decay:
                torch._foreach_mul_(batch, 1 - lr * weight_decay)
            torch._foreach_add_(batch, directions, alpha=-lr)

    def _update_in_blocks(self, param: Tensor, group: dict,
                          scratch: Tensor) -> None:
        lr, weight_decay = group['lr'], group['weight_decay']
        momentum, dampening = group['momentum'], group['dampening']
        coupled_decay = weight_decay and not self.decoupled_weight_decay
        centralized = is_centralized(param, group['gc_mode'])
        buf, first_step = self._momentum_buffer(param, momentum)
        block_rows, cols = _block_shape(param)
        rows = param.numel() // cols
        views = [t.view(rows, cols) for t in (param, param.grad)]
        if momentum:
            views.append(buf.view(rows, cols))
        for start in range(0, rows, block_rows):
            p, g, *b = [v[start:start + block_rows] for v in views]
            d = scratch[:g.numel()].view(g.shape)
            if coupled_decay:
                torch.add(g, p, alpha=weight_decay, out=d)
            else:
                d.copy_(g)
            if centralized:  # decided on the parameter's shape, above
                centralize_([d])
            direction = d
            if momentum:
                block_buf = b[0]
                if first_step:
                    block_buf.copy_(d)
                elif dampening:
                    block_buf.mul_(momentum).add_(d, alpha=1 - dampening)
                else:
                    torch.add(d, block_buf, alpha=momentum, out=block_buf)
                direction = d.add_(block_buf, alpha=momentum) if group[
                    'nesterov'] else block_buf
            if weight_decay and self.decoupled_weight_decay:
                p.mul_(1 - lr * weight_decay)
            p.add_(direction, alpha=-lr)

    def _momentum_buffer(self, param: Tensor,
                         momentum: float) -> Tuple[Optional[Tensor], bool]:
        """The fast paths' momentum buffer (None without momentum) and
        whether this is its first step: then it is new, to be written, not
        read."""
        if not momentum:
            return None, False
        state = self.state[param]
        first_step = 'momentum_buffer' not in state
        if first_step:
            state['momentum_buffer'] = torch.empty_like(param)
        return state['momentum_buffer'], first_step

    def _update_fused(self, group: dict, params: List[Tensor]) -> None:
        step = kernels.load('sgd').sgd_gc_step
        options = (group['lr'], group['weight_decay'], group['momentum'],
                   group['dampening'], group['nesterov'],
                   self.decoupled_weight_decay)
        for param in params:
            buf, first_step = self._momentum_buffer(param, group['momentum'])
            step(param, param.grad, buf,
                 is_centralized(param, group['gc_mode']), *options,
                 first_step)

    def _update_tensor(self, param: Tensor, grad: Tensor,
                       state: Dict[str, Tensor], group: dict) -> None:
        lr, weight_decay = group['lr'], group['weight_decay']
        momentum = group['momentum']
        if weight_decay and not self.decoupled_weight_decay:
            grad.add_(param, alpha=weight_decay)
        if group['gc_mode'] is not None:
            centralize_([grad], conv_only=group['gc_mode'] == 'conv')
        direction = grad
        if momentum:
            buf = state.get('momentum_buffer')
            if buf is None:
                buf = state['momentum_buffer'] = grad.clone()
            else:
                buf.mul_(momentum).add_(grad, alpha=1 - group['dampening'])
            direction = grad.add_(buf, alpha=momentum) if group[
                'nesterov'] else buf
        if weight_decay and self.decoupled_weight_decay:
            param.mul_(1 - lr * weight_decay)
        param.add_(direction, alpha=-lr)


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
