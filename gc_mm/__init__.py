"""gc_mm: Gradient Centralization for the OpenMMLab stack.

Importing gc_mm registers its optimizers (OPTIMIZERS), optim wrappers
(OPTIM_WRAPPERS), optim-wrapper constructor (OPTIM_WRAPPER_CONSTRUCTORS)
and hooks (HOOKS: RandomStateHook, GradStatsHook, ...) in MMEngine's root
registries, and applies this stack's fixes (:mod:`gc_mm.compat`). Configs
load it with ``custom_imports = dict(imports=['gc_mm'], allow_failed_imports=False)``.
"""
from . import compat
from .centralize import centralize_, check_gc_mode, is_centralized
from .constructor import GCOptimWrapperConstructor
from .hooks import GradStatsHook, RandomStateHook, RIFLEHook
from .msgd import MSGDOptimWrapper
from .optim_wrapper import AmpGCOptimWrapper, GCOptimWrapper
from .optimizers import *  # noqa: F401,F403
from .version import __version__

compat.apply()

__all__ = [
    'centralize_', 'check_gc_mode', 'is_centralized',
    'GCOptimWrapperConstructor', 'GCOptimWrapper', 'AmpGCOptimWrapper',
    'RandomStateHook', 'GradStatsHook', 'RIFLEHook', 'MSGDOptimWrapper',
    '__version__'
]
