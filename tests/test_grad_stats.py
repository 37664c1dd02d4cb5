"""GradStatsHook on a real mmengine Runner and on a real tools/train.py run:
its numbers against a hand computation on the same gradients."""
import glob
import json
import os
import os.path as osp
import pathlib

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch.utils.data import Dataset

import gc_mm  # noqa: F401  (registers the hook, optimizers and wrappers)
from conftest import REPO, needs_cpu_amp, run_tool
from gc_mm.hooks import GradStatsHook

DEMO = osp.join(REPO, 'configs/demo/mask_rcnn_r18_fpn_gc_shapes.py')
TRAIN = osp.join(REPO, 'tools/train.py')
LR, MAX_NORM = 0.1, 0.5


class Pairs(Dataset):

    def __init__(self, n=12):
        generator = torch.Generator().manual_seed(0)
        self.inputs = torch.randn(n, 3, 6, 6, generator=generator)
        self.targets = torch.randn(n, 5, generator=generator)

    def __len__(self):
        return len(self.inputs)

    def __getitem__(self, index):
        return dict(inputs=self.inputs[index], target=self.targets[index])


class Tiny(BaseModel):
    """conv -> fc; ``train_step`` is mmengine's update_params written out,
    so that the test keeps the gradients each real update starts from."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 16, 5)
        self.updates = []  # (iteration, {name: gradient}) per real update
        self.weights = []  # the weights after each real update
        self.iteration = 0

    def forward(self, inputs, target=None, mode='loss'):
        out = self.fc(torch.relu(self.conv(inputs)).flatten(1))
        # A non-zero-mean target gives gradients with large row means.
        return dict(loss=((out - target - 1)**2).mean())

    def train_step(self, data, optim_wrapper):
        self.iteration += 1
        with optim_wrapper.optim_context(self):
            data = self.data_preprocessor(data, True)
            losses = self._run_forward(data, mode='loss')
        loss, log_vars = self.parse_losses(losses)
        optim_wrapper.backward(optim_wrapper.scale_loss(loss))
        if optim_wrapper.should_update():
            self.updates.append((self.iteration, {
                name: p.grad.clone() for name, p in self.named_parameters()
            }))
            optim_wrapper.step()
            optim_wrapper.zero_grad()
            self.weights.append({
                name: p.detach().clone()
                for name, p in self.named_parameters()
            })
        return log_vars


def train(tmp_path, optim_wrapper, hook, max_iters=4, launcher='none',
          visualizer=None):
    model = Tiny()
    runner = Runner(
        model=model, work_dir=str(tmp_path),
        # mmengine shares the logger and visualizer of runners with one
        # name: two runs within a second would write into one work_dir.
        experiment_name=tmp_path.name,
        train_dataloader=dict(
            dataset=Pairs(), batch_size=2, num_workers=0,
            sampler=dict(type='DefaultSampler', shuffle=False),
            collate_fn=dict(type='default_collate')),
        optim_wrapper=optim_wrapper,
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        custom_hooks=[hook],
        default_hooks=dict(logger=dict(type='LoggerHook', interval=1),
                           checkpoint=None),
        randomness=dict(seed=0), launcher=launcher, visualizer=visualizer,
        # On CPU DDP takes no device_ids (as gc_mm.compat sets for tools).
        cfg=dict(model_wrapper_cfg=dict(type='MMDistributedDataParallel',
                                        device_ids=None)))
    runner.train()
    return runner, model


def recorded(work_dir):
    """{step: {key: value}} of the grad_stats lines in scalars.json."""
    [path] = glob.glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json'))
    out = {}
    with open(path) as f:
        for line in f:
            entry = json.loads(line)
            stats = {k: v for k, v in entry.items()
                     if k.startswith('grad_stats/')}
            if stats:
                assert entry['step'] not in out
                out[entry['step']] = stats
    return out


def expected(grads, mode, conv_only_fc=False):
    """The hook's numbers, by hand in float64: clip to MAX_NORM, then GC."""
    grads = {n: g.double() for n, g in grads.items()}
    total = torch.cat([g.flatten() for g in grads.values()]).norm()
    scale = min(1.0, MAX_NORM / (float(total) + 1e-6))
    grads = {n: g * scale for n, g in grads.items()}
    out, before, after = {}, [], []
    for name, g in grads.items():
        centralized = g.ndim > (3 if mode == 'conv' else 1)
        rows = g.reshape(g.shape[0], -1)
        p = (rows - rows.mean(1, keepdim=True)).reshape(g.shape) \
            if centralized else g
        before.append(g.flatten())
        after.append(p.flatten())
        if g.ndim > 1:
            out[f'grad_stats/{name}/norm_before'] = float(g.norm())
            out[f'grad_stats/{name}/norm_after'] = float(p.norm())
            out[f'grad_stats/{name}/removed'] = 1 - float(p.norm() / g.norm())
            out[f'grad_stats/{name}/max_abs'] = float(g.abs().max())
            out[f'grad_stats/{name}/row_mean_after'] = float(
                p.reshape(g.shape[0], -1).mean(1).abs().max())
    before, after = torch.cat(before), torch.cat(after)
    out.update({
        'grad_stats/model/norm_before': float(before.norm()),
        'grad_stats/model/norm_after': float(after.norm()),
        'grad_stats/model/removed': 1 - float(after.norm() / before.norm()),
        'grad_stats/model/max_abs': float(before.abs().max())})
    return out, grads


