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
"""
from typing import Dict, Optional

import torch
from mmengine.registry import OPTIMIZERS
from torch import Tensor

from ..centralize import centralize_, is_centralized
from .base import CLASS_RULE, HALF_DTYPES, GCOptimizer, check_non_negative


# Elements per block of the fast path: 4 MB of float32, so a block of grad,
# param, buffer and scratch stays in a CPU's last-level cache.
_BLOCK_ELEMENTS = 1 << 20


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
        blocked (bool): the fast path (True: rows in cache-sized blocks,
            fewer passes over memory, gradients left untouched) or the plain
            path in the authors' order (False: gradients used as scratch).
            Both give the same numbers to float rounding. Half-precision and
            non-contiguous parameters always take the plain path. Defaults
            to True.
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
                 blocked: bool = True):
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            gc_mode=gc_mode,
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

    def _update_group(self, group: dict, params) -> None:
        if not group['blocked']:
            super()._update_group(group, params)
            return
        # The fast path: per tensor, in blocks of whole rows that fit in the
        # CPU cache, so each element of grad, param and buffer is read from
        # memory once and every later op of the step hits the cache. GC is
        # row-local, so a block of rows is centralized exactly as the whole.
        # The direction lives in a scratch buffer (one block; a whole tensor
        # on an accelerator, where blocking buys nothing): gradients are left
        # untouched and no memory is held between steps.
        scratch = None
        for param in params:
            if param.dtype in HALF_DTYPES or not (
                    param.is_contiguous() and param.grad.is_contiguous()):
                super()._update_group(group, [param])
                continue
            rows = param.shape[0] if param.ndim > 1 else 1
            cols = param.numel() // rows
            block_rows = max(1, min(rows, _BLOCK_ELEMENTS //
                                    cols)) if param.is_cpu else rows
            size = block_rows * cols
            if (scratch is None or scratch.numel() < size
                    or scratch.dtype != param.dtype
                    or scratch.device != param.device):
                scratch = param.new_empty(size)
            self._update_in_blocks(param, group, rows, block_rows, scratch)

    def _update_in_blocks(self, param: Tensor, group: dict, rows: int,
                          block_rows: int, scratch: Tensor) -> None:
        lr, weight_decay = group['lr'], group['weight_decay']
        momentum, dampening = group['momentum'], group['dampening']
        coupled_decay = weight_decay and not self.decoupled_weight_decay
        centralized = is_centralized(param, group['gc_mode'])
        state = self.state[param]
        first_step = momentum and 'momentum_buffer' not in state
        if first_step:
            state['momentum_buffer'] = torch.empty_like(param)
        views = [t.view(rows, -1) for t in (param, param.grad)]
        if momentum:
            views.append(state['momentum_buffer'].view(rows, -1))
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
                buf = b[0]
                if first_step:
                    buf.copy_(d)
                elif dampening:
                    buf.mul_(momentum).add_(d, alpha=1 - dampening)
                else:
                    torch.add(d, buf, alpha=momentum, out=buf)
                direction = d.add_(buf, alpha=momentum) if group[
                    'nesterov'] else buf
            if weight_decay and self.decoupled_weight_decay:
                p.mul_(1 - lr * weight_decay)
            p.add_(direction, alpha=-lr)

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
