"""Lookahead around any optimizer (Zhang et al., "Lookahead Optimizer: k
steps forward, 1 step back", NeurIPS 2019).

Each trained parameter w has slow weights phi, which start as w before its
first update (so after ``load_from``). After every ``k`` steps of the inner
optimizer::

    phi = phi + alpha * (w - phi);  w = phi

Why an optimizer that wraps an optimizer (registered in OPTIMIZERS) rather
than an optim wrapper: it is the optimizer MMEngine's optim wrappers drive,
so it works under every one of them (OptimWrapper, AmpOptimWrapper, which
mmdet's ``--amp`` substitutes for the configured wrapper type, gradient
accumulation, clipping, GCOptimWrapper); ``paramwise_cfg`` and the
constructors build its param groups as for any optimizer; its slow weights
travel in ``optimizer.state_dict()``, which MMEngine checkpoints and
resumes; and an AMP step skipped for non-finite gradients is not counted
towards ``k`` (GradScaler then does not call ``step``).

The param groups and the per-parameter state *are* the inner optimizer's
(the same objects, also after ``load_state_dict``): MMEngine's parameter
schedulers change the inner ``lr`` through this optimizer, and popping a
parameter's state resets its moments and its slow weights together (the
slow weights are the ``'slow_weight'`` entry of that state; a parameter
without one gets fresh slow weights, its current weights, at its next
step). Slow weights of half-precision parameters are kept in float32.

torch's hooks work on it as on any torch optimizer: ``state_dict`` is
torch's ``Optimizer.state_dict`` (its pre and post hooks run),
``load_state_dict`` runs the load hooks registered on it around the inner
optimizer's load, and one Lookahead step fires the step hooks (global and
its own) once: the inner step runs without torch's hook wrapper.

Validation, testing and checkpoints use the slow weights through
:class:`gc_mm.hooks.SlowWeightsHook`.

Example::

    optim_wrapper = dict(optimizer=dict(
        type='Lookahead', k=5, alpha=0.5,
        optimizer=dict(type='SGD_GC', lr=0.02, momentum=0.9,
                       weight_decay=1e-4)))
"""
from typing import Iterator, Tuple

import torch
from mmengine.registry import OPTIMIZERS
from torch import Tensor
from torch.optim import Optimizer

from .base import GCOptimizer

SLOW_WEIGHT = 'slow_weight'


def check_lookahead_options(k, alpha) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError('Lookahead: k must be a positive int (inner steps '
                         f'between synchronizations), got {k!r}')
    if (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
            or not 0 < alpha <= 1):
        raise ValueError(f'Lookahead: alpha must be a number in (0, 1], got '
                         f'{alpha!r}')


def inner_optimizer(optimizer: Optimizer) -> Optimizer:
    """The optimizer that computes the update: ``optimizer`` itself, or the
    innermost one a :class:`Lookahead` (or Ranger) wraps."""
    while isinstance(optimizer, Lookahead):
        optimizer = optimizer.optimizer
    return optimizer


@torch.no_grad()
def _slow_copy(param: Tensor, value: Tensor) -> Tensor:
    """A copy of ``value`` to keep as ``param``'s slow weights: on its
    device, in its layout, float32 for a half-precision parameter."""
    like = GCOptimizer._like(param, value)
    return like.clone() if like is value else like


def _save_lookahead_steps(optimizer: 'Lookahead', state_dict: dict) -> None:
    state_dict['lookahead'] = dict(steps=optimizer.lookahead_steps)


def _step_without_hooks(optimizer: Optimizer, closure):
    """``optimizer.step(closure)`` without the step hooks torch's
    Optimizer wraps every step in (``profile_hook_step``, marked
    ``hooked``): the inner step is part of Lookahead's, whose hooks
    (global and its own) fire once per Lookahead step."""
    step = type(optimizer).step
    if getattr(step, 'hooked', False):
        step = step.__wrapped__
    return step(optimizer, closure)


