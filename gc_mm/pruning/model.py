"""A pruned detector as a config: ``PrunedModel`` builds the model of its
config as it was before pruning, then gives the modules pruning shrank their
pruned widths, so that the pruned checkpoint loads into it with strict keys
(and ``torch.load(weights_only=True)``: no pickled model)::

    model = dict(
        type='PrunedModel',         # this builder (gc_mm.pruning)
        pruned_type='MaskRCNN',     # the model's own type
        pruned_shapes={             # the modules pruning changed
            'backbone.layer1.0.conv1': dict(in_channels=45,
                                            out_channels=45),
            'backbone.layer1.0.bn1': dict(num_features=45),
            ...},
        backbone=..., neck=..., ...)  # the rest of the model's config

``tools/prune.py`` writes such configs, with ``'gc_mm.pruning'`` in their
``custom_imports``: the import a config of a pruned model needs. The built
model is the detector itself (a ``MaskRCNN`` here), so the runner, the
tools and MMDetection's inferencer use it as any other.

Widths are changed in place: a convolution's ``in_channels`` and
``out_channels`` (its ``groups`` stay), a BatchNorm's ``num_features``, a
GroupNorm's ``num_channels`` (its ``num_groups`` stay) and a Linear's
``in_features`` and ``out_features``; their tensors are cut to the new
shapes (the first channels of the freshly initialized ones, which a
checkpoint or ``init_weights`` then overwrites).
"""
import torch
from mmdet.registry import MODELS
from torch import nn

from ..checks import ConfigError

# The width attributes of the module types pruning shrinks.
_WIDTHS = (
    (nn.modules.conv._ConvNd, ('in_channels', 'out_channels')),
    (nn.modules.batchnorm._BatchNorm, ('num_features', )),
    (nn.GroupNorm, ('num_channels', )),
    (nn.Linear, ('in_features', 'out_features')),
)


def module_widths(module: nn.Module) -> dict:
    """The widths of ``module`` that pruning can change ({} for a module
    type it does not change)."""
    for kind, names in _WIDTHS:
        if isinstance(module, kind):
            return {name: getattr(module, name) for name in names}
    return {}


def model_widths(model: nn.Module) -> dict:
    """{module name: :func:`module_widths`} of every such module."""
    return {name: widths for name, module in model.named_modules()
            for widths in [module_widths(module)] if widths}


def changed_widths(model: nn.Module, before: dict) -> dict:
    """The entries of :func:`model_widths` that differ from ``before``."""
    return {name: widths
            for name, widths in model_widths(model).items()
            if widths != before.get(name)}


