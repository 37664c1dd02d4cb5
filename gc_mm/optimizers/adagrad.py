"""Adagrad with Gradient Centralization: Adagrad_GC, Adagrad_GCC.

Update rule (t = step, P = GC under the optimizer's gc_mode)::

    g' = P(g + wd * w)
    sum = sum + g'^2                 (sum starts at initial_accumulator_value)
    clr = lr / (1 + (t - 1) * lr_decay)
    w = w - clr * g' / (sqrt(sum) + eps)

After ``step()``, ``p.grad`` of a float32/float64 parameter holds g' (as in
the authors' code); a half-precision one keeps what backward left.

Example::

    optim_wrapper = dict(optimizer=dict(type='Adagrad_GCC', lr=0.01))
"""
from typing import Dict, Optional

import torch
from mmengine.registry import OPTIMIZERS
from torch import Tensor

from .base import (CLASS_RULE, GCOptimizer, centralize_group_,
                   check_non_negative)


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
    """

    def __init__(self,
                 params,
                 lr: float = 0.01,
                 lr_decay: float = 0.,
                 weight_decay: float = 0.,
                 initial_accumulator_value: float = 0.,
                 eps: float = 1e-10,
                 gc_mode: Optional[str] = CLASS_RULE):
        defaults = dict(
            lr=lr,
            lr_decay=lr_decay,
            weight_decay=weight_decay,
            initial_accumulator_value=initial_accumulator_value,
            eps=eps,
            gc_mode=gc_mode)
        super().__init__(params, defaults)

    def _check_group(self, group: dict) -> None:
        check_non_negative(group, 'lr', 'lr_decay', 'weight_decay',
                           'initial_accumulator_value', 'eps')

    def _update_tensor(self, param: Tensor, grad: Tensor,
                       state: Dict[str, Tensor], group: dict) -> None:
        if not state:
            state['step'] = 0
            state['sum'] = torch.full_like(
                param, group['initial_accumulator_value'])
        state['step'] += 1
        # In place, as in the authors' code (a copy would add a pass to the
        # step): p.grad of a float32/float64 parameter then holds g'.
        if group['weight_decay']:
            grad.add_(param, alpha=group['weight_decay'])
        centralize_group_([grad], group)
        clr = group['lr'] / (1 + (state['step'] - 1) * group['lr_decay'])
        state['sum'].addcmul_(grad, grad, value=1)
        std = state['sum'].sqrt().add_(group['eps'])
        param.addcdiv_(grad, std, value=-clr)


@OPTIMIZERS.register_module()
class Adagrad_GC(_AdagradBase):
    __doc__ = _AdagradBase.__doc__ + '\n    GC of conv and fc weights.'
    default_gc_mode = 'conv_fc'


@OPTIMIZERS.register_module()
class Adagrad_GCC(_AdagradBase):
    __doc__ = _AdagradBase.__doc__ + '\n    GC of conv weights only.'
    default_gc_mode = 'conv'
