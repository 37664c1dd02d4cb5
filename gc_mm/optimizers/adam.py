"""Adam and the authors' AdamW with Gradient Centralization.

Update rules (t = step, bc1 = 1 - b1^t, bc2 = 1 - b2^t, P = GC under the
optimizer's gc_mode, v is max(v) over time with amsgrad)::

    Adam_GC / Adam_GCC:      g' = P(g + wd * w)
                             m = b1 m + (1 - b1) g';  v = b2 v + (1 - b2) g'^2
                             w = w - (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)
    Adam_GC2 / Adam_GCC2:    moments from g + wd * w (not centralized);
                             w = w - P((lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps))
    AdamW_GC / AdamW_GCC:    moments from P(g);
                             w = w - lr sqrt(bc2) / bc1 * (wd w + m / (sqrt(v) + eps))
    AdamW_GC2 / AdamW_GCC2:  moments from g;
                             w = w - P(lr sqrt(bc2) / bc1 * (wd w + m / (sqrt(v) + eps)))

Paths: on CPU every variant takes the C++ kernel
(gc_mm/kernels/adaptive.cpp, :mod:`gc_mm.optimizers.fused`: decay, GC,
moments and update in one pass over memory) where it was compiled at
install, or with ``fused=True``. On CUDA, Adam_GC and Adam_GCC are torch's
fused Adam fed with ``P(g + wd * w)`` (decay and GC on copies of the
gradients). Everything else (half precision, a gradient or state whose
layout differs from its parameter's, ``fused=False``, the other variants
off the CPU) takes the plain path, the authors' loop tensor by tensor.

After ``step()``, ``p.grad`` is as backward left it, on every path (the
authors' code centralized it in place; torch's optimizers never write it).

The AdamW here is the authors' (decay scaled by sqrt(bc2)/bc1, eps added to
the uncorrected sqrt(v)), not ``torch.optim.AdamW``. The "2" variants
centralize the update instead of the gradient, which keeps each row's mean
weight fixed; the authors recommend them for adaptive optimizers.

Example::

    optim_wrapper = dict(optimizer=dict(
        type='AdamW_GC2', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05))
"""
import functools
import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.optim.adam as torch_adam
from mmengine.registry import OPTIMIZERS
from torch import Tensor
from torch.optim.adam import adam

from ..centralize import is_centralized
from .base import (CLASS_RULE, GCOptimizer, centralize_group_, check_betas,
                   check_non_negative)
from .fused import adaptive_steps, check_path_option


@functools.lru_cache(maxsize=None)
def _torch_fused_adam_devices() -> Tuple[str, ...]:
    """Devices where Adam_GC hands the update to torch's fused Adam (one
    kernel per tensor for moments and update): CUDA, and the CPU where this
    torch has a CPU kernel for it (2.4 and later; tried on one element)."""
    zeros = [torch.zeros(1) for _ in range(4)]
    try:
        torch_adam.adam(
            zeros[:1], zeros[1:2], zeros[2:3], zeros[3:], [],
            [torch.zeros(())], fused=True, amsgrad=False, beta1=0.9,
            beta2=0.999, lr=0., weight_decay=0., eps=1e-8, maximize=False)
    except (NotImplementedError, RuntimeError):
        return ('cuda', )
    return ('cpu', 'cuda')


def _fits_torch_fused(param: Tensor) -> bool:
    """Whether torch's fused Adam updates ``param`` right. Its kernel walks
    the memory of a parameter, its gradient and its moments as one flat
    array, so all four need the same dense layout (the moments are made in
    the parameter's, see GCOptimizer.load_state_dict); half-precision
    parameters keep float32 moments on the plain path."""
    grad = param.grad
    return (param.dtype in (torch.float32, torch.float64)
            and param.device.type in _torch_fused_adam_devices()
            and grad.stride() == param.stride()
            and (param.is_contiguous()
                 or param.is_contiguous(memory_format=torch.channels_last)))


