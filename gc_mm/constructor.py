"""An optim-wrapper constructor with per-layer control of GC.

It does everything :class:`mmengine.optim.DefaultOptimWrapperConstructor`
does with ``paramwise_cfg`` (lr/decay multipliers, ``custom_keys``, ...) and
reads one more key, ``gc``, that switches GC per parameter by name::

    optim_wrapper = dict(
        constructor='GCOptimWrapperConstructor',
        optimizer=dict(type='SGD_GC', lr=0.02, momentum=0.9,
                       weight_decay=1e-4),
        paramwise_cfg=dict(
            norm_decay_mult=0.,
            gc=dict(include=['backbone', 'neck'],  # regexes; default: all
                    exclude=['rpn_head'],          # regexes
                    exclude_types=['ConvWS'],      # module types
                    mode='conv',                   # default: the applier's
                    transposed_conv='input')))     # see below

A parameter whose name matches ``include`` (all do, if it is not given), no
``exclude`` pattern, and that does not belong to a module of one of the
``exclude_types`` gets GC in ``mode``; every other one gets none. The
choice holds whichever applies GC: a GC optimizer (``SGD_GC``, ...) or
GCOptimWrapper/AmpGCOptimWrapper. It never decides who applies GC, and a
wrapper and an optimizer that both apply it are refused by the wrapper.

``exclude_types`` names module classes (a class, a name registered in
MMEngine's ``MODELS`` as configs write them, or a class name; a subclass
counts) whose own parameters get no GC, e.g. the weight-standardized convs
of the GN+WS configs, ``['ConvWS']`` (mmcv's ``ConvWS2d``; its adaptive
variant is ``'ConvAWS'``): their weight gradient has zero row means
already, so GC of it changes nothing, and with coupled weight decay
(``SGD_GC``) it would only centralize the decay term ``weight_decay * w``
(README: "GC and Weight Standardization"). A name that no module of the
model has is refused.

``transposed_conv`` says how GC treats the weights of transposed convs
(``nn.ConvTranspose1d/2d/3d`` and subclasses, e.g. the ``deconv`` upsampler
of mmdet's FCNMaskHead), stored as ``(in, out / groups, *kernel)``:

- ``'input'`` (default): over dim 0, i.e. per input channel, as the
  authors' code (and every GC optimizer without this constructor) does;
- ``'output'``: per output channel, as the paper defines GC (rows
  ``weight[j * in_g:(j + 1) * in_g, o]`` for output channel ``o`` of group
  ``j``);
- ``None``: not centralized.

The choice reaches the appliers as param-group keys:

- ``wrapper_gc_mode``: the per-layer choice ('conv_fc', 'conv', or None for
  no GC), written into every group the choice concerns (absent: the
  applier's own mode). GCOptimWrapper/AmpGCOptimWrapper read it. Where a GC
  optimizer applies GC to a group (its ``gc_mode`` is not None), the
  constructor also writes it into the group's ``gc_mode``, the optimizer's
  own per-group option; a GC optimizer with ``gc_mode=None`` is left off.
- ``gc_out_dim``: 1 for transposed-conv weights with ``'output'`` (absent:
  0), and ``gc_groups``: their ``groups`` when above 1 (absent: 1). Both go
  to :func:`~gc_mm.centralize.centralize_` as ``out_dim`` and ``groups``,
  from the wrappers and from the GC optimizers.

Param groups with identical settings are merged, so the optimizer sees a few
groups rather than one per tensor.
"""
import inspect
import logging
import math
import re
from typing import Dict, List, Optional

import torch.nn as nn
from mmengine.logging import print_log
from mmengine.optim import DefaultOptimWrapperConstructor, OptimWrapper
from mmengine.registry import MODELS, OPTIM_WRAPPER_CONSTRUCTORS, OPTIMIZERS
from torch import Tensor
from torch.nn.modules.conv import _ConvTransposeNd

from .centralize import check_gc_mode, is_centralized
from .optim_wrapper import CentralizeGradsMixin
from .optimizers import GCOptimizer, Lookahead, inner_optimizer

_GC_KEYS = ('include', 'exclude', 'exclude_types', 'mode', 'transposed_conv')
TRANSPOSED_CONV_RULES = ('input', 'output', None)
_UNSET = object()


def applied_gc_mode(optim_wrapper: OptimWrapper,
                    group: dict) -> Optional[str]:
    """The GC mode the wrapper or its optimizer applies to a param group."""
    if isinstance(optim_wrapper, CentralizeGradsMixin):
        wrapper_mode = optim_wrapper.group_gc_mode(group)
        if wrapper_mode is not None:
            return wrapper_mode
    if isinstance(inner_optimizer(optim_wrapper.optimizer), GCOptimizer):
        return group['gc_mode']
    return None


def row_length(param: Tensor, group: dict) -> int:
    """The length of a row GC centralizes in ``param``."""
    if group.get('gc_out_dim', 0) == 1:
        return param.numel() // (param.shape[1] * group.get('gc_groups', 1))
    return math.prod(param.shape[1:])