def check(got, want):
    assert got.keys() == want.keys()
    for key, value in want.items():
        if key.endswith('row_mean_after') and abs(value) < 1e-9:
            assert abs(got[key]) < 1e-7, key
        else:
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-9), key


SGD = dict(type='SGD', lr=LR)
CLIP = dict(max_norm=MAX_NORM)
LAYERS = [r'^conv\.weight$', r'^fc\.weight$']


@pytest.mark.parametrize('optim_wrapper, mode', [
    (dict(type='OptimWrapper', optimizer=SGD, clip_grad=CLIP), 'conv_fc'),
    (dict(type='GCOptimWrapper', optimizer=SGD, clip_grad=CLIP), 'conv_fc'),
    (dict(type='OptimWrapper', optimizer=dict(SGD, type='SGD_GC'),
          clip_grad=CLIP), 'conv_fc'),
    (dict(type='OptimWrapper', optimizer=dict(SGD, type='SGD_GCC'),
          clip_grad=CLIP), 'conv'),
], ids=['baseline', 'GCOptimWrapper', 'SGD_GC', 'SGD_GCC'])
def test_stats_match_a_hand_computation(tmp_path, optim_wrapper, mode):
    """Every second iteration, on the clipped gradients of that update, in
    the mode that applies (a baseline: what 'conv_fc' would remove); the
    real gradients are left as they are."""
    runner, model = train(
        tmp_path, optim_wrapper, dict(type='GradStatsHook', interval=2,
                                      layers=LAYERS))
    got = recorded(tmp_path)
    assert sorted(got) == [2, 4]
    updates = dict(model.updates)
    for step in (2, 4):
        want, _ = expected(updates[step], mode)
        check(got[step], want)
        assert got[step]['grad_stats/conv.weight/removed'] > 0.005
        assert got[step]['grad_stats/model/removed'] > 0.001
    if mode == 'conv_fc':
        assert got[2]['grad_stats/fc.weight/removed'] > 0.1
    else:  # fc weights are not centralized
        assert got[2]['grad_stats/fc.weight/removed'] == 0
        assert got[2]['grad_stats/fc.weight/row_mean_after'] > 1e-3
    # The recorded update of iteration 2 moved the weights by the clipped
    # gradients, centralized only where GC applies and only once: the hook
    # changed no gradient.
    applied = (optim_wrapper['type'] == 'GCOptimWrapper'
               or optim_wrapper['optimizer']['type'] != 'SGD')
    _, clipped = expected(updates[2], mode)
    for name, g in clipped.items():
        if applied and g.ndim > (3 if mode == 'conv' else 1):
            rows = g.reshape(g.shape[0], -1)
            g = (rows - rows.mean(1, keepdim=True)).reshape(g.shape)
        torch.testing.assert_close(
            model.weights[1][name].double(),
            model.weights[0][name].double() - LR * g, rtol=1e-5, atol=1e-7)
    hooks = [h for h in runner.hooks if isinstance(h, GradStatsHook)]
    assert len(hooks) == 1
    # Off between records: nothing left registered on the optimizer or
    # the wrapper.
    assert not runner.optim_wrapper.optimizer._optimizer_step_pre_hooks
    assert getattr(runner.optim_wrapper, 'gc_tap', None) is None


