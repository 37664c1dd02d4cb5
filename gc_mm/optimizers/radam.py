"""RAdam with Gradient Centralization, and Ranger (RAdam + GC + Lookahead).

RAdam (Liu et al., "On the Variance of the Adaptive Learning Rate and
Beyond", ICLR 2020) as ``torch.optim.RAdam`` computes it. With t the
parameter's step, bc1 = 1 - b1^t, bc2 = 1 - b2^t and P = GC under the
group's ``gc_mode``::

    coupled decay:     d = g + wd * w
    decoupled decay:   d = g;  w = (1 - lr * wd) w
    gc_loc='gradient': d = P(d)
    m = b1 m + (1 - b1) d;  v = b2 v + (1 - b2) d^2
    rho_inf = 2 / (1 - b2) - 1;  rho_t = rho_inf - 2 t b2^t / bc2
    rho_t > 5:  u = r_t * (m / bc1) * sqrt(bc2) / (sqrt(v) + eps),
                r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf
                           / ((rho_inf - 4)(rho_inf - 2) rho_t))
    rho_t <= 5: u = m / bc1                   (the un-adapted step, as torch)
    gc_loc='update':   u = P(u)
    w = w - lr * u

With b2 = 0.999 the first five steps are un-adapted. Coupled decay is
inside GC (as in SGD_GC and Adam_GC); decoupled decay, as torch's
``decoupled_weight_decay=True`` and Ranger, is never centralized.

Faults of popular RAdam/Ranger versions this one avoids (each has a test):
the rectification term is computed from each group's own betas and each
parameter's own step (no ``step % 10`` cache shared across groups); the
update is never written into the first moment (``m`` is only read, and the
un-adapted step of ``gc_loc='update'`` centralizes a copy); ``step(closure)``
uses the gradients the closure computes; the state dict resumes bit-exact.

On CPU the rectified steps take the C++ kernel (gc_mm/kernels/adaptive.cpp:
decay, GC, moments and update in one pass over memory) where it was
compiled at install, or with ``fused=True``; the un-adapted first steps,
half-precision tensors and ``fused=False`` take the plain path.

After ``step()``, ``p.grad`` is as backward left it, on every path (the
authors' code centralized it in place; torch's optimizers never write it).
Half-precision parameters are updated through a float32 copy, with float32
moments.

Example::

    optim_wrapper = dict(optimizer=dict(
        type='Ranger', lr=1e-3, weight_decay=1e-4))
    optim_wrapper = dict(optimizer=dict(
        type='RAdam_GC', lr=1e-3, weight_decay=1e-2,
        decoupled_weight_decay=True, gc_loc='update'))
"""
import math
from typing import Dict, List, Optional, Tuple

import torch
from mmengine.registry import OPTIMIZERS
from torch import Tensor

from ..centralize import is_centralized
from .base import (CLASS_RULE, GCOptimizer, centralize_group_, check_betas,
                   check_non_negative)
from .fused import adaptive_steps, check_path_option
from .lookahead import Lookahead

GC_LOCS = ('gradient', 'update')
# rho_t at or below this: the variance of the adaptive step is intractable
# and RAdam takes the un-adapted step (Liu et al.; torch uses 5 too).
RHO_THRESHOLD = 5.


def rectification(beta2: float, step: int) -> Optional[float]:
    """RAdam's r_t for this ``step`` (from 1), or None while rho_t <= 5
    (the un-adapted step). The arithmetic of torch.optim.RAdam."""
    bias_correction2 = 1 - beta2**step
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * (beta2**step) / bias_correction2
    if rho_t <= RHO_THRESHOLD:
        return None
    return ((rho_t - 4) * (rho_t - 2) * rho_inf /
            ((rho_inf - 4) * (rho_inf - 2) * rho_t))**0.5


