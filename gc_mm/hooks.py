"""Hooks the tools add to every run.

- :class:`RandomStateHook` makes ``--resume`` continue exactly where
  training stopped. MMEngine checkpoints the model, optimizer, schedulers
  and message hub, but not the random number generators: a resumed run
  would sample other RoIs (and other random augmentations) than the
  uninterrupted run.
- :class:`CheckpointCheckHook` checks what the checkpoint the runner loaded
  holds, before it is used (the tools check the file itself before the run
  without loading it, so it is loaded once).
- :class:`GradStatsHook` records what GC does to the gradients (norms before
  and after, the share removed), every ``interval`` iterations.
- :class:`RIFLEHook` re-initializes the last layers a few times while
  fine-tuning (RIFLE).
- :class:`SlowWeightsHook` validates, tests and saves the slow weights of a
  Lookahead optimizer (Lookahead, Ranger).
"""
import copy
import logging
import random
import re
from collections import defaultdict
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from mmengine.dist import broadcast, get_dist_info
from mmengine.hooks import CheckpointHook, Hook
from mmengine.logging import print_log
from mmengine.model import BaseModule
from mmengine.optim import OptimWrapper, OptimWrapperDict
from mmengine.registry import HOOKS
from mmengine.runner import IterBasedTrainLoop
from torch import Tensor
from torch.optim import Optimizer

from .centralize import centralize_, is_centralized
from .checks import check_loaded_checkpoint
from .constructor import applied_gc_mode
from .optim_wrapper import CentralizeGradsMixin
from .optimizers import Lookahead


def _local_state() -> dict:
    state = dict(
        python=random.getstate(),
        numpy=np.random.get_state(),
        torch=torch.get_rng_state())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def _restore(state: dict) -> None:
    """Set this process's generators; torch's setters take CPU byte tensors,
    and a resumed checkpoint arrives on the runner's device."""
    random.setstate(state['python'])
    np.random.set_state(state['numpy'])
    torch.set_rng_state(state['torch'].cpu())
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state['cuda']])


@HOOKS.register_module()
class RandomStateHook(Hook):
    """Save the python, numpy, torch (and CUDA) generator states of every
    rank in each checkpoint; restore each rank its own when training resumes
    from it.

    MMEngine writes checkpoints on rank 0 only (``before_save_checkpoint``
    runs there alone), so in a distributed run the ranks' states are
    gathered just before the :class:`~mmengine.hooks.CheckpointHook` saves
    (this hook's priority is higher): after every epoch and validation, and
    after the iterations at which an iteration-based CheckpointHook saves.
    A run resumed on another number of processes keeps its seeded states
    (with a warning): no rank's stream would continue.

    Checkpoint layout: ``random_state = dict(ranks=[state of rank 0, ...])``.
    """

    priority = 'LOW'  # before CheckpointHook (VERY_LOW) in the same stage

    def __init__(self):
        self._gathered = None  # (runner.iter, [state of each rank])

    def _gather(self, runner) -> None:
        world_size = get_dist_info()[1]
        if world_size == 1:
            return
        states = [None] * world_size
        dist.all_gather_object(states, _local_state())
        self._gathered = (runner.iter, states)

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None) -> None:
        # CheckpointHook.after_train_iter's condition, asked of the hook.
        if get_dist_info()[1] > 1 and any(
                not hook.by_epoch and (
                    hook.every_n_train_iters(runner, hook.interval,
                                             hook.save_begin) or
                    (hook.save_last and hook.is_last_train_iter(runner)))
                for hook in runner.hooks if isinstance(hook, CheckpointHook)):
            self._gather(runner)

    def after_train_epoch(self, runner) -> None:
        self._gather(runner)

    def after_val_epoch(self, runner, metrics=None) -> None:
        self._gather(runner)  # CheckpointHook may save the best one now

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        world_size = get_dist_info()[1]
        if world_size == 1:
            ranks = [_local_state()]
        elif self._gathered is not None and self._gathered[0] == runner.iter:
            ranks = self._gathered[1]
        else:  # a save this hook could not foresee: no states
            print_log(
                'RandomStateHook: this checkpoint was saved outside the '
                "CheckpointHook's schedule; it carries no random states",
                logger='current', level=logging.WARNING)
            return
        checkpoint['random_state'] = dict(ranks=ranks)

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        saved = checkpoint.get('random_state')
        if saved is None or not runner._resume:  # load_from: a new run
            return
        # gc_mm 0.1.0 saved one flat state, rank 0's.
        ranks = saved['ranks'] if 'ranks' in saved else [saved]
        rank, world_size = get_dist_info()
        if len(ranks) != world_size:
            print_log(
                f'RandomStateHook: the checkpoint holds the random states '
                f'of {len(ranks)} process(es), this run has {world_size}: '
                'they are not restored (the run continues, but not as the '
                'interrupted one would have)', logger='current',
                level=logging.WARNING)
            return
        _restore(ranks[rank])