def updating_option(optimizer_cfg: dict, key: str):
    """The ``lr`` or ``weight_decay`` of the optimizer that computes the
    update, as it will be built: given in its config, else its class's
    default; for Lookahead, its inner optimizer's (Ranger takes its own).
    None where there is none (a required argument)."""
    if key in optimizer_cfg:
        return optimizer_cfg[key]
    cls = optimizer_cfg.get('type')
    if isinstance(cls, str):
        cls = OPTIMIZERS.get(cls)
    if not isinstance(cls, type):
        return None
    if issubclass(cls, Lookahead) and isinstance(
            optimizer_cfg.get('optimizer'), dict):
        return updating_option(optimizer_cfg['optimizer'], key)
    parameter = inspect.signature(cls).parameters.get(key)
    default = None if parameter is None else parameter.default
    # torch's `required` (older torch's SGD lr) and the like are no number.
    if isinstance(default, bool) or not isinstance(default, (int, float)):
        return None
    return default


def multiplied_options(paramwise_cfg: dict) -> List[str]:
    """The optimizer options ('lr', 'weight_decay') MMEngine's constructor
    multiplies for ``paramwise_cfg`` (custom_keys always set an lr)."""
    custom = paramwise_cfg.get('custom_keys') or {}
    needs_lr = bool(custom) or any(
        key in paramwise_cfg for key in ('bias_lr_mult', 'dcn_offset_lr_mult'))
    needs_wd = any('decay_mult' in key for key in paramwise_cfg) or any(
        isinstance(cfg, dict) and 'decay_mult' in cfg
        for cfg in custom.values())
    return ['lr'] * needs_lr + ['weight_decay'] * needs_wd


def _types(gc_cfg: dict) -> List:
    """``exclude_types``: classes, or class names (strings)."""
    types = gc_cfg.get('exclude_types', [])
    if isinstance(types, (str, type)):
        types = [types]
    if not isinstance(types, (list, tuple)) or not all(
            isinstance(t, (str, type)) for t in types):
        raise ValueError('paramwise_cfg.gc.exclude_types must be a list of '
                         f'module classes or class names, got {types!r}')
    return list(types)


def _is_of_type(module: nn.Module, name_or_class) -> bool:
    """A class; a name registered in MMEngine's MODELS (as configs write
    ``conv_cfg=dict(type='ConvWS')``); or a class name."""
    if isinstance(name_or_class, str):
        registered = MODELS.get(name_or_class)
        if isinstance(registered, type):
            name_or_class = registered
    if isinstance(name_or_class, type):
        return isinstance(module, name_or_class)
    return any(cls.__name__ == name_or_class for cls in type(module).__mro__)


