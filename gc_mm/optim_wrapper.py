"""Optim wrappers that add Gradient Centralization to any optimizer.

``GCOptimWrapper`` centralizes the gradients right before the wrapped
optimizer's step, so torch SGD/AdamW or a third-party optimizer train with
GC. ``AmpGCOptimWrapper`` does the same after the AMP loss scaler has
unscaled the gradients. Around torch's SGD, Adam and AdamW on CPU,
``GCOptimWrapper`` steps the optimizer itself from its second step, with GC
inside the update (the C++ kernels: one pass over memory, torch's numbers
and state; ``gc_mm.optimizers.fused.torch_step_with_gc``), and leaves the
gradients uncentralized. Both apply GC once per real update: with
``accumulative_counts`` the gradients are centralized only when they are
applied, never per micro-batch.

Param-group keys the wrappers read (GCOptimWrapperConstructor sets them
from ``paramwise_cfg.gc``; a GC optimizer's own ``gc_mode`` is not one of
them):

- ``wrapper_gc_mode``: 'conv_fc', 'conv' or None (no GC for this group);
  overrides the wrapper's ``gc_mode`` for the group when the wrapper's GC
  is on. Absent: the wrapper's ``gc_mode``.
- ``gc_out_dim`` (0 or 1) and ``gc_groups``: the layout of the group's
  weights, passed to :func:`~gc_mm.centralize.centralize_` (1: transposed
  convs centralized per output channel). Absent: 0 and 1.

Example::

    optim_wrapper = dict(
        type='GCOptimWrapper', gc_mode='conv_fc',
        optimizer=dict(type='AdamW', lr=1e-4, weight_decay=0.05),
        clip_grad=dict(max_norm=35, norm_type=2))
"""
from functools import partial
from typing import Callable, List, Optional, Set, Tuple, Union

import torch
from mmengine.optim import AmpOptimWrapper, OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS
from torch import Tensor
from torch.optim import Optimizer

from .centralize import (centralize_, check_gc_mode, check_output_layout,
                         is_centralized)
from .compat import grad_scaler
from .optimizers import GCOptimizer, inner_optimizer
from .optimizers.fused import torch_step_with_gc
from .sharding import check_sharded_group

GC_ORDERS = ('clip_then_gc', 'gc_then_clip')

# One group's GC: its gradients, those GC centralizes, and centralize_'s
# options.
_GroupGC = Tuple[List[Tensor], List[Tensor], bool, int, int]


