"""Helpers the hooks share."""
import re
from typing import Optional

from mmengine.optim import OptimWrapper, OptimWrapperDict


def unwrap_model(model):
    """The model inside a distributed wrapper (DDP), or the model."""
    return model.module if hasattr(model, 'module') else model


def optim_wrappers(runner) -> list:
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
