"""Structured filter pruning of an MMDetection detector, with Torch-Pruning
(https://github.com/VainF/Torch-Pruning) for the dependency analysis.

Torch-Pruning traces the model's autograd graph and groups the channels that
must go together: a residual stream and every convolution reading or
adding to it, a convolution with its BatchNorm or GroupNorm, grouped
convolutions (ResNeXt: the same share of every group), FPN's lateral
convolutions (added together top-down), and the next layer's input
channels. :func:`prune_detector` traces what is sound to trace:

- the backbone and the neck, on a dummy image (``extract_feat``);
- the RPN head, on features shaped as the neck's;
- the RoI heads of a ``StandardRoIHead`` (Faster and Mask R-CNN), each on
  RoI features its extractor gives (computed without the graph, since
  RoIAlign is not a channel map Torch-Pruning knows).

Each part's outputs keep their channels: the layers that produce them (the
FPN output convolutions, the classifiers and regressors, the mask logits)
keep every filter, so the parts still fit together (FPN's ``out_channels``
is the heads' ``in_channels``) and the predictions keep their meaning.
Layers outside the traced graph are never changed (a ``CascadeRoIHead``'s
heads, a ``shared_head``).
"""
import fnmatch

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.pruner import function

from ..checks import ConfigError
from .model import changed_widths, model_widths

METHODS = ('l1', 'l2', 'fpgm')
PARTS = ('backbone', 'neck', 'rpn_head', 'roi_head')


class FPGMImportance(tp.importance.GroupMagnitudeImportance):
    """FPGM (He et al., "Filter Pruning via Geometric Median", CVPR 2019):
    a filter matters less the closer it is to the geometric median of its
    layer's filters, so its importance is the sum of its Euclidean
    distances to the layer's other filters; averaged over the layers of the
    channel's group whose filters (output channels) it indexes, then
    divided by the group's mean (for ``--global``). Torch-Pruning's own
    FPGMImportance (1.6) measures distances between ``|w|**2`` and fails on
    the input channels of grouped convolutions (ResNeXt)."""

    def __init__(self):
        super().__init__(p=2, group_reduction='mean', normalizer='mean')

    @torch.no_grad()
    def __call__(self, group):
        scores, indices = [], []
        for item in group:
            dep, idxs = item
            if dep.pruning_fn not in (function.prune_conv_out_channels,
                                      function.prune_linear_out_channels):
                continue
            weight = dep.layer.weight.data
            if getattr(dep.layer, 'transposed', False):
                weight = weight.transpose(0, 1)
            filters = weight[idxs].flatten(1)
            scores.append(torch.cdist(filters[None], filters[None])[0].sum(0))
            indices.append(item.root_idxs)
        if not scores:
            return None
        return self._normalize(self._reduce(scores, indices), self.normalizer)


def importance(method: str):
    """The importance of ``method``: the L1 or L2 norm of each filter (Li
    et al., ICLR 2017; Torch-Pruning's MagnitudeImportance), averaged over
    the channel's group (the filters, the next layers' input weights and
    the norms' scales the channel has) and divided by the group's mean; or
    :class:`FPGMImportance`."""
    if method == 'l1':
        return tp.importance.MagnitudeImportance(p=1)
    if method == 'l2':
        return tp.importance.MagnitudeImportance(p=2)
    if method == 'fpgm':
        return FPGMImportance()
    raise ConfigError(f'--method {method!r}: choose one of {METHODS}.')


def _standard_roi_head(roi_head) -> bool:
    """Whether ``roi_head`` has one bbox head (and at most one mask head)
    fed by RoI extractors, as StandardRoIHead: the heads traced."""
    return (isinstance(getattr(roi_head, 'bbox_head', None), nn.Module)
            and not isinstance(roi_head.bbox_head, nn.ModuleList)
            and hasattr(roi_head, 'bbox_roi_extractor'))