@OPTIMIZERS.register_module()
class RAdam_GC(GCOptimizer):
    """RAdam with Gradient Centralization (see the module docstring).

    Args:
        params: parameters or param-group dicts to optimize.
        lr (float): learning rate. Defaults to 1e-3.
        betas (tuple[float, float]): moment coefficients, each in [0, 1).
            Defaults to (0.9, 0.999).
        eps (float): added to sqrt(v). Defaults to 1e-8.
        weight_decay (float): decay factor. Defaults to 0.
        decoupled_weight_decay (bool): ``w *= 1 - lr * wd`` before the
            update, as torch's RAdam with ``decoupled_weight_decay=True``;
            False: L2 added to the gradient, inside GC. Defaults to False.
        gc_mode (str | None): 'conv_fc', 'conv' or None (GC off). Defaults
            to 'conv_fc'.
        gc_loc (str): 'gradient' (centralize what the moments are fed, as
            Ranger) or 'update' (centralize the final step, which keeps the
            row means of the weights fixed without decay). Defaults to
            'gradient'.
        fused (bool | None): the C++ kernel for the rectified steps of CPU
            parameters. None: where it was compiled at install; True:
            always (compiled on first use if need be); False: never.
            Defaults to None.

    Every option may be set per param group.
    """

    default_gc_mode = 'conv_fc'

    def __init__(self,
                 params,
                 lr: float = 1e-3,
                 betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8,
                 weight_decay: float = 0.,
                 decoupled_weight_decay: bool = False,
                 gc_mode: Optional[str] = CLASS_RULE,
                 gc_loc: str = 'gradient',
                 fused: Optional[bool] = None):
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            gc_mode=gc_mode,
            gc_loc=gc_loc,
            fused=fused)
        super().__init__(params, defaults)

    path_options = ('fused', )
    kernel = 'adaptive'

    def _check_group(self, group: dict) -> None:
        check_non_negative(group, 'lr', 'eps', 'weight_decay')
        check_betas(group)
        if not isinstance(group['decoupled_weight_decay'], bool):
            raise ValueError('decoupled_weight_decay must be a bool, got '
                             f"{group['decoupled_weight_decay']!r}")
        if group['gc_loc'] not in GC_LOCS:
            raise ValueError(f"gc_loc must be 'gradient' (centralize the "
                             f"gradient) or 'update' (centralize the step), "
                             f"got {group['gc_loc']!r}")
        check_path_option(group)

    @staticmethod
    def _init_state(state: dict, param: Tensor) -> None:
        if not state:
            state['step'] = 0
            state['exp_avg'] = torch.zeros_like(param)
            state['exp_avg_sq'] = torch.zeros_like(param)

    def _kernel_takes(self, param: Tensor, group: dict) -> bool:
        """Whether the kernel makes this step: a rectified one (the
        un-adapted first steps are a different rule, on the plain path)."""
        state = self.state[param]
        self._init_state(state, param)
        if rectification(group['betas'][1], state['step'] + 1) is None:
            return False
        return self._state_fits_kernel(param, ('exp_avg', 'exp_avg_sq'))

    def _update_kernel(self, params: List[Tensor], group: dict) -> None:
        """Rectified steps in the C++ kernel, one call for the group:
        u = m / (sqrt(v) + eps), scaled by lr r_t sqrt(bc2) / bc1."""
        beta1, beta2 = group['betas']
        states = [self.state[param] for param in params]
        step_sizes = []
        for state in states:
            state['step'] += 1
            step = state['step']
            step_sizes.append(group['lr'] * rectification(beta2, step) *
                              math.sqrt(1 - beta2**step) / (1 - beta1**step))
        adaptive_steps(
            params, [param.grad for param in params],
            [state['exp_avg'] for state in states],
            [state['exp_avg_sq'] for state in states], [None] * len(params),
            [group['gc_loc'] if is_centralized(param, group['gc_mode']) else
             'none' for param in params],
            weight_decay=group['weight_decay'],
            decay=('decoupled' if group['decoupled_weight_decay'] else
                   'inside_gc'), beta1=beta1, beta2=beta2,
            denom_scales=[1.] * len(params), eps=group['eps'],
            step_sizes=step_sizes, lr=group['lr'])

    def _update_tensor(self, param: Tensor, grad: Tensor,
                       state: Dict[str, Tensor], group: dict) -> None:
        lr, eps, weight_decay = group['lr'], group['eps'], group[
            'weight_decay']
        beta1, beta2 = group['betas']
        decoupled = group['decoupled_weight_decay']
        centralized = is_centralized(param, group['gc_mode'])
        on_gradient = centralized and group['gc_loc'] == 'gradient'
        on_update = centralized and group['gc_loc'] == 'update'
        self._init_state(state, param)
        state['step'] += 1
        step = state['step']

        # What the moments are fed, in a new tensor where it is not the
        # gradient itself: p.grad stays what backward left, as in torch's
        # optimizers.
        if weight_decay and not decoupled:
            grad = grad.add(param, alpha=weight_decay)
        if on_gradient:
            if grad is param.grad:
                grad = grad.clone()
            centralize_group_([grad], group)
        if weight_decay and decoupled:
            param.mul_(1 - lr * weight_decay)
        exp_avg, exp_avg_sq = state['exp_avg'], state['exp_avg_sq']
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)

        bias_correction1 = 1 - beta1**step
        rect = rectification(beta2, step)
        if rect is None:
            # The un-adapted step reads the first moment; anything done to
            # the step (GC of the update) is done to a copy.
            step_size = lr / bias_correction1
            if not on_update:
                param.add_(exp_avg, alpha=-step_size)
                return
            update = exp_avg.clone()
        else:
            step_size = (lr * rect * math.sqrt(1 - beta2**step) /
                         bias_correction1)
            denom = exp_avg_sq.sqrt().add_(eps)
            if not on_update:
                param.addcdiv_(exp_avg, denom, value=-step_size)
                return
            update = exp_avg / denom
        centralize_group_([update], group)
        param.add_(update, alpha=-step_size)


