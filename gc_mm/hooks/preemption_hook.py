"""PreemptionHook: a run that Slurm preempts or stops at its time limit
saves where it is and stops, for the requeued job to resume from."""
import os.path as osp
import signal
import sys
from typing import Optional, Sequence

import torch
from mmengine.dist import all_reduce, barrier, get_dist_info
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.registry import HOOKS
from mmengine.runner import EpochBasedTrainLoop

from ..atomic import atomic_write
from .random_state_hook import RandomStateHook, _local_state, _restore

# The exit status of a run stopped by a signal once it saved: sysexits'
# EX_TEMPFAIL, "try again later" (tools/slurm_train.sh requeues the job).
EXIT_PREEMPTED = 75


class _SkipFirstBatches:
    """A train dataloader whose next pass loads its first ``count`` batches
    and leaves them out, then the dataloader it wraps as it is.

    Loaded, not skipped by index: data workers draw their random numbers
    (augmentations) from streams seeded per epoch (RandomStateHook), so a
    batch is the uninterrupted run's only if each worker has processed the
    same samples before it.
    """

    def __init__(self, loader, count: int):
        self.loader = loader
        self.count = count

    def __iter__(self):
        count, self.count = self.count, 0
        if not count:
            return iter(self.loader)
        # The interrupted run drew from this process's generators for these
        # batches (the iterator's base seed, from torch's without workers;
        # random transforms without workers) before its checkpoint, which
        # holds the generators as they were after: draw, then restore them.
        state = _local_state()
        batches = iter(self.loader)
        for _ in range(count):
            next(batches, None)
        _restore(state)
        return batches

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name):
        return getattr(self.loader, name)


@HOOKS.register_module()
class PreemptionHook(Hook):
    """Stop at a signal (Slurm sends SIGUSR1 before preemption or the time
    limit with ``--signal=USR1@120``, and SIGTERM then): every rank finishes
    its current iteration, rank 0 writes an iteration checkpoint (atomically,
    as every checkpoint here) and names it in ``last_checkpoint``, and the
    run exits with status :data:`EXIT_PREEMPTED` (75). ``--resume`` goes on
    from it; a run resumed in the middle of an epoch loads the batches that
    epoch already trained and leaves them out (no forward or backward), so
    it ends as the uninterrupted run.

    The ranks agree on stopping through one all-reduce of a flag per
    iteration (a signal may reach them at different iterations).

    Args:
        signals (sequence of str): the signals that stop the run. Defaults
            to ('SIGUSR1', 'SIGTERM').
    """

    priority = 'VERY_LOW'  # after the iteration's own hooks (checkpoint)

    def __init__(self, signals: Sequence[str] = ('SIGUSR1', 'SIGTERM')):
        for name in signals:
            if not isinstance(getattr(signal, str(name), None),
                              signal.Signals):
                raise ValueError(f'PreemptionHook: {name!r} is not a signal '
                                 "name (e.g. 'SIGUSR1')")
        self.signals = tuple(signals)
        self.received: Optional[int] = None
        self._previous = {}

    def _receive(self, signum, frame) -> None:
        self.received = signum

    def before_train(self, runner) -> None:
        self.received = None
        for name in self.signals:
            signum = getattr(signal, name)
            self._previous[signum] = signal.signal(signum, self._receive)
        self._skip_trained_batches(runner)

    def after_train(self, runner) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    @staticmethod
    def _skip_trained_batches(runner) -> None:
        """In an epoch-based run resumed mid-epoch, leave out the batches of
        the epoch trained before the checkpoint (an iteration-based loop
        skips them itself)."""
        loop = runner.train_loop
        if not isinstance(loop, EpochBasedTrainLoop):
            return
        loader = loop.dataloader
        trained = runner.iter - runner.epoch * len(loader)
        if trained <= 0:
            return
        print_log(f'PreemptionHook: resumed in epoch {runner.epoch + 1} '
                  f'after {trained} of its {len(loader)} iterations; '
                  'loading and leaving out the batches it trained',
                  logger='current')
        loop.dataloader = _SkipFirstBatches(loader, trained)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None,
                         outputs=None) -> None:
        stop = torch.tensor([0. if self.received is None else 1.])
        if get_dist_info()[1] > 1:
            all_reduce(stop, op='max')
        if not stop.item():
            return
        filename = f'iter_{runner.iter + 1}.pth'
        for hook in runner.hooks:
            if isinstance(hook, RandomStateHook):
                hook._gather(runner)  # every rank's generators, now
        runner.save_checkpoint(runner.work_dir, filename, by_epoch=False,
                               save_optimizer=True, save_param_scheduler=True)
        path = osp.join(runner.work_dir, filename)
        if runner.rank == 0:
            atomic_write(osp.join(runner.work_dir, 'last_checkpoint'),
                         lambda f: f.write(path), binary=False)
        barrier()
        name = ('a signal' if self.received is None else
                signal.Signals(self.received).name)
        print_log(f'PreemptionHook: stopped by {name} after iteration '
                  f'{runner.iter + 1}; saved {path} (--resume goes on from '
                  'it)', logger='current')
        self.after_train(runner)  # the signals' handlers as they were
        sys.exit(EXIT_PREEMPTED)
