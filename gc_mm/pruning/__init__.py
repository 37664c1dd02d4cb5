"""Filter pruning of detectors, and pruned detectors as configs.

Importing this package registers ``PrunedModel`` (:mod:`.model`), which
rebuilds a pruned detector from its config; that is all a config of a
pruned model needs (``custom_imports = dict(imports=['gc_mm.pruning'])``).
The pruning itself (:mod:`.prune`, with Torch-Pruning) is imported by
``tools/prune.py``.
"""
from .model import (apply_widths, build_pruned_model, changed_widths,
                    model_widths, pruned_config, resize_, unpruned_config)

__all__ = [
    'apply_widths', 'build_pruned_model', 'changed_widths', 'model_widths',
    'pruned_config', 'resize_', 'unpruned_config'
]
