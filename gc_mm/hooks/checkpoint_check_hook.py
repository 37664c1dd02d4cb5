"""CheckpointCheckHook: check what a loaded checkpoint holds before it is
used."""
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from ..checks import check_loaded_checkpoint


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