@OPTIMIZERS.register_module()
class Ranger(Lookahead):
    """Ranger: RAdam_GC inside :class:`~gc_mm.optimizers.Lookahead`, with
    Ranger's defaults (lessw2020/Ranger-Deep-Learning-Optimizer).

    ``Ranger(params, **kw)`` is ``Lookahead(params, k=k, alpha=alpha,
    optimizer=dict(type='RAdam_GC', ...))``: the slow weights, the state
    dict and :class:`~gc_mm.hooks.SlowWeightsHook` are Lookahead's, the
    inner update is RAdam_GC's (its param groups are Ranger's).

    Args:
        params: parameters or param-group dicts to optimize.
        lr (float): Defaults to 1e-3.
        betas (tuple[float, float]): Defaults to (0.95, 0.999).
        eps (float): Defaults to 1e-5.
        weight_decay (float): Defaults to 0.
        decoupled_weight_decay (bool): Defaults to True (Ranger's decay).
        gc_mode (str | None): Defaults to 'conv_fc'.
        gc_loc (str): Defaults to 'gradient'.
        k (int): inner steps between synchronizations. Defaults to 6.
        alpha (float): slow-weight step. Defaults to 0.5.
        fused (bool | None): RAdam_GC's ``fused``. Defaults to None.
    """

    def __init__(self,
                 params,
                 lr: float = 1e-3,
                 betas: Tuple[float, float] = (0.95, 0.999),
                 eps: float = 1e-5,
                 weight_decay: float = 0.,
                 decoupled_weight_decay: bool = True,
                 gc_mode: Optional[str] = 'conv_fc',
                 gc_loc: str = 'gradient',
                 k: int = 6,
                 alpha: float = 0.5,
                 fused: Optional[bool] = None):
        super().__init__(
            params,
            optimizer=dict(
                type=RAdam_GC,
                lr=lr,
                betas=betas,
                eps=eps,
                weight_decay=weight_decay,
                decoupled_weight_decay=decoupled_weight_decay,
                gc_mode=gc_mode,
                gc_loc=gc_loc,
                fused=fused),
            k=k,
            alpha=alpha)