def _patterns(gc_cfg: dict, key: str) -> List[re.Pattern]:
    patterns = gc_cfg.get(key, [])
    if isinstance(patterns, str):
        patterns = [patterns]
    try:
        return [re.compile(pattern) for pattern in patterns]
    except (TypeError, re.error) as error:
        raise ValueError(f'paramwise_cfg.gc.{key} must be a list of regular '
                         f'expressions, got {patterns!r}: {error}') from None


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class GCOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """DefaultOptimWrapperConstructor plus ``paramwise_cfg.gc`` (see the
    module docstring). It logs once how many of the trained tensors and
    parameters get GC and warns about rows of length 1, which GC would
    freeze."""

    def __init__(self,
                 optim_wrapper_cfg: dict,
                 paramwise_cfg: Optional[dict] = None):
        super().__init__(optim_wrapper_cfg, paramwise_cfg)
        gc_cfg = self.paramwise_cfg.get('gc', {})
        if not isinstance(gc_cfg, dict):
            raise TypeError(f'paramwise_cfg.gc must be a dict, got {gc_cfg!r}')
        unknown = set(gc_cfg) - set(_GC_KEYS)
        if unknown:
            raise ValueError(f'paramwise_cfg.gc got unknown keys '
                             f'{sorted(unknown)}; it takes {_GC_KEYS}')
        self.gc_include = _patterns(gc_cfg, 'include')
        self.gc_exclude = _patterns(gc_cfg, 'exclude')
        self.gc_exclude_types = _types(gc_cfg)
        self.gc_mode = (check_gc_mode(gc_cfg['mode'], 'paramwise_cfg.gc.mode')
                        if 'mode' in gc_cfg else _UNSET)
        self.transposed_conv = gc_cfg.get('transposed_conv', 'input')
        if self.transposed_conv not in TRANSPOSED_CONV_RULES:
            raise ValueError(
                "paramwise_cfg.gc.transposed_conv must be 'input' (per input "
                "channel, the authors' rule), 'output' (per output channel) "
                f'or None (no GC), got {self.transposed_conv!r}')
        self.has_gc_cfg = bool(gc_cfg)

    def _validate_cfg(self) -> None:
        # MMEngine's constructor multiplies the lr and weight_decay of the
        # optimizer config (and refuses decay multipliers without one):
        # Lookahead's are in its inner config, Ranger's and any optimizer's
        # left at their default in its signature. The multipliers apply to
        # those the updating optimizer uses, as for that optimizer alone.
        if self.base_lr is None:
            self.base_lr = updating_option(self.optimizer_cfg, 'lr')
        if self.base_wd is None:
            self.base_wd = updating_option(self.optimizer_cfg, 'weight_decay')
        super()._validate_cfg()

    def _gc_mode_for(self, name: str):
        """The GC mode chosen for a parameter name, or _UNSET to keep the
        applier's."""
        included = (not self.gc_include
                    or any(p.search(name) for p in self.gc_include))
        if not included or any(p.search(name) for p in self.gc_exclude):
            return None
        return self.gc_mode

    def add_params(self,
                   params: List[dict],
                   module: nn.Module,
                   prefix: str = '',
                   is_dcn_module=None) -> None:
        super().add_params(params, module, prefix, is_dcn_module)
        if prefix:
            return  # a recursive call: the top-level one finishes the groups
        names = {id(p): name for name, p in module.named_parameters()}
        transposed = {
            id(m.weight): m
            for m in module.modules() if isinstance(m, _ConvTransposeNd)
        }
        excluded = self._excluded_by_type(module)
        for group in params:
            param = group['params'][0]  # mmengine makes one group per tensor
            gc_mode = self._gc_mode_for(names[id(param)])
            if id(param) in excluded:
                gc_mode = None
            deconv = transposed.get(id(param))
            if deconv is not None and gc_mode is not None:
                if self.transposed_conv is None:
                    gc_mode = None
                elif self.transposed_conv == 'output':
                    group['gc_out_dim'] = 1
                    if deconv.groups > 1:
                        group['gc_groups'] = deconv.groups
            if gc_mode is not _UNSET:
                group['wrapper_gc_mode'] = gc_mode
        params[:] = _merge_groups(params)

    def _excluded_by_type(self, model: nn.Module) -> set:
        """ids of the parameters of modules of ``exclude_types``."""
        excluded = set()
        for name_or_class in self.gc_exclude_types:
            matched = [m for m in model.modules()
                       if _is_of_type(m, name_or_class)]
            if not matched:
                what = getattr(name_or_class, '__name__', name_or_class)
                raise ValueError(
                    f'paramwise_cfg.gc.exclude_types: the model has no '
                    f'module of type {what!r}')
            excluded.update(id(p) for m in matched
                            for p in m.parameters(recurse=False))
        return excluded

    def __call__(self, model: nn.Module) -> OptimWrapper:
        optim_wrapper = super().__call__(model)
        module = model.module if hasattr(model, 'module') else model
        optimizer = optim_wrapper.optimizer
        if isinstance(inner_optimizer(optimizer), GCOptimizer):
            for group in optimizer.param_groups:
                if (group['gc_mode'] is not None
                        and 'wrapper_gc_mode' in group):
                    group['gc_mode'] = group['wrapper_gc_mode']
        self._log_gc(optim_wrapper, module)
        return optim_wrapper

    def _log_gc(self, optim_wrapper: OptimWrapper, model: nn.Module) -> None:
        names = {id(p): name for name, p in model.named_parameters()}
        n_frozen = sum(not p.requires_grad for p in model.parameters())
        n_tensors = n_params = gc_tensors = gc_params = 0
        frozen_rows = []
        for group in optim_wrapper.optimizer.param_groups:
            gc_mode = applied_gc_mode(optim_wrapper, group)
            for param in group['params']:
                if not param.requires_grad:
                    continue  # never has a gradient: neither trained nor GC
                n_tensors += 1
                n_params += param.numel()
                if is_centralized(param, gc_mode):
                    gc_tensors += 1
                    gc_params += param.numel()
                    if row_length(param, group) == 1:
                        frozen_rows.append(names.get(id(param), '?'))
        if self.has_gc_cfg and gc_tensors == 0:
            print_log(
                'paramwise_cfg.gc has no effect: neither the optimizer '
                f'({type(optim_wrapper.optimizer).__name__}) nor the wrapper '
                f'({type(optim_wrapper).__name__}) applies GC with these '
                'settings.',
                logger='current',
                level=logging.WARNING)
        frozen = (f'; {n_frozen} frozen tensors not counted'
                  if n_frozen else '')
        print_log(
            f'Gradient Centralization on {gc_tensors} of {n_tensors} trained '
            f'parameter tensors ({gc_params:,} of {n_params:,} trained '
            f'parameters{frozen})',
            logger='current')
        if frozen_rows:
            print_log(
                'GC makes the gradient of a row of length 1 exactly zero, so '
                f'these weights will not train: {", ".join(frozen_rows)}. '
                'Exclude them with paramwise_cfg.gc.exclude or use '
                "mode='conv'.",
                logger='current',
                level=logging.WARNING)


def _merge_groups(groups: List[dict]) -> List[dict]:
    """Merge param groups whose settings are identical (first-seen order)."""
    merged: Dict[str, dict] = {}
    for group in groups:
        options = {k: v for k, v in group.items() if k != 'params'}
        key = repr(sorted(options.items()))
        if key in merged:
            merged[key]['params'].extend(group['params'])
        else:
            merged[key] = dict(options, params=list(group['params']))
    return list(merged.values())