class CentralizeGradsMixin:
    """GC of the gradients in the wrapper, shared by both wrappers."""

    optimizer: Optimizer
    # Called with the gradients GC is about to centralize (unscaled, clipped
    # as gc_order says), once per update, on every path: GC in place or
    # inside the fused step. GradStatsHook sets it to record them.
    gc_tap: Optional[Callable[[], None]] = None

    def _setup_gc(self, gc_mode: Optional[str], gc_order: str) -> None:
        check_gc_mode(gc_mode)
        if gc_order not in GC_ORDERS:
            raise ValueError(f'gc_order must be one of {GC_ORDERS}, got '
                             f'{gc_order!r}')
        if (gc_mode is not None
                and isinstance(inner_optimizer(self.optimizer), GCOptimizer)
                and any(group['gc_mode'] is not None
                        for group in self.optimizer.param_groups)):
            raise ValueError(
                f'{type(self).__name__}(gc_mode={gc_mode!r}) would centralize '
                f'twice: {type(self.optimizer).__name__} already applies GC. '
                'Set gc_mode=None on the wrapper or on the optimizer.')
        self.gc_mode = gc_mode
        self.gc_order = gc_order
        self._plan_gc()  # refuses bad param-group keys now, not at step 1

    def group_gc_mode(self, group: dict) -> Optional[str]:
        """The GC this wrapper applies to a param group's gradients: none
        when the wrapper's GC is off, else the group's ``wrapper_gc_mode``
        (the per-layer choice) if it has one, else the wrapper's."""
        if self.gc_mode is None:
            return None
        return group.get('wrapper_gc_mode', self.gc_mode)

    def _plan_gc(self) -> List[_GroupGC]:
        """What this step centralizes, checked before anything changes."""
        plan = []
        for index, group in enumerate(self.optimizer.param_groups):
            gc_mode = check_gc_mode(self.group_gc_mode(group),
                                    f'param group {index} wrapper_gc_mode')
            if gc_mode is None:
                continue
            if ('gc_mode' in group and 'wrapper_gc_mode' not in group
                    and not isinstance(inner_optimizer(self.optimizer),
                                       GCOptimizer)):
                # Earlier versions read it here; ignoring it would silently
                # centralize the layers it excluded.
                raise ValueError(
                    f'param group {index} of {type(self.optimizer).__name__} '
                    "has a 'gc_mode' key, which only GC optimizers read; "
                    f"{type(self).__name__}'s per-group choice is "
                    "'wrapper_gc_mode' (earlier gc_mm versions wrote "
                    "'gc_mode' there): rename the key, or rebuild the groups "
                    'with GCOptimWrapperConstructor.')
            out_dim = group.get('gc_out_dim', 0)
            groups = group.get('gc_groups', 1)
            # FSDP1's flat shards (GC would do nothing), DTensors whose
            # shards split rows.
            check_sharded_group(
                group['params'], partial(is_centralized, gc_mode=gc_mode),
                type(self).__name__, index, out_dim,
                names=group.get('param_names'))
            grads = [p.grad for p in group['params'] if p.grad is not None]
            centralized = [g for g in grads if is_centralized(g, gc_mode)]
            for grad in centralized:
                if grad.is_sparse:
                    raise RuntimeError(
                        f'{type(self).__name__} got a sparse gradient (param '
                        f'group {index}, shape {tuple(grad.shape)}): GC is '
                        'undefined for sparse gradients. Exclude the '
                        'parameter with paramwise_cfg.gc.exclude.')
            if out_dim != 0 or groups != 1:
                try:
                    check_output_layout(centralized, out_dim, groups)
                except ValueError as error:
                    raise ValueError(
                        f'param group {index}: {error}') from None
            plan.append((grads, centralized, gc_mode == 'conv', out_dim,
                         groups))
        return plan

    @torch.no_grad()
    def _clip_and_centralize(self, plan: List[_GroupGC]) -> None:
        if self.gc_order == 'gc_then_clip':
            self._centralize(plan)
        if self.clip_grad_kwargs:
            self._clip_grad()
        if self.gc_order == 'clip_then_gc':
            self._centralize(plan)

    @staticmethod
    def _centralized_grads(plan: List[_GroupGC]) -> Optional[Set[Tensor]]:
        """The gradients the plan centralizes along dim 0, or None if a
        group centralizes another layout (transposed convs per output
        unit), which only centralize_ does."""
        if any((out_dim, groups) != (0, 1)
               for *_, out_dim, groups in plan):
            return None
        return {grad for _, centralized, *_ in plan for grad in centralized}

    def _centralize(self, plan: List[_GroupGC]) -> None:
        if self.gc_tap is not None:
            self.gc_tap()
        for grads, _, conv_only, out_dim, groups in plan:
            centralize_(grads, conv_only=conv_only, out_dim=out_dim,
                        groups=groups)


@OPTIM_WRAPPERS.register_module()
class GCOptimWrapper(CentralizeGradsMixin, OptimWrapper):
    """OptimWrapper that applies GC to the gradients before each update.

    Args:
        optimizer (Optimizer): the optimizer to wrap (not a GC optimizer with
            GC on: that would centralize twice).
        gc_mode (str | None): 'conv_fc' (ndim > 1), 'conv' (ndim > 3) or None
            (off); when on, a param group's ``wrapper_gc_mode`` overrides it
            for that group. Defaults to 'conv_fc'.
        gc_order (str): 'clip_then_gc' (clip the raw gradients, then GC, as
            in the authors' detection runs) or 'gc_then_clip'. Defaults to
            'clip_then_gc'.
        **kwargs: the arguments of :class:`mmengine.optim.OptimWrapper`
            (``accumulative_counts``, ``clip_grad``).
    """

    def __init__(self,
                 optimizer: Optimizer,
                 gc_mode: Optional[str] = 'conv_fc',
                 gc_order: str = 'clip_then_gc',
                 **kwargs):
        super().__init__(optimizer=optimizer, **kwargs)
        self._setup_gc(gc_mode, gc_order)
        # The first step goes through optimizer.step(), which makes torch's
        # state and runs what schedulers wrapped around it (they check that
        # it was called before their first step); later ones may be fused.
        self._stepped = False

    def step(self, **kwargs):
        """Clip and centralize the gradients, then step the optimizer.

        With ``closure``, the optimizer steps with the gradients the closure
        computes, so they are clipped and centralized after each evaluation
        (LBFGS evaluates it several times per step); the gradients present
        before ``step()`` are left alone. Returns the optimizer's return
        value (the closure's loss).
        """
        closure = kwargs.pop('closure', None)
        if closure is None:
            plan = self._plan_gc()
            if self.gc_order == 'gc_then_clip' or not self._stepped:
                self._clip_and_centralize(plan)
                self._stepped = True
                return self.optimizer.step(**kwargs)
            if self.clip_grad_kwargs:
                self._clip_grad()
            # torch's SGD, Adam or AdamW on CPU: GC inside the update, one
            # pass over memory (gradients then left as backward made them).
            centralized = self._centralized_grads(plan)
            if (not kwargs and centralized is not None
                    and torch_step_with_gc(self.optimizer, centralized,
                                           before=self.gc_tap)):
                return None
            self._centralize(plan)
            return self.optimizer.step(**kwargs)

        def clipped_and_centralized_closure():
            loss = closure()
            self._clip_and_centralize(self._plan_gc())
            return loss

        return self.optimizer.step(closure=clipped_and_centralized_closure,
                                   **kwargs)