class _AdamBase(GCOptimizer):
    """Adam-family optimizer with GC (Yong et al., ECCV 2020).

    Args:
        params: parameters or param-group dicts to optimize.
        lr (float): learning rate. Defaults to 1e-3.
        betas (tuple[float, float]): moment coefficients, each in [0, 1).
            Defaults to (0.9, 0.999).
        eps (float): added to the denominator. Defaults to 1e-8.
        weight_decay (float): L2 factor (coupled for Adam_*, decoupled for
            AdamW_*). Defaults to 0.
        amsgrad (bool): use the running maximum of the second moment.
            Defaults to False.
        gc_mode (str | None): 'conv_fc', 'conv' or None (GC off); defaults to
            the class's rule. A param group may set its own.
        fused (bool | None): the C++ kernel, for CPU parameters. None: where
            it was compiled at install; True: always (compiled on first use
            if need be); False: never. Defaults to None. It chooses a path,
            not the maths.
    """

    # The authors' AdamW: decay added to the update, scaled by sqrt(bc2)/bc1.
    decoupled_weight_decay = False
    # "2" variants: centralize the final update rather than the gradient.
    centralize_update = False

    def __init__(self,
                 params,
                 lr: float = 1e-3,
                 betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8,
                 weight_decay: float = 0.,
                 amsgrad: bool = False,
                 gc_mode: Optional[str] = CLASS_RULE,
                 fused: Optional[bool] = None):
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            gc_mode=gc_mode,
            fused=fused)
        super().__init__(params, defaults)

    path_options = ('fused', )
    kernel = 'adaptive'

    def _check_group(self, group: dict) -> None:
        check_non_negative(group, 'lr', 'eps', 'weight_decay')
        check_betas(group)
        check_path_option(group)

    def _update_group(self, group: dict, params: List[Tensor]) -> None:
        on_kernel, others = self._split_for_kernel(group, params)
        # Adam_GC and Adam_GCC off the kernel (off the CPU) are torch's Adam
        # fed with P(g + wd * w): the decay and GC in place on the
        # gradients, then torch's fused Adam. The authors' AdamW and the
        # "2" variants have other update rules.
        torch_fused = not (self.decoupled_weight_decay
                           or self.centralize_update)
        on_torch_fused, plain = {}, []
        for param in others:
            if torch_fused and _fits_torch_fused(param):
                on_torch_fused.setdefault((param.device, param.dtype),
                                          []).append(param)
            else:
                plain.append(param)
        if on_kernel:
            self._update_kernel(on_kernel, group)
        for tensors in on_torch_fused.values():
            self._update_fused(group, tensors)
        if plain:
            self._update_plain(group, plain)

    def _kernel_takes(self, param: Tensor, group: dict) -> bool:
        self._init_state(self.state[param], param, group)
        return self._state_fits_kernel(
            param, ('exp_avg', 'exp_avg_sq', 'max_exp_avg_sq'))

    def _update_kernel(self, params: List[Tensor], group: dict) -> None:
        """The C++ kernel, one call for the group: this variant's rule as
        the kernel's numbers."""
        beta1, beta2 = group['betas']
        states = [self.state[param] for param in params]
        denom_scales, step_sizes = [], []
        for state in states:
            state['step'] += 1
            bias_correction1 = 1 - beta1**state['step']
            bias_correction2 = 1 - beta2**state['step']
            if self.decoupled_weight_decay:  # the authors' AdamW
                denom_scales.append(1.)
                step_sizes.append(group['lr'] * math.sqrt(bias_correction2) /
                                  bias_correction1)
            else:
                denom_scales.append(1 / math.sqrt(bias_correction2))
                step_sizes.append(group['lr'] / bias_correction1)
        on_centralized = 'update' if self.centralize_update else 'gradient'
        adaptive_steps(
            params, [param.grad for param in params],
            [state['exp_avg'] for state in states],
            [state['exp_avg_sq'] for state in states],
            [state.get('max_exp_avg_sq') for state in states],
            [on_centralized if is_centralized(param, group['gc_mode']) else
             'none' for param in params],
            weight_decay=group['weight_decay'],
            decay='in_update' if self.decoupled_weight_decay else 'inside_gc',
            beta1=beta1, beta2=beta2, denom_scales=denom_scales,
            eps=group['eps'], step_sizes=step_sizes)

    def _update_fused(self, group: dict, params: List[Tensor]) -> None:
        grads = [param.grad for param in params]
        # What torch's Adam is fed, in new tensors: p.grad stays what
        # backward left, as in torch's optimizers (torch's foreach Adam
        # makes the same copy for its decay).
        if group['weight_decay']:
            grads = torch._foreach_add(grads, params,
                                       alpha=group['weight_decay'])
        elif group['gc_mode'] is not None:
            grads = [grad.clone() for grad in grads]
        centralize_group_(grads, group)
        states = [self.state[param] for param in params]
        for state, param in zip(states, params):
            self._init_state(state, param, group)
            # A parameter may have changed layout since its moments were
            # made (model.to(memory_format=...)); they are made together.
            if state['exp_avg'].stride() != param.stride():
                for key in ('exp_avg', 'exp_avg_sq', 'max_exp_avg_sq'):
                    if key in state:
                        state[key] = self._like(param, state[key])
        # The state keeps the step count as a Python int, as the plain path
        # does (so a checkpoint is the same from either path); torch's Adam
        # reads it from, and adds 1 to, one tensor per parameter.
        steps = torch.tensor([float(state['step']) for state in states],
                             dtype=torch.float32,
                             device=params[0].device).unbind()
        beta1, beta2 = group['betas']
        adam(params, grads, [state['exp_avg'] for state in states],
             [state['exp_avg_sq'] for state in states],
             [state['max_exp_avg_sq'] for state in states]
             if group['amsgrad'] else [], list(steps), fused=True,
             amsgrad=group['amsgrad'], beta1=beta1, beta2=beta2,
             lr=group['lr'], weight_decay=0., eps=group['eps'],
             maximize=False)
        for state in states:
            state['step'] += 1

    @staticmethod
    def _init_state(state: dict, param: Tensor, group: dict) -> None:
        """Fill a parameter's empty state (float32 for half precision:
        ``param`` is then the float32 copy being updated)."""
        if not state:
            state['step'] = 0
            state['exp_avg'] = torch.zeros_like(param)
            state['exp_avg_sq'] = torch.zeros_like(param)
            if group['amsgrad']:
                state['max_exp_avg_sq'] = torch.zeros_like(param)

    def _update_tensor(self, param: Tensor, grad: Tensor,
                       state: Dict[str, Tensor], group: dict) -> None:
        lr, eps, weight_decay = group['lr'], group['eps'], group[
            'weight_decay']
        beta1, beta2 = group['betas']
        centralized = is_centralized(param, group['gc_mode'])
        self._init_state(state, param, group)
        state['step'] += 1
        bias_correction1 = 1 - beta1**state['step']
        bias_correction2 = 1 - beta2**state['step']

        # What the moments are fed, in a new tensor where it is not the
        # gradient itself: p.grad stays what backward left, as in torch's
        # optimizers (the authors' code wrote it in place).
        if weight_decay and not self.decoupled_weight_decay:
            grad = grad.add(param, alpha=weight_decay)
        if centralized and not self.centralize_update:
            if grad is param.grad:
                grad = grad.clone()
            centralize_group_([grad], group)
        exp_avg, exp_avg_sq = state['exp_avg'], state['exp_avg_sq']
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        second_moment = exp_avg_sq
        if group['amsgrad']:
            second_moment = torch.maximum(
                state['max_exp_avg_sq'], exp_avg_sq,
                out=state['max_exp_avg_sq'])

        denom = second_moment.sqrt()
        if self.decoupled_weight_decay:
            step_size = lr * math.sqrt(bias_correction2) / bias_correction1
            denom.add_(eps)
        else:
            step_size = lr / bias_correction1
            denom.div_(math.sqrt(bias_correction2)).add_(eps)
        on_update = centralized and self.centralize_update
        if self.decoupled_weight_decay and weight_decay:
            update = torch.mul(param, weight_decay).addcdiv_(exp_avg, denom)
        elif on_update:
            update = exp_avg / denom
        else:  # the common case in one fused op, as in torch's Adam
            param.addcdiv_(exp_avg, denom, value=-step_size)
            return
        if on_update:
            centralize_group_([update], group)
        param.add_(update, alpha=-step_size)


