"""What every gc_mm optimizer shares: argument checks, the per-group GC
switch, the step loop, and float32 statistics for half-precision parameters.

A family module (sgd.py, adam.py, adagrad.py) subclasses
:class:`GCOptimizer`, declares its hyper-parameter checks and implements
``_update_tensor`` (the per-tensor maths, the plain path).
"""
from itertools import chain
from typing import Dict, List

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..centralize import check_gc_mode

HALF_DTYPES = (torch.float16, torch.bfloat16)


class _ClassRule:
    """Default of ``gc_mode``: the rule the class name gives (GC or GCC)."""

    def __repr__(self):
        return "'conv_fc' for *_GC, 'conv' for *_GCC"


CLASS_RULE = _ClassRule()


def check_non_negative(group: dict, *names: str) -> None:
    for name in names:
        value = group[name]
        if not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f'{name} must be a non-negative number, '
                             f'got {value!r}')


def check_betas(group: dict) -> None:
    betas = group['betas']
    if (not isinstance(betas, (tuple, list)) or len(betas) != 2
            or not all(isinstance(b, (int, float)) and 0 <= b < 1
                       for b in betas)):
        raise ValueError(f'betas must be two numbers in [0, 1), got {betas!r}')


class GCOptimizer(Optimizer):
    """Base class of the GC optimizers.

    Each param group carries ``gc_mode`` ('conv_fc', 'conv' or None), so a
    group (or an optim-wrapper constructor) can switch GC per layer. A
    subclass sets ``default_gc_mode`` and implements :meth:`_update_tensor`.
    """

    default_gc_mode = 'conv_fc'

    def __init__(self, params, defaults: dict):
        if defaults['gc_mode'] is CLASS_RULE:
            defaults['gc_mode'] = self.default_gc_mode
        super().__init__(params, defaults)

    def _check_group(self, group: dict) -> None:
        """Raise ValueError naming the first invalid hyper-parameter."""
        raise NotImplementedError

    def add_param_group(self, param_group: dict) -> None:
        # Check the group as it will be used (defaults filled in) before it
        # is added, so a bad group leaves the optimizer unchanged.
        self._check_group({**self.defaults, **param_group})
        check_gc_mode(param_group.get('gc_mode', self.defaults['gc_mode']))
        super().add_param_group(param_group)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # Groups loaded from an older checkpoint (or another optimizer's)
        # get the options they lack, e.g. gc_mode, from the defaults.
        # (torch's own 'differentiable', which it adds to defaults, stays
        # out of the groups, as in torch.)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                if key != 'differentiable':
                    group.setdefault(key, value)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # torch casts loaded state to each parameter's dtype; restore the
        # float32 statistics of half-precision parameters so a resume is
        # exact.
        saved_ids = chain.from_iterable(
            group['params'] for group in state_dict['param_groups'])
        params = chain.from_iterable(
            group['params'] for group in self.param_groups)
        for saved_id, param in zip(saved_ids, params):
            if param.dtype not in HALF_DTYPES:
                continue
            for key, value in state_dict['state'].get(saved_id, {}).items():
                if torch.is_tensor(value) and value.is_floating_point():
                    self.state[param][key] = value.to(
                        device=param.device, dtype=torch.float32)

    def _check_param(self, param: Tensor, group: dict, index: int) -> None:
        """Raise RuntimeError if this step cannot update ``param``."""
        if param.grad.is_sparse:
            raise RuntimeError(
                f'{type(self).__name__} got a sparse gradient (param group '
                f'{index}, shape {tuple(param.shape)}): GC is undefined for '
                'sparse gradients')

    def _params_with_grad(self, group: dict) -> List[Tensor]:
        return [p for p in group['params'] if p.grad is not None]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = [(group, self._params_with_grad(group))
                  for group in self.param_groups]
        # Refuse what the step cannot do before any parameter moves.
        for index, (group, params) in enumerate(groups):
            for param in params:
                self._check_param(param, group, index)
        for group, params in groups:
            if params:
                self._update_group(group, params)
        return loss

    def _update_group(self, group: dict, params: List[Tensor]) -> None:
        """The plain path: one tensor at a time, in the authors' order."""
        for param in params:
            state = self.state[param]
            if param.dtype in HALF_DTYPES:
                work = param.float()
                self._update_tensor(work, param.grad.float(), state, group)
                param.copy_(work)
            else:
                # The gradient is used as scratch space (in place, as in
                # the authors' code): after step() it holds the direction.
                self._update_tensor(param, param.grad, state, group)

    def _update_tensor(self, param: Tensor, grad: Tensor,
                       state: Dict[str, Tensor], group: dict) -> None:
        raise NotImplementedError