def trace_outputs(model, image: torch.Tensor) -> list:
    """The outputs of each traced part of ``model`` (see the module's
    docstring); heads start from fresh tensors, so the graph of each head
    starts at its input."""
    feats = list(model.extract_feat(image))
    outputs = list(feats)
    inputs = [feat.detach() for feat in feats]
    if getattr(model, 'rpn_head', None) is not None:
        cls_scores, bbox_preds = model.rpn_head(inputs[:1])
        outputs += cls_scores + bbox_preds
    roi_head = getattr(model, 'roi_head', None)
    if roi_head is not None and _standard_roi_head(roi_head):
        rois = image.new_tensor([[0., 0., 0., 32., 32.]])
        with torch.no_grad():
            extractor = roi_head.bbox_roi_extractor
            bbox_feats = extractor(inputs[:extractor.num_inputs], rois)
            if getattr(roi_head, 'with_shared_head', False):
                bbox_feats = roi_head.shared_head(bbox_feats)
        outputs += _tensors(roi_head.bbox_head(bbox_feats))
        if getattr(roi_head, 'with_mask', False):
            with torch.no_grad():
                extractor = (roi_head.bbox_roi_extractor
                             if roi_head.share_roi_extractor else
                             roi_head.mask_roi_extractor)
                mask_feats = extractor(inputs[:extractor.num_inputs], rois)
                if getattr(roi_head, 'with_shared_head', False):
                    mask_feats = roi_head.shared_head(mask_feats)
            outputs += _tensors(roi_head.mask_head(mask_feats))
    return [out for out in outputs if out.grad_fn is not None]


def _tensors(value) -> list:
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


def output_layers(model, image: torch.Tensor) -> list:
    """The names of the layers (convolutions, linears) whose filters are
    the traced parts' output channels: walking back from each output
    through the autograd graph to the first such layer on every path."""
    producers, hooks = {}, []

    def record(module, inputs, output):
        producers[output.grad_fn] = module

    names = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            names[module] = name
            hooks.append(module.register_forward_hook(record))
    try:
        outputs = trace_outputs(model, image)
    finally:
        for hook in hooks:
            hook.remove()
    found, seen = set(), set()
    stack = [out.grad_fn for out in outputs]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node in producers:
            found.add(names[producers[node]])
            continue
        stack += [child for child, _ in node.next_functions]
    return sorted(found)


def match_patterns(model, patterns, what: str) -> list:
    """The modules whose names match the glob ``patterns``; a pattern that
    matches none is refused, naming the top-level modules."""
    names = [name for name, _ in model.named_modules() if name]
    matched = []
    for pattern in patterns:
        hits = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
        if not hits:
            tops = ', '.join(name for name, _ in model.named_children())
            raise ConfigError(
                f'{what} {pattern!r} matches no module of the model (its '
                f'modules are named like backbone.layer1.0.conv1; top '
                f'level: {tops}).')
        matched += hits
    return matched


def prune_detector(model, ratio: float, method: str = 'l1',
                   global_pruning: bool = False, keep=(), scope=PARTS,
                   image_size=(128, 128)) -> dict:
    """Remove ``ratio`` of the prunable filters of ``model`` (in place).

    Args:
        model: an MMDetection detector (its weights loaded).
        ratio (float): the share of filters removed, in (0, 1): of each
            channel group (per-layer), or of all groups together, ranked
            by importance across layers (``global_pruning``).
        method (str): ``'l1'``, ``'l2'`` or ``'fpgm'`` (:func:`importance`).
        keep: glob patterns of module names whose filters are all kept
            (e.g. ``'backbone.conv1'``, ``'backbone.layer4*'``,
            ``'roi_head*'``); the input channels of a kept layer still follow
            the layer before it.
        scope: the parts whose filters may be pruned (of :data:`PARTS`).
        image_size: (h, w) of the dummy image traced.

    Returns:
        dict: ``widths`` ({module name: widths} of the changed modules, as
        :func:`gc_mm.pruning.model.changed_widths`), ``kept`` (the layers
        kept for being outputs), ``params`` (before, after).
    """
    if not 0 < ratio < 1:
        raise ConfigError(f'--ratio {ratio}: must be in (0, 1), the share '
                          'of filters removed.')
    unknown = sorted(set(scope) - set(PARTS))
    if unknown:
        raise ConfigError(f'--scope {", ".join(unknown)}: the parts are '
                          f'{", ".join(PARTS)}.')
    kept_names = match_patterns(model, keep, '--keep')
    kept_names += [part for part in PARTS
                   if part not in scope and hasattr(model, part)]
    model.eval()
    image = torch.zeros(1, 3, *image_size)
    outputs = output_layers(model, image)
    modules = dict(model.named_modules())
    ignored = [modules[name] for name in kept_names + outputs]
    before = model_widths(model)
    params_before = sum(p.numel() for p in model.parameters())
    pruner = tp.pruner.BasePruner(
        model, image, importance=importance(method),
        global_pruning=global_pruning, pruning_ratio=ratio,
        ignored_layers=ignored, forward_fn=trace_outputs)
    with torch.no_grad():
        pruner.step()
    widths = changed_widths(model, before)
    if not widths:
        raise ConfigError('nothing was pruned: every filter is kept '
                          '(--keep, --scope) or the ratio removes none.')
    return dict(widths=widths, kept=outputs,
                params=(params_before,
                        sum(p.numel() for p in model.parameters())))
