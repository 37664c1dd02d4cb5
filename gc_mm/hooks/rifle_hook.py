"""RIFLEHook: re-initialize the last layers a few times while fine-tuning."""
import copy
import re
from collections import defaultdict
from typing import Optional

import torch
import torch.nn as nn
from mmengine.dist import broadcast
from mmengine.hooks import EMAHook, Hook
from mmengine.logging import print_log
from mmengine.model import BaseModule
from mmengine.registry import HOOKS
from mmengine.runner import IterBasedTrainLoop
from torch.optim import Optimizer

from .utils import compile_layers, optim_wrappers, unwrap_model


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


@torch.no_grad()
def _restart_emas(runner, selected: dict) -> int:
    """Copy the re-initialized layers ``selected`` ({name: module} of the
    model) into the EMA model of every EMAHook of the run, so that their
    average restarts from the new weights, as their optimizer state does:
    an average of the old layer and the new one would be neither. Returns
    how many EMA models were changed."""
    hooks = [hook for hook in runner.hooks if isinstance(hook, EMAHook)
             and getattr(hook, 'ema_model', None) is not None]
    for hook in hooks:
        for name, module in selected.items():
            averaged = hook.ema_model.module.get_submodule(name).state_dict()
            for key, value in module.state_dict().items():
                averaged[key].copy_(value)
    return len(hooks)


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
    - restarts their EMA from the new weights (in the model copy of every
      ``EMAHook``), as it drops their optimizer state: an average of the
      old layer and the new one would be neither;
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
        self._model = unwrap_model(runner.model)
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
                      for wrapper in optim_wrappers(runner))
        emas = _restart_emas(runner, self._selected)
        self._done.append(runner.iter)
        runner.message_hub.update_info('rifle_reinit_iters', list(self._done))
        where = (f'epoch {runner.epoch}, ' if self._unit == 'epoch' else '')
        runner.logger.info(
            f'RIFLEHook: re-init {len(self._done)} of {self.num_reinits} '
            f'({where}iteration {runner.iter}): '
            f'{", ".join(self._selected)} re-initialized, {dropped} '
            f'optimizer state entries of their {len(params)} parameter '
            f'tensors dropped{", their EMA restarted" if emas else ""}')
