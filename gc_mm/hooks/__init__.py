"""Hooks the tools add to every run, one module each.

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
- :class:`PreemptionHook` saves an iteration checkpoint and stops when
  Slurm signals a preemption or the time limit (SIGUSR1, SIGTERM), for the
  requeued job to resume from.
"""
from .checkpoint_check_hook import CheckpointCheckHook
from .grad_stats_hook import GradStatsHook
from .preemption_hook import EXIT_PREEMPTED, PreemptionHook
from .random_state_hook import RandomStateHook
from .rifle_hook import (RIFLE_DEFAULT_LAYERS, RIFLEHook, _initializer,
                         _reinitialize)
from .slow_weights_hook import SlowWeightsHook
from .utils import compile_layers

__all__ = [
    'RandomStateHook', 'CheckpointCheckHook', 'GradStatsHook', 'RIFLEHook',
    'SlowWeightsHook', 'RIFLE_DEFAULT_LAYERS', 'compile_layers',
    'PreemptionHook', 'EXIT_PREEMPTED'
]