@OPTIMIZERS.register_module()
class Lookahead(Optimizer):
    """Lookahead around the optimizer built from ``optimizer``.

    Args:
        params: parameters or param-group dicts to optimize (what an optim
            wrapper constructor passes; the inner optimizer gets them).
        optimizer (dict): config of the inner optimizer, without
            ``params`` (any type in OPTIMIZERS: ``SGD_GC``, ``AdamW``, ...).
        k (int): inner steps between synchronizations. Defaults to 5.
        alpha (float): slow-weight step, in (0, 1]. Defaults to 0.5.
    """

    def __init__(self, params, optimizer: dict, k: int = 5,
                 alpha: float = 0.5):
        check_lookahead_options(k, alpha)
        if not isinstance(optimizer, dict) or 'type' not in optimizer:
            raise ValueError('Lookahead: optimizer must be the config dict '
                             "of the inner optimizer (with 'type'), got "
                             f'{optimizer!r}')
        if 'params' in optimizer:
            raise ValueError('Lookahead: give the parameters to Lookahead, '
                             'not in its inner optimizer config')
        self.optimizer = OPTIMIZERS.build(dict(optimizer, params=params))
        self.k = k
        self.alpha = alpha
        self.lookahead_steps = 0  # inner steps taken
        # torch's Optimizer.__init__ gives this object its bookkeeping (step
        # hooks, the profiling patch). Through the param_groups and state
        # properties it resets the inner optimizer's (still empty) state and
        # group list and adds the same group dicts back, checked again by
        # the inner optimizer's add_param_group.
        groups = self.optimizer.param_groups
        super().__init__(groups, self.optimizer.defaults)
        # Lookahead's entry of the state dict, written by torch's
        # Optimizer.state_dict through its hook machinery: first, so the
        # hooks users register see it.
        self.register_state_dict_post_hook(_save_lookahead_steps,
                                           prepend=True)

    # The inner optimizer's own objects, also after its load_state_dict
    # replaces them.
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups):
        self.optimizer.param_groups = groups

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, state):
        self.optimizer.state = state

    def __getstate__(self) -> dict:
        # torch's would keep only defaults, state and param_groups, which
        # here are the inner optimizer's (copy.deepcopy, pickling).
        return self.__dict__.copy()

    def add_param_group(self, param_group: dict) -> None:
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none)

    def __repr__(self) -> str:
        inner = repr(self.optimizer).replace('\n', '\n    ')
        return (f'{type(self).__name__}(k={self.k}, alpha={self.alpha},\n'
                f'    {inner})')

    def step(self, closure=None):
        # Slow weights start as a parameter's weights before its first
        # update. Which parameters get a gradient is known only once a
        # closure ran: copy every candidate, keep those that were updated.
        # One without a gradient gets no state entry, since optimizers (torch
        # Adam, RAdam_GC, ...) create their state when they find it empty.
        starts = [(param, _slow_copy(param, param.detach()))
                  for group in self.param_groups for param in group['params']
                  if param.requires_grad
                  and SLOW_WEIGHT not in self.state.get(param, ())]
        loss = _step_without_hooks(self.optimizer, closure)
        for param, start in starts:
            if param.grad is not None:
                self.state[param][SLOW_WEIGHT] = start
        self.lookahead_steps += 1
        if self.lookahead_steps % self.k == 0:
            self._synchronize()
        return loss

    def slow_weights(self) -> Iterator[Tuple[Tensor, Tensor]]:
        """(parameter, its slow weights) for every parameter that has them
        (float32 for a half-precision parameter)."""
        for group in self.param_groups:
            for param in group['params']:
                slow = self.state.get(param, {}).get(SLOW_WEIGHT)
                if slow is not None:
                    yield param, slow

    @torch.no_grad()
    def _synchronize(self) -> None:
        for param, slow in self.slow_weights():
            slow.lerp_(param.to(slow.dtype), self.alpha)
            param.copy_(slow)

    # state_dict is torch's (Optimizer.state_dict, with this optimizer's
    # hooks): the shared groups and state, each parameter's state holding
    # its 'slow_weight', and lookahead=dict(steps=...) from the post hook
    # registered in __init__.

    def load_state_dict(self, state_dict: dict) -> None:
        """Load :meth:`state_dict` (or a state dict of the inner optimizer
        alone: the slow weights then start at the next step) through the
        inner optimizer's ``load_state_dict``, with this optimizer's load
        hooks (``register_load_state_dict_pre_hook``/``post_hook``) run
        around it as torch's ``Optimizer.load_state_dict`` runs them. The
        slow weights get their parameter's device, layout and dtype
        (float32 for half precision) whatever the inner optimizer does with
        its state."""
        state_dict = state_dict.copy()  # shallow, as torch's
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        self._load_into_inner(state_dict)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _load_into_inner(self, state_dict: dict) -> None:
        saved_ids = [index for group in state_dict['param_groups']
                     for index in group['params']]
        params = [param for group in self.param_groups
                  for param in group['params']]
        slow = {}
        if len(saved_ids) == len(params):  # else the inner load raises
            for index, param in zip(saved_ids, params):
                value = state_dict['state'].get(index, {}).get(SLOW_WEIGHT)
                if value is None:
                    continue
                if not torch.is_tensor(value) or value.shape != param.shape:
                    got = (f'of shape {tuple(value.shape)}'
                           if torch.is_tensor(value) else repr(value))
                    raise ValueError(
                        f'{type(self).__name__}.load_state_dict: the slow '
                        f'weights saved for parameter {index} are {got}, '
                        f'not a tensor of its shape {tuple(param.shape)}')
                slow[param] = value
        steps = state_dict.get('lookahead', {}).get('steps', 0)
        inner = {key: value for key, value in state_dict.items()
                 if key != 'lookahead'}
        inner['state'] = {
            index: {key: value for key, value in state.items()
                    if key != SLOW_WEIGHT}
            for index, state in state_dict['state'].items()}
        self.optimizer.load_state_dict(inner)
        for param, value in slow.items():
            self.state[param][SLOW_WEIGHT] = _slow_copy(param, value)
        self.lookahead_steps = steps