def _tensor_shapes(module: nn.Module, widths: dict) -> dict:
    """{parameter or buffer name: its shape} at ``widths``."""
    if isinstance(module, nn.modules.conv._ConvNd):
        cin, cout = widths['in_channels'], widths['out_channels']
        kernel = tuple(module.kernel_size)
        weight = ((cin, cout // module.groups) if module.transposed else
                  (cout, cin // module.groups)) + kernel
        return dict(weight=weight, bias=(cout, ))
    if isinstance(module, nn.Linear):
        return dict(weight=(widths['out_features'], widths['in_features']),
                    bias=(widths['out_features'], ))
    (width, ) = widths.values()  # a norm layer: one tensor shape
    return {name: (width, ) for name in ('weight', 'bias', 'running_mean',
                                         'running_var')}


def resize_(module: nn.Module, widths: dict, where: str) -> None:
    """Give ``module`` the (smaller) ``widths``, cutting its tensors."""
    old = module_widths(module)
    if set(widths) != set(old):
        raise ConfigError(
            f'pruned_shapes[{where!r}] gives {sorted(widths)}, but the '
            f'module is a {type(module).__name__} (widths {sorted(old)}).')
    for name, value in widths.items():
        if not isinstance(value, int) or not 0 < value <= old[name]:
            raise ConfigError(
                f'pruned_shapes[{where!r}]: {name}={value!r} must be a '
                f'positive int no larger than the unpruned {old[name]}.')
    groups = getattr(module, 'groups', None) or getattr(
        module, 'num_groups', 1)
    for name in ('in_channels', 'out_channels', 'num_channels'):
        if name in widths and widths[name] % groups:
            raise ConfigError(
                f'pruned_shapes[{where!r}]: {name}={widths[name]} is not a '
                f'multiple of its {groups} groups.')
    shapes = _tensor_shapes(module, widths)
    for kind in ('_parameters', '_buffers'):
        tensors = getattr(module, kind)
        for name, tensor in tensors.items():
            if tensor is None or tensor.dim() == 0:
                continue  # e.g. BatchNorm's num_batches_tracked
            if name not in shapes:
                raise ConfigError(
                    f'pruned_shapes[{where!r}]: the {type(module).__name__} '
                    f'has a tensor {name!r} that gc_mm cannot resize.')
            cut = tensor.data[tuple(slice(0, n) for n in shapes[name])]
            cut = cut.clone()
            tensors[name] = (nn.Parameter(cut, tensor.requires_grad)
                             if isinstance(tensor, nn.Parameter) else cut)
    for name, value in widths.items():
        setattr(module, name, value)


def apply_widths(model: nn.Module, pruned_shapes: dict) -> nn.Module:
    """Resize the modules ``pruned_shapes`` names (see :func:`resize_`)."""
    modules = dict(model.named_modules())
    for name, widths in pruned_shapes.items():
        if name not in modules:
            raise ConfigError(
                f'pruned_shapes names {name!r}, which is not a module of '
                f'the {type(model).__name__} of this config.')
        resize_(modules[name], dict(widths), name)
    return model


@MODELS.register_module(name='PrunedModel')
def build_pruned_model(pruned_type, pruned_shapes: dict,
                       **model) -> nn.Module:
    """Build ``dict(type=pruned_type, **model)``, then give it the widths of
    ``pruned_shapes`` ({module name: widths}); the result is that model (a
    detector), pruned. Registered as ``PrunedModel`` (see this module's
    docstring)."""
    if not isinstance(pruned_shapes, dict):
        raise ConfigError('model.pruned_shapes must be a dict of '
                          '{module name: widths}.')
    with torch.no_grad():
        return apply_widths(MODELS.build(dict(type=pruned_type, **model)),
                            pruned_shapes)


def unpruned_config(model_cfg: dict) -> tuple:
    """(the model config before pruning, its pruned_shapes) of a model
    config, pruned (``PrunedModel``) or not ({})."""
    model_cfg = dict(model_cfg)
    if model_cfg.get('type') != 'PrunedModel':
        return model_cfg, {}
    model_cfg.pop('type')
    shapes = dict(model_cfg.pop('pruned_shapes'))
    return dict(type=model_cfg.pop('pruned_type'), **model_cfg), shapes


def pruned_config(model_cfg: dict, pruned_shapes: dict) -> dict:
    """The ``PrunedModel`` config of an unpruned model config."""
    model_cfg = dict(model_cfg)
    return dict(type='PrunedModel', pruned_type=model_cfg.pop('type'),
                pruned_shapes=pruned_shapes, **model_cfg)


def build_detector(cfg):
    """The model of config ``cfg`` (no pretrained weights fetched: the
    backbone's ``init_cfg`` is dropped, as ``mmdet.apis.init_detector``
    does), in eval mode."""
    import copy

    from mmengine.registry import init_default_scope
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    model_cfg = copy.deepcopy(cfg.model)
    if 'init_cfg' in model_cfg.get('backbone', {}):
        model_cfg.backbone.init_cfg = None
    return MODELS.build(model_cfg).eval()


def load_weights(model: nn.Module, path: str, what: str = 'CHECKPOINT'):
    """Load the weights of checkpoint ``path`` into ``model`` with strict
    keys and shapes (``torch.load(weights_only=True)``); a checkpoint that
    does not fit is refused in one line naming what differs. Returns the
    loaded checkpoint (a dict)."""
    from ..checks import check_checkpoint_file
    check_checkpoint_file(path, what)
    checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    state = checkpoint.get('state_dict') if isinstance(checkpoint,
                                                       dict) else None
    if not isinstance(state, dict) or not state:
        raise ConfigError(f'{what}: {path!r} has no state_dict (not a '
                          'checkpoint of MMEngine?).')
    state = {key[len('module.'):] if key.startswith('module.') else key: value
             for key, value in state.items()}
    own = model.state_dict()
    problems = []
    shapes = [f'{key} {list(value.shape)} (model {list(own[key].shape)})'
              for key, value in state.items()
              if key in own and value.shape != own[key].shape]
    missing = [key for key in own if key not in state]
    unexpected = [key for key in state if key not in own]
    for kind, keys in (('shapes', shapes), ('missing', missing),
                       ('unexpected', unexpected)):
        if keys:
            problems.append(f'{kind}: {", ".join(keys[:3])}' + (
                f' and {len(keys) - 3} more' if len(keys) > 3 else ''))
    if problems:
        raise ConfigError(f'{what}: {path!r} does not fit the model of the '
                          f'config ({"; ".join(problems)}).')
    model.load_state_dict(state, strict=True)
    return checkpoint