@OPTIMIZERS.register_module()
class Adam_GC(_AdamBase):
    __doc__ = _AdamBase.__doc__ + "\n    Adam, coupled L2, GC of the gradient, conv and fc."
    default_gc_mode = 'conv_fc'


@OPTIMIZERS.register_module()
class Adam_GCC(_AdamBase):
    __doc__ = _AdamBase.__doc__ + "\n    Adam, coupled L2, GC of the gradient, conv only."
    default_gc_mode = 'conv'


@OPTIMIZERS.register_module()
class Adam_GC2(_AdamBase):
    __doc__ = _AdamBase.__doc__ + "\n    Adam, coupled L2, GC of the update, conv and fc."
    default_gc_mode = 'conv_fc'
    centralize_update = True


@OPTIMIZERS.register_module()
class Adam_GCC2(_AdamBase):
    __doc__ = _AdamBase.__doc__ + "\n    Adam, coupled L2, GC of the update, conv only."
    default_gc_mode = 'conv'
    centralize_update = True


@OPTIMIZERS.register_module()
class AdamW_GC(_AdamBase):
    __doc__ = _AdamBase.__doc__ + "\n    The authors' AdamW, GC of the gradient, conv and fc."
    default_gc_mode = 'conv_fc'
    decoupled_weight_decay = True


@OPTIMIZERS.register_module()
class AdamW_GCC(_AdamBase):
    __doc__ = _AdamBase.__doc__ + "\n    The authors' AdamW, GC of the gradient, conv only."
    default_gc_mode = 'conv'
    decoupled_weight_decay = True


@OPTIMIZERS.register_module()
class AdamW_GC2(_AdamBase):
    __doc__ = _AdamBase.__doc__ + "\n    The authors' AdamW, GC of the update, conv and fc."
    default_gc_mode = 'conv_fc'
    decoupled_weight_decay = True
    centralize_update = True


@OPTIMIZERS.register_module()
class AdamW_GCC2(_AdamBase):
    __doc__ = _AdamBase.__doc__ + "\n    The authors' AdamW, GC of the update, conv only."
    default_gc_mode = 'conv'
    decoupled_weight_decay = True
    centralize_update = True
