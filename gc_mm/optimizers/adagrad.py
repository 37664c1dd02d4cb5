"""Adagrad with Gradient Centralization: Adagrad_GC, Adagrad_GCC.

Update rule (t = step, P = GC under the optimizer's gc_mode)::

    g' = P(g + wd * w)
    sum = sum + g'^2                 (sum starts at initial_accumulator_value)
    clr = lr / (1 + (t - 1) * lr_decay)
    w = w - clr * g' / (sqrt(sum) + eps)

On CPU the C++ kernel (gc_mm/kernels/adaptive.cpp) does the whole step
in one pass over memory where it was compiled at install, or with
``fused=True``; elsewhere the plain path, tensor by tensor.

After ``step()``, ``p.grad`` is as backward left it, on every path (the
authors' code wrote g' there; torch's optimizers never write it).

Example::

    optim_wrapper = dict(optimizer=dict(type='Adagrad_GCC', lr=0.01))
"""
from typing import Dict, List, Optional

import torch
from mmengine.registry import OPTIMIZERS
from torch import Tensor

from ..centralize import is_centralized
from .base import (CLASS_RULE, GCOptimizer, centralize_group_,
                   check_non_negative)
from .fused import adaptive_steps, check_path_option


class _AdagradBase(GCOptimizer):
    """Adagrad with GC (Yong et al., ECCV 2020).

    Args:
        params: parameters or param-group dicts to optimize.
        lr (float): learning rate. Defaults to 0.01.
        lr_decay (float): learning-rate decay per step. Defaults to 0.
        weight_decay (float): coupled L2 factor, inside GC. Defaults to 0.
        initial_accumulator_value (float): start of the sum of squares.
            Defaults to 0.
        eps (float): added to the denominator. Defaults to 1e-10.
        gc_mode (str | None): 'conv_fc', 'conv' or None (GC off); defaults to
            the class's rule. A param group may set its own.
        fused (bool | None): the C++ kernel, for CPU parameters. None: where
            it was compiled at install; True: always (compiled on first use
            if need be); False: never. Defaults to None.
    """

    path_options = ('fused', )
    kernel = 'adaptive'
    supports_sparse = True

    def __init__(self,
                 params,
                 lr: float = 0.01,
                 lr_decay: float = 0.,
                 weight_decay: float = 0.,
                 initial_accumulator_value: float = 0.,
                 eps: float = 1e-10,
                 gc_mode: Optional[str] = CLASS_RULE,
                 fused: Optional[bool] = None):
        defaults = dict(
            lr=lr,
            lr_decay=lr_decay,
            weight_decay=weight_decay,
            initial_accumulator_value=initial_accumulator_value,
            eps=eps,
            gc_mode=gc_mode,
            fused=fused)
        super().__init__(params, defaults)

    def _check_group(self, group: dict) -> None:
        check_non_negative(group, 'lr', 'lr_decay', 'weight_decay',
                           'initial_accumulator_value', 'eps')
        check_path_option(group)

    @staticmethod
    def _init_state(state: dict, param: Tensor, group: dict) -> None:
        if not state:
            state['step'] = 0
            state['sum'] = torch.full_like(
                param, group['initial_accumulator_value'])

    def _kernel_takes(self, param: Tensor, group: dict) -> bool:
        self._init_state(self.state[param], param, group)
        return self._state_fits_kernel(param, ('sum', ))

    def _update_kernel(self, params: List[Tensor], group: dict) -> None:
        """The C++ kernel, one call for the group: no first moment,
        sum = 1 * sum + 1 * g'^2."""
        states = [self.state[param] for param in params]
        for state in states:
            state['step'] += 1
        adaptive_steps(
            params, [param.grad for param in params], [None] * len(params),
            [state['sum'] for state in states], [None] * len(params),
            ['gradient' if is_centralized(param, group['gc_mode']) else
             'none' for param in params],
            weight_decay=group['weight_decay'], decay='inside_gc', beta1=0.,
            beta2=1., new2=1., denom_scales=[1.] * len(params),
            eps=group['eps'],
            step_sizes=[self._clr(state['step'], group) for state in states])

    @staticmethod
    def _clr(step: int, group: dict) -> float:
        return group['lr'] / (1 + (step - 1) * group['lr_decay'])

    def _update_tensor(self, param: Tensor, grad: Tensor,
                       state: Dict[str, Tensor], group: dict) -> None:
        self._init_state(state, param, group)
        state['step'] += 1
        if grad.is_sparse:  # GC off, no decay: checked before any moved
            self._update_sparse(param, grad, state, group)
            return
        # g' in a new tensor where it is not the gradient itself: p.grad
        # stays what backward left, as in torch's optimizers.
        if group['weight_decay']:
            grad = grad.add(param, alpha=group['weight_decay'])
        if is_centralized(param, group['gc_mode']):
            if grad is param.grad:
                grad = grad.clone()
            centralize_group_([grad], group)
        clr = self._clr(state['step'], group)
        state['sum'].addcmul_(grad, grad, value=1)
        std = state['sum'].sqrt().add_(group['eps'])
        param.addcdiv_(grad, std, value=-clr)

    def _update_sparse(self, param: Tensor, grad: Tensor,
                       state: Dict[str, Tensor], group: dict) -> None:
        """torch's Adagrad step of a sparse gradient: the rows it has."""
        grad = grad.coalesce()
        indices, values = grad._indices(), grad._values()

        def like_grad(values: Tensor) -> Tensor:
            return torch.sparse_coo_tensor(indices, values, grad.shape)

        state['sum'].add_(like_grad(values.pow(2)))
        std = state['sum'].sparse_mask(grad)._values().sqrt_().add_(
            group['eps'])
        param.add_(like_grad(values / std),
                   alpha=-self._clr(state['step'], group))


@OPTIMIZERS.register_module()
class Adagrad_GC(_AdagradBase):
    __doc__ = _AdagradBase.__doc__ + '\n    GC of conv and fc weights.'
    default_gc_mode = 'conv_fc'


@OPTIMIZERS.register_module()
class Adagrad_GCC(_AdagradBase):
    __doc__ = _AdagradBase.__doc__ + '\n    GC of conv weights only.'
    default_gc_mode = 'conv'
