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
from mmengine.runner import EpochBasedTrainLoop
from torch.utils.data import get_worker_info


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


# In a data worker: the (seed, epoch, rank) its generators were seeded for.
_worker_seeded_for = None


def _seeded_index(index: int, key: tuple) -> int:
    """Unpickles a :class:`_EpochIndex` in a data worker: seeds the
    worker's generators for the key's epoch, the first time it sees it,
    before the sample is loaded."""
    global _worker_seeded_for
    info = get_worker_info()
    if info is not None and key != _worker_seeded_for:
        _worker_seeded_for = key
        seed, epoch, rank = key
        [value] = np.random.SeedSequence(
            [seed, epoch, rank, info.id]).generate_state(1)
        random.seed(int(value))
        np.random.seed(value)
        torch.manual_seed(int(value))
    return index


class _EpochIndex(int):
    """A sample index that carries (seed, epoch, rank) to the data worker
    it is sent to (unpickled by :func:`_seeded_index`); elsewhere, an
    int."""

    def __new__(cls, index: int, key: tuple):
        obj = super().__new__(cls, index)
        obj.key = key
        return obj

    def __reduce__(self):
        return _seeded_index, (int(self), self.key)


class _EpochSeedingSampler:
    """Yields the indices of ``sampler``, each as an :class:`_EpochIndex`
    of ``epoch`` (set by RandomStateHook before each epoch); everything else
    is ``sampler``'s (``dataset``, ``set_epoch``, ``len``)."""

    def __init__(self, sampler, seed: int, rank: int):
        self.sampler = sampler
        self.seed = seed
        self.rank = rank
        self.epoch = 0

    def __iter__(self):
        key = (self.seed, self.epoch, self.rank)
        for index in self.sampler:
            yield _EpochIndex(index, key)

    def __len__(self) -> int:
        return len(self.sampler)

    def __getattr__(self, name):
        if name == 'sampler':  # not set yet (a copy being made)
            raise AttributeError(name)
        return getattr(self.sampler, name)


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

    Validation gives the generators back as it found them (states taken in
    ``before_val``, restored in ``after_val``; a checkpoint saved during it,
    e.g. the best one, holds those): it draws from them (each new val
    dataloader iterator takes a base seed from torch's generator), and a
    run resumed from the checkpoint saved before a validation skips that
    validation. So training draws the same numbers however often it
    validates, and resumes bit-equal to the uninterrupted run.

    Data workers (epoch-based training, ``num_workers > 0``) live in other
    processes, whose generators a checkpoint cannot hold; a persistent
    worker would carry its streams from epoch to epoch, which a resumed
    run's new workers cannot continue. So each worker seeds its generators
    (python, numpy, torch) at the start of every epoch from (seed, epoch,
    rank, worker id), whether persistent or not (without this, MMEngine
    seeds non-persistent workers alike in every epoch): the train sampler's
    indices carry them to the worker. The train loader then draws its base
    seed from a generator of its own, not from torch's global one, which a
    persistent loader would draw from only in its first epoch.

    Checkpoint layout: ``random_state = dict(ranks=[state of rank 0, ...])``.
    """

    priority = 'LOW'  # before CheckpointHook (VERY_LOW) in the same stage

    def __init__(self):
        self._gathered = None  # (runner.iter, [state of each rank])
        self._before_val = None  # this process's states, during validation
        self._sampler = None  # the train sampler's _EpochSeedingSampler

    def _state(self) -> dict:
        """The states training continues from."""
        return self._before_val or _local_state()

    def _gather(self, runner) -> None:
        world_size = get_dist_info()[1]
        if world_size == 1:
            return
        states = [None] * world_size
        dist.all_gather_object(states, self._state())
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

    def before_train(self, runner) -> None:
        loader = runner.train_loop.dataloader
        batch_sampler = getattr(loader, 'batch_sampler', None)
        self._sampler = None
        if (not isinstance(runner.train_loop, EpochBasedTrainLoop)
                or loader.num_workers == 0 or batch_sampler is None):
            return
        # An iteration-based loop starts its workers when it is built, and
        # a resumed one loads (not skips) the batches before its iteration.
        self._sampler = _EpochSeedingSampler(batch_sampler.sampler,
                                             runner.seed, get_dist_info()[0])
        batch_sampler.sampler = self._sampler
        loader.generator = torch.Generator().manual_seed(runner.seed)

    def before_train_epoch(self, runner) -> None:
        if self._sampler is not None:
            self._sampler.epoch = runner.epoch

    def before_val(self, runner) -> None:
        self._before_val = _local_state()

    def after_val_epoch(self, runner, metrics=None) -> None:
        self._gather(runner)  # CheckpointHook may save the best one now

    def after_val(self, runner) -> None:
        if self._before_val is not None:
            _restore(self._before_val)
            self._before_val = None

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        world_size = get_dist_info()[1]
        if world_size == 1:
            ranks = [self._state()]
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
