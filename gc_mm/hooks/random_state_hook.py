"""RandomStateHook: the generators' states in each checkpoint, so that
``--resume`` continues exactly where training stopped."""
import logging
import random

import numpy as np
import torch
import torch.distributed as dist
from mmengine.dist import get_dist_info
from mmengine.hooks import CheckpointHook, Hook
from mmengine.logging import print_log
from mmengine.registry import HOOKS


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
