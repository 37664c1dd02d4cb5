"""GradStatsHook: what Gradient Centralization does to the gradients."""
import re
from typing import Optional

import torch
from mmengine.dist import get_dist_info
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.optim import AmpOptimWrapper, OptimWrapper
from mmengine.registry import HOOKS
from torch import Tensor

from ..centralize import centralize_, is_centralized
from ..constructor import applied_gc_mode
from ..optim_wrapper import CentralizeGradsMixin
from .utils import compile_layers, unwrap_model


def _row_means(grad: Tensor, out_dim: int, groups: int) -> Tensor:
    """Each row's mean, rows as :func:`~gc_mm.centralize.centralize_` sees
    them."""
    if out_dim == 1:
        blocks = grad.unflatten(0, (groups, -1))
        return blocks.mean(dim=(1, *range(3, blocks.ndim)),
                           dtype=torch.float64)
    return grad.reshape(grad.shape[0], -1).mean(dim=1, dtype=torch.float64)


@HOOKS.register_module()
class GradStatsHook(Hook):
    """Record what Gradient Centralization does to the gradients.

    Every ``interval`` iterations, on the gradients the optimizer is about
    to use (after backward, AMP unscaling and gradient clipping, before the
    step), it records for a whole-model summary (``model``) and for each
    selected weight (keyed by its parameter name):

    - ``norm_before``: the gradient's L2 norm before GC;
    - ``norm_after``: its L2 norm after GC;
    - ``removed``: the share of the norm GC removed,
      ``1 - norm_after / norm_before``;
    - ``max_abs``: max |g| before GC;
    - ``row_mean_after`` (weights only): the largest |row mean| after GC,
      ~0 where GC applies.

    GC is computed with :func:`~gc_mm.centralize.centralize_` on a copy, in
    the mode that applies to the tensor's param group
    (:func:`~gc_mm.constructor.applied_gc_mode`, with its transposed-conv
    layout); the real gradients are never changed. In a run where nothing
    applies GC (a baseline) it reports what GC *would* remove under
    ``'conv_fc'``. A GC optimizer centralizes ``g + weight_decay * w``; the
    hook reports on the gradient ``g`` alone. With ``gc_order=
    'gc_then_clip'`` the wrapper centralizes before clipping, and so are
    the statistics taken.

    Default selection: the first conv of the backbone, the last conv of the
    neck (FPN), the last shared fc of the box head and the mask head's
    ``conv_logits``, those the model has. ``layers``: regular expressions
    (``re.search`` on parameter names) select the weights instead.

    Values go to the message hub as ``grad_stats/<layer>/<stat>`` and, at
    the iteration they were measured, to every visualizer backend
    (``vis_data/scalars.json``, TensorBoard, ...) and to the log. Under
    gradient accumulation they are taken at the first real update at or
    after every ``interval``-th iteration (an update the AMP loss scaler
    skips for non-finite gradients is none: nothing is recorded for it); in a distributed run on rank 0
    (the gradients are all-reduced). Between records the hook does nothing.

    Args:
        interval (int): record every ``interval`` iterations. Defaults to 50.
        layers (list[str], optional): regexes selecting the weights.

    Example::

        custom_hooks = [dict(type='GradStatsHook', interval=50)]
    """

    priority = 'NORMAL'

    def __init__(self, interval: int = 50, layers: Optional[list] = None):
        if isinstance(interval, bool) or not isinstance(
                interval, int) or interval < 1:
            raise ValueError(
                f'GradStatsHook: interval must be a positive int, got '
                f'{interval!r}')
        self.layers = compile_layers('GradStatsHook', layers)
        self.interval = interval
        self._armed = False
        self._handle = None
        self._stats = None
        self._stepped = None  # whether the tapped step was taken, if asked

    def before_train(self, runner) -> None:
        self._wrapper = runner.optim_wrapper
        if not isinstance(self._wrapper, OptimWrapper):
            raise TypeError(
                'GradStatsHook needs one OptimWrapper, got '
                f'{type(self._wrapper).__name__}')
        names = {
            id(p): name
            for name, p in unwrap_model(runner.model).named_parameters()
        }
        groups = self._wrapper.optimizer.param_groups
        modes = [applied_gc_mode(self._wrapper, group) for group in groups]
        self.what_if = all(mode is None for mode in modes)
        if self.what_if:
            modes = ['conv_fc'] * len(groups)
        # (name, param, group, gc_mode) of every tensor the optimizer trains.
        self._params = [(names.get(id(p), '?'), p, group, mode)
                        for group, mode in zip(groups, modes)
                        for p in group['params'] if p.requires_grad]
        self._selected = self._select()
        # OptimWrapper.update_params runs backward, step and zero_grad in one
        # call, so no runner hook sees the gradients; they are tapped inside
        # the step. A GC wrapper centralizes before calling the optimizer's
        # step, or inside its own fused step (a step pre-hook would see
        # centralized gradients, or none): it is tapped where it
        # centralizes, after unscaling and clipping, by its gc_tap.
        # Everything else (GC
        # optimizers, baselines, mmengine's wrappers) is tapped by a step
        # pre-hook of the torch optimizer:
        # OptimWrapper/AmpOptimWrapper call optimizer.step after unscaling
        # and clipping, GradScaler only for a finite update, a GC optimizer
        # centralizes inside it, and zero_grad comes after it.
        self._tap_wrapper = (isinstance(self._wrapper, CentralizeGradsMixin)
                             and any(
                                 self._wrapper.group_gc_mode(group)
                                 is not None for group in groups))
        what = ("what 'conv_fc' GC would remove (nothing in this run "
                'applies GC)' if self.what_if else 'the GC this run applies')
        print_log(
            f'GradStatsHook: every {self.interval} iterations, {what}, on '
            f'the model and {len(self._selected)} weights: '
            f'{", ".join(name for name, *_ in self._selected)}',
            logger='current')

    def _select(self) -> list:
        trained = [entry for entry in self._params if entry[1].ndim > 1]
        if self.layers is not None:
            for pattern in self.layers:
                if not any(pattern.search(e[0]) for e in trained):
                    raise ValueError(
                        f'GradStatsHook: layers pattern {pattern.pattern!r} '
                        'matches no trained weight of the model')
            return [e for e in trained
                    if any(p.search(e[0]) for p in self.layers)]
        defaults = [
            lambda n, p: n.startswith('backbone.') and p.ndim == 4,
            lambda n, p: n.startswith('neck.') and p.ndim == 4,
            lambda n, p: re.search(r'bbox_head\.shared_fcs\.\d+\.weight$', n),
            lambda n, p: re.search(r'mask_head\.conv_logits\.weight$', n),
        ]
        selected = []
        for index, rule in enumerate(defaults):
            matches = [e for e in trained if rule(e[0], e[1])]
            if matches:  # the first backbone conv, the last of the others
                selected.append(matches[0] if index == 0 else matches[-1])
        return selected

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        if (self._armed or get_dist_info()[0] != 0
                or not self.every_n_train_iters(runner, self.interval)):
            return
        # Armed until the next real update (with accumulative_counts it may
        # come some iterations later); disarmed after it, so that no other
        # step runs any code of this hook.
        self._armed = True
        if self._tap_wrapper:
            self._wrapper.gc_tap = self._measure
            if isinstance(self._wrapper, AmpOptimWrapper):
                # The tap runs before the loss scaler decides; it calls
                # optimizer.step only for finite gradients, so the numbers
                # count only if the optimizer steps (as for a GC optimizer,
                # tapped by a step pre-hook).
                self._stepped = False
                self._handle = self._wrapper.optimizer.register_step_pre_hook(
                    lambda optimizer, args, kwargs: self._mark_stepped())
        else:
            self._handle = self._wrapper.optimizer.register_step_pre_hook(
                lambda optimizer, args, kwargs: self._measure())

    def _mark_stepped(self) -> None:
        self._stepped = True

    def _disarm(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self._tap_wrapper:
            self._wrapper.gc_tap = None
        self._armed = False
        self._stepped = None

    @torch.no_grad()
    def _measure(self) -> None:
        selected = {id(e[1]) for e in self._selected}
        grads = [(name, param, param.grad.detach(), group, gc_mode)
                 for name, param, group, gc_mode in self._params
                 if param.grad is not None and not param.grad.is_sparse
                 and param.grad.numel() > 0]
        # GC runs on copies in one float32 buffer per device, allocated
        # once per record rather than once per tensor.
        sizes = {}
        for _, _, grad, _, gc_mode in grads:
            if is_centralized(grad, gc_mode):
                sizes[grad.device] = max(sizes.get(grad.device, 0),
                                         grad.numel())
        buffers = {
            device: torch.empty(size, dtype=torch.float32, device=device)
            for device, size in sizes.items()
        }
        stats = {}
        total_before = total_after = max_abs = None
        for name, param, grad, group, gc_mode in grads:
            out_dim = group.get('gc_out_dim', 0)
            groups = group.get('gc_groups', 1)
            after = grad
            if is_centralized(grad, gc_mode):
                after = buffers[grad.device][:grad.numel()].view(grad.shape)
                after.copy_(grad)
                centralize_([after], conv_only=gc_mode == 'conv',
                            out_dim=out_dim, groups=groups)
            norm_before = torch.linalg.vector_norm(
                grad, dtype=torch.float32).double()
            norm_after = torch.linalg.vector_norm(
                after, dtype=torch.float32).double()
            layer_max = torch.linalg.vector_norm(
                grad, ord=float('inf'), dtype=torch.float32).double()
            total_before = (norm_before**2 if total_before is None else
                            total_before + norm_before**2)
            total_after = (norm_after**2 if total_after is None else
                           total_after + norm_after**2)
            max_abs = (layer_max if max_abs is None else
                       torch.maximum(max_abs, layer_max))
            if id(param) in selected:
                stats[name] = [
                    norm_before, norm_after, layer_max,
                    _row_means(after, out_dim, groups).abs().max()
                ]
        if total_before is not None:
            stats['model'] = [total_before.sqrt(), total_after.sqrt(),
                              max_abs]
        if not stats:
            return  # no gradient at all: stay armed for the next update
        # One transfer for every number (a single device sync).
        flat = torch.stack([v for values in stats.values() for v in values])
        flat = flat.cpu().tolist()
        self._stats = {}
        for layer, values in stats.items():
            norm_before, norm_after, layer_max, *row = flat[:len(values)]
            del flat[:len(values)]
            removed = 1 - norm_after / norm_before if norm_before > 0 else 0.
            self._stats[layer] = dict(
                norm_before=norm_before, norm_after=norm_after,
                removed=removed, max_abs=layer_max)
            if row:
                self._stats[layer]['row_mean_after'] = row[0]

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None) -> None:
        if self._stats is None:
            return
        if self._stepped is False:  # the loss scaler skipped the update
            self._stats = None  # armed still, for the next real update
            return
        stats, self._stats = self._stats, None
        self._disarm()
        scalars = {
            f'grad_stats/{layer}/{stat}': value
            for layer, values in stats.items()
            for stat, value in values.items()
        }
        # In the message hub without the 'train/' prefix: LogProcessor would
        # otherwise log the latest value again at every logger interval,
        # making the curves show numbers at iterations where none was
        # measured. The hook writes them to the visualizer (every backend)
        # at the iteration they were measured.
        for key, value in scalars.items():
            runner.message_hub.update_scalar(key, value)
        runner.visualizer.add_scalars(scalars, step=runner.iter + 1)
        summary = ', '.join(
            f'{layer} {values["norm_before"]:.3g}->{values["norm_after"]:.3g}'
            f' (-{100 * values["removed"]:.1f}%, max|g| '
            f'{values["max_abs"]:.3g})' for layer, values in stats.items())
        kind = 'GC would remove' if self.what_if else 'GC'
        runner.logger.info(
            f'grad_stats iter {runner.iter + 1} ({kind}): {summary}')

    def after_train(self, runner) -> None:
        if self._armed:
            self._disarm()