@OPTIM_WRAPPERS.register_module()
class AmpGCOptimWrapper(CentralizeGradsMixin, AmpOptimWrapper):
    """AmpOptimWrapper that applies GC to the unscaled gradients.

    Unlike mmengine's AmpOptimWrapper it also runs on CPU (bfloat16
    autocast with ``torch.amp.GradScaler('cpu')``). A step whose gradients
    are not finite is skipped by the loss scaler, GC or not. With
    ``gc_mode=None`` it is a plain AMP wrapper, which is what
    ``tools/train.py --amp`` uses when the GC lives in the optimizer.
    ``step(closure=...)`` is refused (GradScaler does not support closures)
    before the gradients change.

    Args:
        optimizer (Optimizer): the optimizer to wrap.
        gc_mode (str | None): as in :class:`GCOptimWrapper`.
        gc_order (str): as in :class:`GCOptimWrapper`.
        loss_scale (str | float | dict): 'dynamic', a static scale, or
            GradScaler's arguments. Defaults to 'dynamic'.
        dtype (str | torch.dtype, optional): autocast dtype. Defaults to
            float16 on CUDA and bfloat16 on CPU.
        **kwargs: the arguments of :class:`mmengine.optim.OptimWrapper`.
    """

    def __init__(self,
                 optimizer: Optimizer,
                 gc_mode: Optional[str] = 'conv_fc',
                 gc_order: str = 'clip_then_gc',
                 loss_scale: Union[str, float, dict] = 'dynamic',
                 dtype: Union[str, torch.dtype, None] = None,
                 **kwargs):
        # AmpOptimWrapper.__init__ refuses to run without an accelerator and
        # builds a CUDA-only scaler; set up the scaler for the parameters'
        # device instead.
        OptimWrapper.__init__(self, optimizer=optimizer, **kwargs)
        self._setup_gc(gc_mode, gc_order)
        device = next((p.device.type for group in optimizer.param_groups
                       for p in group['params']), 'cpu')
        if device == 'cpu':
            from .compat import enable_cpu_autocast_for_mmcv_ops
            enable_cpu_autocast_for_mmcv_ops()
        self._scale_update_param = None
        if loss_scale == 'dynamic':
            self.loss_scaler = grad_scaler(device)
        elif isinstance(loss_scale, float):
            self._scale_update_param = loss_scale
            self.loss_scaler = grad_scaler(device, init_scale=loss_scale)
        elif isinstance(loss_scale, dict):
            self.loss_scaler = grad_scaler(device, **loss_scale)
        else:
            raise TypeError("loss_scale must be 'dynamic', a float or a "
                            f'dict, got {loss_scale!r}')
        if isinstance(dtype, str):
            if dtype not in self.valid_dtypes:
                raise ValueError(f'dtype must be one of {self.valid_dtypes}, '
                                 f'got {dtype!r}')
            dtype = getattr(torch, dtype)
        self.cast_dtype = dtype

    def step(self, **kwargs) -> None:
        if kwargs.get('closure') is not None:
            # GradScaler.step would refuse it after unscale_ had changed the
            # gradients; a closure's gradients would not be unscaled anyway.
            raise RuntimeError(
                f'{type(self).__name__} cannot step with a closure: torch\'s '
                'GradScaler does not support closures. Call backward() '
                '(or update_params) and step() without one.')
        plan = self._plan_gc()
        # Unscale first so that clipping and GC see the true gradients;
        # GradScaler.step then skips the update if any of them is inf/nan.
        self.loss_scaler.unscale_(self.optimizer)
        self._clip_and_centralize(plan)
        self.loss_scaler.step(self.optimizer, **kwargs)
        self.loss_scaler.update(self._scale_update_param)
