"""PreemptionHook: a signal in the middle of an epoch (SIGUSR1, as Slurm
sends before preemption or the time limit, or SIGTERM) stops the run after
its current iteration with an iteration checkpoint; the run resumed from it
ends with the uninterrupted run's weights, on one process and on two gloo
ranks of which only one got the signal."""
import os
import os.path as osp
import signal

import pytest
import torch
import torch.multiprocessing as mp
from mmengine.hooks import Hook
from mmengine.runner import Runner

import gc_mm  # noqa: F401  (registers the hooks and GC optimizers)
from gc_mm.hooks import EXIT_PREEMPTED, PreemptionHook, RandomStateHook
from test_grad_stats import Pairs, Tiny

class RandomTiny(Tiny):
    """Tiny whose loss draws from torch's generator, as a detector's
    samplers do: a resumed run must continue its stream."""

    def forward(self, inputs, target=None, mode='loss'):
        losses = super().forward(inputs, target, mode)
        return dict(loss=losses['loss'] * (1 + torch.rand(())))


STOP_AFTER = 4  # a signal after 4 iterations, mid-epoch


class SignalAt(Hook):
    """Sends ``signum`` to this process after iteration ``iteration`` (on
    the ranks ``ranks``), as Slurm would at any time."""

    def __init__(self, iteration, signum, ranks=(0, )):
        self.iteration, self.signum, self.ranks = iteration, signum, ranks

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        if runner.iter + 1 == self.iteration and runner.rank in self.ranks:
            os.kill(os.getpid(), self.signum)


def run(work_dir, name, hooks=(), resume=False, launcher='none',
        workers=0):
    runner = Runner(
        model=RandomTiny(), work_dir=str(work_dir), experiment_name=name,
        train_dataloader=dict(
            dataset=Pairs(), batch_size=2, num_workers=workers,
            persistent_workers=workers > 0,
            sampler=dict(type='DefaultSampler', shuffle=True),
            collate_fn=dict(type='default_collate')),
        optim_wrapper=dict(optimizer=dict(type='SGD_GC', lr=0.05,
                                          momentum=0.9)),
        param_scheduler=dict(type='MultiStepLR', milestones=[1],
                             by_epoch=True),
        train_cfg=dict(by_epoch=True, max_epochs=2),
        custom_hooks=[RandomStateHook(), PreemptionHook(), *hooks],
        default_hooks=dict(checkpoint=None), randomness=dict(seed=0),
        resume=resume, launcher=launcher,
        cfg=dict(model_wrapper_cfg=dict(type='MMDistributedDataParallel',
                                        device_ids=None)))
    runner.train()
    return {n: p.detach().clone()
            for n, p in runner.model.named_parameters()}


def weights_after(work_dir, signum, name, launcher='none', ranks=(0, ),
                  workers=0):
    """Train with a signal after STOP_AFTER iterations, then resume."""
    with pytest.raises(SystemExit) as stopped:
        run(work_dir, f'{name}_stopped',
            [SignalAt(STOP_AFTER, signum, ranks)], launcher=launcher,
            workers=workers)
    assert stopped.value.code == EXIT_PREEMPTED
    checkpoint = osp.join(work_dir, f'iter_{STOP_AFTER}.pth')
    with open(osp.join(work_dir, 'last_checkpoint')) as f:
        assert f.read() == checkpoint
    meta = torch.load(checkpoint, weights_only=True)['meta']
    # 12 samples, batches of 2 per rank: mid-epoch 1 on one process (6
    # iterations per epoch), mid-epoch 2 on two (3).
    world_size = 2 if launcher == 'pytorch' else 1
    assert (meta['epoch'], meta['iter']) == (world_size - 1, STOP_AFTER)
    return run(work_dir, f'{name}_resumed', resume=True, launcher=launcher,
               workers=workers)


@pytest.mark.parametrize('signum,workers', [(signal.SIGUSR1, 0),
                                            (signal.SIGTERM, 2)])
def test_a_signal_mid_epoch_saves_and_the_resumed_run_ends_equal(
        tmp_path, signum, workers):
    """Without data workers and with two persistent ones; the model draws
    from torch's generator every iteration."""
    straight = run(tmp_path / 'straight', 'straight', workers=workers)
    resumed = weights_after(tmp_path / 'stopped', signum, signum.name,
                            workers=workers)
    for name, weight in straight.items():
        torch.testing.assert_close(resumed[name], weight, rtol=0, atol=0,
                                   msg=name)
    # The signal's default action is back after the run.
    assert signal.getsignal(signum) == signal.SIG_DFL


def _on_rank(rank, folder):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE='2')
    torch.distributed.init_process_group(
        'gloo', init_method=f'file://{folder}/rendezvous', rank=rank,
        world_size=2)
    straight = run(osp.join(folder, 'straight'), 'straight',
                   launcher='pytorch')
    resumed = weights_after(osp.join(folder, 'stopped'), signal.SIGUSR1,
                            'two', launcher='pytorch', ranks=(1, ))
    torch.save(dict(straight=straight, resumed=resumed),
               osp.join(folder, f'rank{rank}.pth'))
    torch.distributed.destroy_process_group()


def test_two_ranks_stop_together_when_one_gets_the_signal(tmp_path):
    mp.spawn(_on_rank, args=(str(tmp_path), ), nprocs=2)
    for rank in (0, 1):
        result = torch.load(tmp_path / f'rank{rank}.pth', weights_only=True)
        for name, weight in result['straight'].items():
            torch.testing.assert_close(result['resumed'][name], weight,
                                       rtol=0, atol=0, msg=name)