def test_tensorboard_backend_gets_the_statistics(tmp_path):
    """With TensorboardVisBackend configured, the event file holds the same
    values as scalars.json, at the same steps."""
    pytest.importorskip('tensorboard')  # gc_mm's tests extra
    from tensorboard.backend.event_processing.event_accumulator import \
        EventAccumulator
    train(tmp_path,
          dict(type='OptimWrapper', optimizer=dict(SGD, type='SGD_GC')),
          dict(type='GradStatsHook', interval=2, layers=LAYERS),
          visualizer=dict(type='Visualizer', name=tmp_path.name,
                          vis_backends=[dict(type='LocalVisBackend'),
                                        dict(type='TensorboardVisBackend')]))
    local = recorded(tmp_path)
    [events] = glob.glob(osp.join(tmp_path, '*', 'vis_data',
                                  'events.out.tfevents.*'))
    board = EventAccumulator(events)
    board.Reload()
    tags = [t for t in board.Tags()['scalars'] if t.startswith('grad_stats/')]
    assert sorted(tags) == sorted(local[2])
    for tag in tags:
        got = {e.step: e.value for e in board.Scalars(tag)}
        assert sorted(got) == [2, 4]
        for step, value in got.items():
            assert value == pytest.approx(local[step][tag], rel=1e-6,
                                          abs=1e-12), tag


@needs_cpu_amp
def test_amp_stats_are_of_the_unscaled_gradients(tmp_path):
    """AmpGCOptimWrapper (CPU bfloat16, loss scale 1024): the statistics are
    of the unscaled, clipped gradients, as the optimizer uses them."""
    _, model = train(
        tmp_path, dict(type='AmpGCOptimWrapper', optimizer=SGD,
                       clip_grad=CLIP, loss_scale=1024.),
        dict(type='GradStatsHook', interval=2, layers=LAYERS))
    got = recorded(tmp_path)
    assert sorted(got) == [2, 4]
    updates = dict(model.updates)
    for step in (2, 4):
        want, _ = expected({n: g / 1024 for n, g in updates[step].items()},
                           'conv_fc')
        check(got[step], want)


class InfAtIteration(Tiny):
    """Tiny whose loss (and so every gradient) is infinite at one
    iteration, as an overflowing float16 forward makes it."""

    def __init__(self, bad_iteration):
        super().__init__()
        self.bad_iteration = bad_iteration

    def forward(self, inputs, target=None, mode='loss'):
        losses = super().forward(inputs, target, mode)
        if self.iteration == self.bad_iteration:
            losses['loss'] = losses['loss'] * float('inf')
        return losses


@needs_cpu_amp
@pytest.mark.parametrize('optimizer, gc_mode', [
    (SGD, 'conv_fc'),  # GC in the wrapper
    (dict(SGD, type='SGD_GC'), None),  # GC in the optimizer (--amp)
], ids=['gc_in_wrapper', 'gc_in_optimizer'])
def test_a_step_the_loss_scaler_skips_is_not_recorded(
        tmp_path, optimizer, gc_mode):
    """AMP on CPU (bfloat16: mmengine's CPU autocast takes no float16),
    interval=2, the gradients infinite at iteration 2: the
    loss scaler skips that update, so nothing is recorded for it (before,
    with GC in the wrapper, NaN statistics were); the hook stays armed and
    records the next real update (iteration 3), then iteration 4."""
    model = InfAtIteration(bad_iteration=2)
    runner = Runner(
        model=model, work_dir=str(tmp_path), experiment_name=tmp_path.name,
        train_dataloader=dict(
            dataset=Pairs(), batch_size=2, num_workers=0,
            sampler=dict(type='DefaultSampler', shuffle=False),
            collate_fn=dict(type='default_collate')),
        optim_wrapper=dict(type='AmpGCOptimWrapper', optimizer=optimizer,
                           gc_mode=gc_mode, clip_grad=CLIP,
                           loss_scale=1024.),
        train_cfg=dict(by_epoch=False, max_iters=4),
        custom_hooks=[dict(type='GradStatsHook', interval=2,
                           layers=LAYERS)],
        default_hooks=dict(logger=dict(type='LoggerHook', interval=1),
                           checkpoint=None),
        randomness=dict(seed=0))
    runner.train()
    updates = dict(model.updates)
    assert not torch.isfinite(updates[2]['conv.weight']).all()
    # The skipped update left the weights as they were.
    assert all(torch.equal(model.weights[1][n], w)
               for n, w in model.weights[0].items())
    got = recorded(tmp_path)
    assert sorted(got) == [3, 4]
    for step in (3, 4):
        want, _ = expected({n: g / 1024 for n, g in updates[step].items()},
                           'conv_fc')
        check(got[step], want)


