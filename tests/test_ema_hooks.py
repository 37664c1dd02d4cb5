"""gc_mm's hooks in one run with MMEngine's EMAHook (and mmdet's
ExpMomentumEMA, as RTMDet's and YOLOX's configs use it), in a real runner:
the run trains exactly as without validation, validates, tests and saves
the EMA's weights, and resumes to the same numbers."""
import os.path as osp

import pytest
import torch
from mmengine.hooks import EMAHook, Hook
from mmengine.registry import HOOKS
from mmengine.runner import Runner

import gc_mm  # noqa: F401  (registers the optimizers and hooks)
from test_lookahead import ToyModel, toy_data  # (registers ToyCount)
from test_tools import checkpoint

LOOKAHEAD = dict(type='Lookahead', k=5, alpha=0.5,
                 optimizer=dict(type='SGD', lr=0.1, momentum=0.9))
EMA = dict(type='EMAHook', momentum=0.5)


def _ema_hook(runner):
    hooks = [h for h in runner.hooks if isinstance(h, EMAHook)]
    return hooks[0] if hooks else None


@HOOKS.register_module(force=True)
class EpochRecordHook(Hook):
    """After each epoch (and after EMAHook's update): the model's weights,
    the EMA's and Lookahead's slow ones."""

    priority = 'LOWEST'

    def __init__(self):
        self.records = []

    def after_train_epoch(self, runner):
        optimizer = runner.optim_wrapper.optimizer
        weight = runner.model.linear.weight
        slow = optimizer.state.get(weight, {}).get('slow_weight')
        ema = _ema_hook(runner)
        self.records.append(dict(
            epoch=runner.epoch,
            model=weight.detach().clone(),
            ema=ema and ema.ema_model.module.linear.weight.detach().clone(),
            slow=None if slow is None else slow.clone()))


def _records(runner):
    [hook] = [h for h in runner.hooks if isinstance(h, EpochRecordHook)]
    return hook.records


def ema_runner(work_dir, hooks, optimizer=LOOKAHEAD, max_epochs=3,
               val_interval=1, resume_from=None):
    loader = dict(dataset=toy_data(), batch_size=2, num_workers=0,
                  sampler=dict(type='DefaultSampler', shuffle=False),
                  collate_fn=dict(type='default_collate'))
    return Runner(
        model=ToyModel(), work_dir=str(work_dir),
        experiment_name=osp.basename(str(work_dir)),
        train_dataloader=loader, val_dataloader=loader,
        test_dataloader=loader, val_evaluator=dict(type='ToyCount'),
        test_evaluator=dict(type='ToyCount'),
        train_cfg=dict(by_epoch=True, max_epochs=max_epochs,
                       val_interval=val_interval),
        val_cfg=dict(), test_cfg=dict(),
        optim_wrapper=dict(optimizer=optimizer),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook',
                                           interval=1)),
        custom_hooks=[*hooks, dict(type='EpochRecordHook')],
        load_from=resume_from, resume=resume_from is not None,
        default_scope='mmengine')


def assert_records_equal(got, want):
    assert [r['epoch'] for r in got] == [r['epoch'] for r in want]
    for a, b in zip(got, want):
        for key in ('model', 'ema', 'slow'):
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0,
                                       msg=f'{key} after epoch {a["epoch"]}')


EMA_TYPES = [
    dict(),
    pytest.param(dict(ema_type='mmdet.ExpMomentumEMA', momentum=0.5,
                      gamma=4, update_buffers=True, priority=49),
                 id='ExpMomentumEMA'),
]