@HOOKS.register_module()
class CheckpointCheckHook(Hook):
    """Refuse a loaded checkpoint that cannot serve the run (raises
    :class:`gc_mm.checks.ConfigError` naming ``checkpoint``): ``--resume``
    needs MMEngine's state_dict, optimizer and meta, ``load_from`` model
    weights. Runs before the model, optimizer or generators are touched.

    Args:
        checkpoint (str): the path the runner loads, for the message.
    """

    priority = 'VERY_HIGH'

    def __init__(self, checkpoint: str):
        self.checkpoint = checkpoint

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        check_loaded_checkpoint(checkpoint, self.checkpoint, runner._resume)


def _unwrap(model):
    return model.module if hasattr(model, 'module') else model


def _row_means(grad: Tensor, out_dim: int, groups: int) -> Tensor:
    """Each row's mean, rows as :func:`~gc_mm.centralize.centralize_` sees
    them."""
    if out_dim == 1:
        blocks = grad.unflatten(0, (groups, -1))
        return blocks.mean(dim=(1, *range(3, blocks.ndim)),
                           dtype=torch.float64)
    return grad.reshape(grad.shape[0], -1).mean(dim=1, dtype=torch.float64)


def _optim_wrappers(runner) -> list:
    """The runner's optim wrappers (those of an OptimWrapperDict); none
    before it built one (a test-only run, whose weights come from a file)."""
    optim_wrapper = getattr(runner, 'optim_wrapper', None)
    if isinstance(optim_wrapper, OptimWrapperDict):
        return list(optim_wrapper.values())
    if isinstance(optim_wrapper, OptimWrapper):
        return [optim_wrapper]
    return []