def test_gradient_accumulation_records_at_real_updates(tmp_path):
    """accumulative_counts=3, interval=2: armed at iterations 2 and 4, taken
    at the updates of iterations 3 and 6, on the accumulated gradients."""
    runner, model = train(
        tmp_path, dict(type='GCOptimWrapper', optimizer=SGD, clip_grad=CLIP,
                       accumulative_counts=3),
        dict(type='GradStatsHook', interval=2, layers=LAYERS), max_iters=6)
    updates = dict(model.updates)
    assert sorted(updates) == [3, 6]
    got = recorded(tmp_path)
    assert sorted(got) == [3, 6]
    for step in (3, 6):
        check(got[step], expected(updates[step], 'conv_fc')[0])
    assert runner.message_hub.get_scalar(
        'grad_stats/model/norm_after').current() == pytest.approx(
            got[6]['grad_stats/model/norm_after'])


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match='interval must be a positive int'):
        GradStatsHook(interval=0)
    with pytest.raises(ValueError, match="layers must be a list of regular"):
        GradStatsHook(layers=['conv('])


def test_a_layers_pattern_that_matches_nothing_is_refused(tmp_path):
    with pytest.raises(ValueError, match="pattern 'head' matches no trained"):
        train(tmp_path, dict(type='OptimWrapper', optimizer=SGD),
              dict(type='GradStatsHook', layers=['conv', 'head']))


def test_demo_run_writes_the_statistics_to_scalars_json(tmp_path):
    """tools/train.py on 12 demo images (3 iterations), interval 2: the
    default layers of Mask R-CNN, at iteration 2 only, post-GC row means
    ~0 (the demo trains with SGD_GC)."""
    pytest.importorskip('mmdet')  # tools/train.py
    config = tmp_path / 'demo_grad_stats.py'
    config.write_text(
        f"_base_ = '{DEMO}'\n"
        "custom_hooks = [dict(type='GradStatsHook', interval=2)]\n")
    work_dir = tmp_path / 'work'
    proc = run_tool([TRAIN, str(config), '--work-dir', str(work_dir),
                     '--cfg-options', 'train_cfg.max_epochs=1',
                     'train_cfg.val_interval=10',
                     'train_dataloader.dataset.indices=12',
                     'randomness.seed=0', 'default_hooks.logger.interval=1'],
                    cwd=tmp_path)
    got = recorded(work_dir)
    assert sorted(got) == [2]
    stats = got[2]
    layers = sorted({key.split('/')[1] for key in stats})
    assert layers == sorted([
        'model', 'backbone.conv1.weight', 'neck.fpn_convs.3.conv.weight',
        'roi_head.bbox_head.shared_fcs.1.weight',
        'roi_head.mask_head.conv_logits.weight'])
    for layer in layers:
        before = stats[f'grad_stats/{layer}/norm_before']
        after = stats[f'grad_stats/{layer}/norm_after']
        assert 0 < after <= before
        assert stats[f'grad_stats/{layer}/removed'] == pytest.approx(
            1 - after / before)
        assert 0 < stats[f'grad_stats/{layer}/max_abs'] <= before
        if layer != 'model':
            assert abs(stats[f'grad_stats/{layer}/row_mean_after']) < 1e-6
    assert 'grad_stats iter 2 (GC): ' in proc.stdout


def _train_on_rank(rank, folder):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE='2')
    torch.distributed.init_process_group(
        'gloo', init_method=f'file://{folder}/rendezvous', rank=rank,
        world_size=2)
    runner, _ = train(
        pathlib.Path(folder) / 'work',
        dict(type='GCOptimWrapper', optimizer=SGD, clip_grad=CLIP),
        dict(type='GradStatsHook', interval=1, layers=LAYERS), max_iters=1,
        launcher='pytorch')
    torch.save(dict(
        wrapped=type(runner.model).__name__,
        keys=[k for k in runner.message_hub.log_scalars
              if k.startswith('grad_stats/')]), f'{folder}/rank{rank}.pth')
    torch.distributed.destroy_process_group()


def test_ddp_rank0_records_the_all_reduced_gradients(tmp_path):
    """Two gloo processes: rank 0 records the statistics of the averaged
    gradients (samples 0, 2 on rank 0 and 1, 3 on rank 1); rank 1 does
    nothing."""
    (tmp_path / 'work').mkdir()
    mp.spawn(_train_on_rank, args=(str(tmp_path), ), nprocs=2)
    ranks = [torch.load(tmp_path / f'rank{r}.pth', weights_only=True)
             for r in (0, 1)]
    assert ranks[0]['wrapped'] == 'MMDistributedDataParallel'
    assert ranks[0]['keys'] and not ranks[1]['keys']
    model, data = Tiny(), Pairs()
    grads = []
    for indices in ([0, 2], [1, 3]):
        model.zero_grad()
        model(data.inputs[indices], data.targets[indices])['loss'].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    mean = {n: (grads[0][n] + grads[1][n]) / 2 for n in grads[0]}
    got = recorded(tmp_path / 'work')
    assert sorted(got) == [1]
    check(got[1], expected(mean, 'conv_fc')[0])