@pytest.mark.parametrize('ema', EMA_TYPES)
def test_lookahead_and_ema_train_as_without_validation_and_resume_equal(
        tmp_path, ema):
    """Lookahead with SlowWeightsHook (as tools/train.py adds it) and an
    EMAHook: three epochs of two steps (k=5), validating every epoch, end
    bit-equal to the run without validation (the model keeps the fast
    weights, the EMA averages them, the slow weights are Lookahead's);
    each validation sees the EMA's weights (and a test: SlowWeightsHook
    steps aside), the
    checkpoints hold them as the model and the fast ones as EMAHook's
    copy, and a run resumed from epoch 1 ends bit-equal."""
    if ema:
        pytest.importorskip('mmdet')
        import mmdet.models.layers  # noqa: F401  (registers ExpMomentumEMA)
    hooks = [dict(EMA, **ema), dict(type='SlowWeightsHook')]
    quiet = ema_runner(tmp_path / 'quiet', hooks, val_interval=10)
    quiet.train()
    runner = ema_runner(tmp_path / 'validated', hooks)
    runner.train()
    want, got = _records(quiet), _records(runner)
    assert_records_equal(got, want)
    # The three weights differ: the test can tell which one is seen.
    last = want[-1]
    assert not torch.equal(last['ema'], last['model'])
    assert not torch.equal(last['ema'], last['slow'])
    assert not torch.equal(last['slow'], last['model'])

    seen = runner.model.predicted_with  # two batches per validation
    assert len(seen) == 6
    for index, record in enumerate(want):
        for batch in seen[2 * index:2 * index + 2]:
            assert torch.equal(batch, record['ema']), index
    # A test swaps the EMA in by EMAHook alone. (runner.test() in the same
    # process would rebuild the EMA from the model: EMAHook.before_run.)
    [slow_hook] = [h for h in runner.hooks if type(h).__name__ ==
                   'SlowWeightsHook']
    slow_hook.before_test_epoch(runner)
    assert torch.equal(runner.model.linear.weight.detach(), last['model'])

    for index, record in enumerate(want, start=1):
        ckpt = checkpoint(osp.join(runner.work_dir, f'epoch_{index}.pth'))
        assert torch.equal(ckpt['state_dict']['linear.weight'], record['ema'])
        assert torch.equal(ckpt['ema_state_dict']['module.linear.weight'],
                           record['model'])
        assert 'lookahead_fast_weights' not in ckpt

    resumed = ema_runner(tmp_path / 'resumed', hooks,
                         resume_from=osp.join(runner.work_dir,
                                              'epoch_1.pth'))
    resumed.train()
    assert_records_equal(_records(resumed), want[1:])
    assert torch.equal(resumed.model.predicted_with[-1], last['ema'])


def test_without_ema_the_slow_weights_are_still_validated(tmp_path):
    """The other side of the rule: with no EMAHook in the run,
    SlowWeightsHook validates the slow weights."""
    runner = ema_runner(tmp_path / 'slow', [dict(type='SlowWeightsHook')],
                        max_epochs=2)
    runner.train()
    slow = runner.optim_wrapper.optimizer.state[
        runner.model.linear.weight]['slow_weight']
    assert torch.equal(runner.model.predicted_with[-1], slow)


@HOOKS.register_module(force=True)
class FreshWeightsHook(Hook):
    """After RIFLEHook (NORMAL) in before_train_iter: the weights it drew;
    after each step: the model's weights."""

    priority = 'BELOW_NORMAL'

    def __init__(self):
        self.before = {}
        self.after = {}

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        self.before[runner.iter] = runner.model.linear.weight.detach().clone()

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        self.after[runner.iter] = runner.model.linear.weight.detach().clone()


def test_rifle_restarts_the_ema_of_the_layers_it_reinitializes(tmp_path):
    """RIFLE's re-init at epoch 1 gives the layer new weights; the EMA of
    that layer restarts from them (as its optimizer state does), instead of
    averaging the old layer into the new one: after the re-init at
    iteration 2, EMAHook's copy is the re-init's weights averaged with the
    two steps after it (momentum 0.5)."""
    hooks = [dict(EMA), dict(type='RIFLEHook', num_reinits=1,
                             layers=[r'^linear$']),
             dict(type='FreshWeightsHook')]
    runner = ema_runner(tmp_path / 'rifle', hooks,
                        optimizer=dict(type='SGD', lr=0.1, momentum=0.9),
                        max_epochs=2)
    runner.train()
    [fresh] = [h for h in runner.hooks if isinstance(h, FreshWeightsHook)]
    reinit = fresh.before[2]
    assert not torch.equal(reinit, fresh.after[1])  # a re-init happened
    want = reinit.lerp(fresh.after[2], 0.5).lerp(fresh.after[3], 0.5)
    got = _ema_hook(runner).ema_model.module.linear.weight.detach()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