def compile_layers(owner: str, layers) -> Optional[list]:
    """``layers`` (a regex or a list of them, or None) compiled; a
    ValueError naming ``owner`` for anything else or an empty list."""
    if layers is None:
        return None
    if isinstance(layers, str):
        layers = [layers]
    try:
        compiled = [re.compile(pattern) for pattern in layers]
    except (TypeError, re.error) as error:
        raise ValueError(f'{owner}: layers must be a list of regular '
                         f'expressions, got {layers!r}: {error}') from None
    if not compiled:
        raise ValueError(f'{owner}: layers is empty')
    return compiled


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
    after every ``interval``-th iteration; in a distributed run on rank 0
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

    def before_train(self, runner) -> None:
        self._wrapper = runner.optim_wrapper
        if not isinstance(self._wrapper, OptimWrapper):
            raise TypeError(
                'GradStatsHook needs one OptimWrapper, got '
                f'{type(self._wrapper).__name__}')
        names = {
            id(p): name
            for name, p in _unwrap(runner.model).named_parameters()
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
        else:
            self._handle = self._wrapper.optimizer.register_step_pre_hook(
                lambda optimizer, args, kwargs: self._measure())

    def _disarm(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self._tap_wrapper:
            self._wrapper.gc_tap = None
        self._armed = False

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


def _initializer(module: nn.Module, model: nn.Module, name: str):
    """The module that re-creates ``module`` as the model's initialization
    made it: its closest enclosing MMEngine module (whose ``init_weights``
    applies that module's ``init_cfg``, e.g. BBoxHead's Normal std 0.01 on
    ``fc_cls``, and any custom ``init_weights``, e.g. FCNMaskHead's Kaiming
    on ``conv_logits``), with the path from it; else ``module`` itself, if
    it is an MMEngine module or has layers with ``reset_parameters``; else
    None. (An ``init_cfg`` of type 'Pretrained' on that module would load
    its checkpoint into the copy: RIFLE would restore those weights.)"""
    parts = name.split('.')
    for depth in range(len(parts) - 1, -1, -1):
        ancestor = model.get_submodule('.'.join(parts[:depth]))
        if isinstance(ancestor, BaseModule):
            return ancestor, '.'.join(parts[depth:])
    if isinstance(module, BaseModule) or any(
            hasattr(m, 'reset_parameters') for m in module.modules()):
        return module, ''
    return None


@torch.no_grad()
def _reinitialize(module: nn.Module, initializer: nn.Module,
                  path: str) -> None:
    """Re-initialize ``module`` (the submodule ``path`` of ``initializer``)
    as the model's construction and ``initializer.init_weights()`` did."""
    if not isinstance(initializer, BaseModule):
        for layer in initializer.modules():
            if hasattr(layer, 'reset_parameters'):
                layer.reset_parameters()
        return
    # init_weights initializes every layer of the module it runs on: it runs
    # on a copy, and only the selected layer is taken from it. MMEngine runs
    # init_weights once per module (_is_init) and, at the top level, dumps
    # every parameter's init to the log; the copy is marked as not yet
    # initialized and given the shared record a nested call expects.
    fresh = copy.deepcopy(initializer)
    # First the layer's construction-time init (torch's reset_parameters),
    # which init_weights keeps where no init_cfg or custom init covers it.
    for layer in (fresh.get_submodule(path) if path else fresh).modules():
        if hasattr(layer, 'reset_parameters'):
            layer.reset_parameters()
    record = defaultdict(dict)
    for param in fresh.parameters():
        record[param] = dict(init_info='', tmp_mean_value=param.mean().cpu())
    for sub in fresh.modules():
        sub._params_init_info = record
        if isinstance(sub, BaseModule):
            sub._is_init = False
    fresh.init_weights()
    source = (fresh.get_submodule(path) if path else fresh).state_dict()
    for key, target in module.state_dict().items():
        target.copy_(source[key])


def _drop_optimizer_state(optimizer: Optimizer, params: set) -> int:
    """Forget every per-parameter state entry of ``params`` in ``optimizer``
    and in the optimizers it wraps (Lookahead's inner optimizer, ...), so
    that each starts afresh for them; returns how many entries went."""
    dropped = 0
    seen = set()
    pending = [optimizer]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        for param in [p for p in current.state if p in params]:
            del current.state[param]
            dropped += 1
        pending.extend(value for value in vars(current).values()
                       if isinstance(value, Optimizer))
    return dropped


# The class-dependent last layers of the R-CNN heads (Faster, Mask, and the
# per-stage heads of Cascade R-CNN).
RIFLE_DEFAULT_LAYERS = (r'^roi_head\.bbox_head(\.\d+)?\.fc_(cls|reg)$',
                        r'^roi_head\.mask_head(\.\d+)?\.conv_logits$')


@HOOKS.register_module()
class RIFLEHook(Hook):
    """RIFLE: re-initialize the last layers ``num_reinits`` times while
    fine-tuning (Li et al., "RIFLE: Backpropagation in Depth for Deep
    Transfer Learning through Re-Initializing the Fully-connected LayEr",
    ICML 2020).

    The re-initializations are evenly spaced over the schedule, never in
    its last part: the ``j``-th (``j = 1 .. K``, ``K = num_reinits``) comes
    at ``begin + floor(j * (end - begin) / (K + 1))``, counted in epochs
    (``by_epoch=True``) or iterations, i.e. every ``E / (K + 1)`` epochs of
    an ``E``-epoch schedule as in the official code, and the last
    ``(end - begin) / (K + 1)`` of the span trains the final layers without
    one. ``end`` defaults to the schedule's length (``max_epochs`` or
    ``max_iters``); an earlier ``end`` (e.g. the first lr step) keeps the
    re-inits off a longer tail, as the Paddle version does with its last 5
    epochs. A re-init at epoch ``e`` happens before the first iteration of
    that epoch (after the validation of epoch ``e - 1``); at iteration
    ``i``, before iteration ``i`` (0-based) runs.

    Each re-init:

    - gives every selected layer fresh weights, as the model's
      initialization made them: the ``init_weights`` of the layer's closest
      enclosing MMEngine module (which applies its ``init_cfg``: for
      mmdet's BBoxHead, ``fc_cls`` Normal(0, 0.01) and ``fc_reg``
      Normal(0, 0.001), biases 0; FCNMaskHead's own ``init_weights``:
      Kaiming normal (fan_out) on ``conv_logits``), run on a copy of that
      module after torch's construction-time init (``reset_parameters``)
      of the selected layers, which it keeps where it has no init of its
      own; only the selected layers are taken from the copy. A layer
      outside any MMEngine module: its ``reset_parameters``. In a
      distributed run rank 0's new weights are broadcast to every rank;
    - drops every optimizer state entry of those parameters (momentum, Adam
      moments and step, Lookahead's slow weights: any optimizer and the
      optimizers it wraps start afresh for them), and zeroes their
      gradients (with ``accumulative_counts``, what earlier micro-batches
      left was computed for the old weights);
    - is logged, and the iterations re-initialized so far are kept in the
      message hub (``rifle_reinit_iters``).

    Nothing else changes: other weights, their optimizer state and the
    learning-rate schedule go on as they were.

    Resume: the plan is derived from the schedule, and a re-init whose
    iteration is before the resumed one was done before the checkpoint was
    saved, so it is not repeated (a checkpoint saved at the end of epoch
    ``e - 1`` precedes the re-init at epoch ``e``, which the resumed run
    does).

    Args:
        num_reinits (int): ``K``, how many re-inits. Defaults to 3 (the
            paper's).
        layers (list[str], optional): regular expressions (``re.search``)
            on *module* names (as ``model.named_modules()``, without a DDP
            wrapper's ``module.``) that select the layers to re-initialize;
            a module inside one already selected is part of it. Default:
            ``roi_head.bbox_head.fc_cls``, ``roi_head.bbox_head.fc_reg`` and
            ``roi_head.mask_head.conv_logits`` (and their per-stage twins of
            Cascade R-CNN), those the model has.
        by_epoch (bool): count ``begin``/``end`` and place the re-inits in
            epochs (an epoch-based loop is needed) or iterations. Defaults
            to True.
        begin (int): where the span starts. Defaults to 0.
        end (int, optional): where it ends. Defaults to the schedule's
            length.

    Example::

        custom_hooks = [dict(type='RIFLEHook', num_reinits=3)]
    """

    priority = 'NORMAL'

    def __init__(self,
                 num_reinits: int = 3,
                 layers: Optional[list] = None,
                 by_epoch: bool = True,
                 begin: int = 0,
                 end: Optional[int] = None):
        for name, value, least in (('num_reinits', num_reinits, 1),
                                   ('begin', begin, 0),
                                   ('end', end, 1)):
            if value is None and name == 'end':
                continue
            if (isinstance(value, bool) or not isinstance(value, int)
                    or value < least):
                raise ValueError(f'RIFLEHook: {name} must be an int >= '
                                 f'{least}, got {value!r}')
        if not isinstance(by_epoch, bool):
            raise ValueError(
                f'RIFLEHook: by_epoch must be True or False, got {by_epoch!r}')
        self.layers = compile_layers('RIFLEHook', layers)
        self.num_reinits = num_reinits
        self.by_epoch = by_epoch
        self.begin = begin
        self.end = end

    def plan(self, runner) -> list:
        """The iterations (0-based, before which the layers are re-inited)
        of the ``num_reinits`` re-inits of this run's schedule."""
        if self.by_epoch:
            if isinstance(runner.train_loop, IterBasedTrainLoop):
                raise ValueError(
                    'RIFLEHook(by_epoch=True) needs an epoch-based train '
                    'loop; set by_epoch=False to count iterations')
            length, unit = runner.max_epochs, 'epoch'
            iters_per_unit = len(runner.train_dataloader)
        else:
            length, unit, iters_per_unit = runner.max_iters, 'iteration', 1
        end = length if self.end is None else self.end
        if not self.begin < end <= length:
            raise ValueError(
                f'RIFLEHook: needs begin < end <= the schedule length '
                f'({length} {unit}s), got begin={self.begin}, end={end}')
        points = [self.begin + j * (end - self.begin) // (self.num_reinits + 1)
                  for j in range(1, self.num_reinits + 1)]
        if len(set(points)) < len(points) or points[0] <= self.begin:
            raise ValueError(
                f'RIFLEHook: {self.num_reinits} re-inits do not fit evenly '
                f'between {unit} {self.begin} and {end} (at {points}); '
                f'lower num_reinits or widen the span')
        self._unit = unit
        return [point * iters_per_unit for point in points]

    def _select(self, model: nn.Module) -> dict:
        """{name: module} of the layers to re-initialize, outermost only."""
        patterns = self.layers or [re.compile(p) for p in RIFLE_DEFAULT_LAYERS]
        modules = dict(model.named_modules())
        matched = {name for name in modules if name and any(
            pattern.search(name) for pattern in patterns)}
        if self.layers is not None:
            for pattern in self.layers:
                if not any(pattern.search(name) for name in matched):
                    raise ValueError(
                        f'RIFLEHook: layers pattern {pattern.pattern!r} '
                        'matches no module of the model')
        elif not matched:
            raise ValueError(
                'RIFLEHook: the model has none of the default layers '
                '(roi_head.bbox_head.fc_cls/fc_reg, roi_head.mask_head.'
                'conv_logits); choose them with layers=[regex, ...]')
        selected = {
            name: modules[name] for name in sorted(matched)
            if not any(name.startswith(outer + '.') for outer in matched)
        }
        for name, module in selected.items():
            if not any(True for _ in module.parameters()):
                raise ValueError(
                    f'RIFLEHook: the selected module {name!r} has no '
                    'parameters to re-initialize')
            if _initializer(module, model, name) is None:
                raise ValueError(
                    f'RIFLEHook: {name!r} ({type(module).__name__}) has no '
                    'init_weights/reset_parameters and no enclosing MMEngine '
                    'module to re-initialize it')
        return selected

    def before_train(self, runner) -> None:
        self._model = _unwrap(runner.model)
        self._selected = self._select(self._model)
        self._plan = self.plan(runner)
        done = [it for it in self._plan if it < runner.iter]
        self._done = done
        runner.message_hub.update_info('rifle_reinit_iters', list(done))
        resumed = (f'; done before the checkpoint: iterations {done}'
                   if done else '')
        print_log(
            f'RIFLEHook: {self.num_reinits} re-inits of '
            f'{", ".join(self._selected)} before iterations {self._plan} '
            f'(0-based){resumed}', logger='current')

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        if runner.iter not in self._plan or runner.iter in self._done:
            return
        params = set()
        for name, module in self._selected.items():
            initializer, path = _initializer(module, self._model, name)
            _reinitialize(module, initializer, path)
            for tensor in (*module.parameters(), *module.buffers()):
                broadcast(tensor.data, src=0)
            params.update(module.parameters())
        for param in params:
            if param.grad is not None:
                param.grad.zero_()
        dropped = sum(_drop_optimizer_state(wrapper.optimizer, params)
                      for wrapper in _optim_wrappers(runner))
        self._done.append(runner.iter)
        runner.message_hub.update_info('rifle_reinit_iters', list(self._done))
        where = (f'epoch {runner.epoch}, ' if self._unit == 'epoch' else '')
        runner.logger.info(
            f'RIFLEHook: re-init {len(self._done)} of {self.num_reinits} '
            f'({where}iteration {runner.iter}): '
            f'{", ".join(self._selected)} re-initialized, {dropped} '
            f'optimizer state entries of their {len(params)} parameter '
            'tensors dropped')


def _lookaheads(runner) -> list:
    """The Lookahead optimizers (Ranger included) the runner trains with."""
    return [wrapper.optimizer for wrapper in _optim_wrappers(runner)
            if isinstance(wrapper.optimizer, Lookahead)]


@HOOKS.register_module()
class SlowWeightsHook(Hook):
    """Evaluate and save the slow weights of a Lookahead optimizer
    (:class:`~gc_mm.optimizers.Lookahead`, :class:`~gc_mm.optimizers.Ranger`).

    Lookahead's slow weights are the ones its authors (and Ranger's users)
    evaluate; the model holds the fast weights while it trains. This hook:

    - ``val``: copies the slow weights into the model for each validation
      and the fast weights back after it;
    - ``test``: the same around a test run after training;
    - ``checkpoint``: writes the slow weights into each checkpoint's
      ``state_dict`` (what ``load_from``, tools/test.py and deployment read)
      and the fast weights under ``'lookahead_fast_weights'``, which this
      hook puts back into ``state_dict`` when a run resumes from it, so the
      resumed run continues from the fast weights, exactly.

    A parameter without slow weights yet (before the first step) keeps its
    weights. Buffers (BatchNorm statistics) are not Lookahead's: they stay
    as trained. Whatever the switches, a checkpoint that carries fast
    weights is resumed with them. In a run with no Lookahead optimizer the
    hook does nothing.

    Args:
        val (bool): validate with the slow weights. Defaults to True.
        test (bool): test with the slow weights. Defaults to True.
        checkpoint (bool): save the slow weights as the checkpoint's model
            weights. Defaults to True.

    Example::

        custom_hooks = [dict(type='SlowWeightsHook')]
    """

    # Before hooks of the same stage that read the weights (CheckpointHook
    # saves the best checkpoint after validation, at VERY_LOW).
    priority = 'ABOVE_NORMAL'
    FAST_WEIGHTS_KEY = 'lookahead_fast_weights'

    def __init__(self, val: bool = True, test: bool = True,
                 checkpoint: bool = True):
        for name, value in (('val', val), ('test', test),
                            ('checkpoint', checkpoint)):
            if not isinstance(value, bool):
                raise ValueError(
                    f'SlowWeightsHook: {name} must be a bool, got {value!r}')
        self.val = val
        self.test = test
        self.checkpoint = checkpoint
        self._fast = None  # [(param, fast weights)] while slow ones are in

    @torch.no_grad()
    def _swap_in(self, runner) -> None:
        if self._fast is not None:
            return
        pairs = [pair for optimizer in _lookaheads(runner)
                 for pair in optimizer.slow_weights()]
        self._fast = [(param, param.detach().clone()) for param, _ in pairs]
        for param, slow in pairs:
            param.copy_(slow)

    @torch.no_grad()
    def _swap_out(self) -> None:
        if self._fast is None:
            return
        for param, fast in self._fast:
            param.copy_(fast)
        self._fast = None

    def before_val_epoch(self, runner) -> None:
        if self.val:
            self._swap_in(runner)

    def after_val_epoch(self, runner, metrics=None) -> None:
        self._swap_out()

    def before_test_epoch(self, runner) -> None:
        if self.test:
            self._swap_in(runner)

    def after_test_epoch(self, runner, metrics=None) -> None:
        self._swap_out()

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        if not self.checkpoint:
            return
        names = {id(param): name
                 for name, param in _unwrap(runner.model).named_parameters()}
        # The fast weights are the model's unless the slow ones are in now.
        fast = {id(param): value for param, value in self._fast or ()}
        state_dict = checkpoint['state_dict']
        fast_weights = {}
        for optimizer in _lookaheads(runner):
            for param, slow in optimizer.slow_weights():
                name = names.get(id(param))
                if name is None or name not in state_dict:
                    continue
                fast_weights[name] = fast.get(id(param),
                                              param).detach().cpu().clone()
                state_dict[name] = slow.detach().to(
                    'cpu', state_dict[name].dtype, copy=True)
        if fast_weights:
            checkpoint[self.FAST_WEIGHTS_KEY] = fast_weights

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        fast_weights = checkpoint.pop(self.FAST_WEIGHTS_KEY, None)
        if fast_weights is not None and runner._resume:
            checkpoint['state_dict'].update(fast_weights)
