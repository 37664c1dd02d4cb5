"""RIFLEHook: re-inits at the planned iterations only, of the selected
layers only, as the model's init makes them, with their optimizer state
dropped; resumed runs do not repeat them. Through tools/train.py on the
demo and through a real mmengine Runner on a tiny model (Adam, DDP)."""
import json
import os
import os.path as osp
import pathlib

import pytest
import torch
import torch.multiprocessing as mp
from mmengine.config import Config
from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from mmengine.runner import Runner

import gc_mm  # noqa: F401  (registers RIFLEHook)
from conftest import REPO, run_tool
from gc_mm.hooks import RIFLEHook, _initializer, _reinitialize
from test_grad_stats import Pairs, Tiny
from test_tools import DEMO, DEMO_SMALL, TRAIN, balloon_small, checkpoint

DEMO_LAYERS = ('roi_head.bbox_head.fc_cls', 'roi_head.bbox_head.fc_reg',
               'roi_head.mask_head.conv_logits')
DEMO_PARAMS = sorted(f'{layer}.{kind}' for layer in DEMO_LAYERS
                     for kind in ('weight', 'bias'))


def _model(runner):
    return runner.model.module if hasattr(runner.model,
                                          'module') else runner.model


def _tensors(runner):
    """The model's parameters and buffers (BN statistics), by name."""
    model = _model(runner)
    return {n: t.detach().clone() for n, t in (*model.named_parameters(),
                                               *model.named_buffers())}


def _optimizer_state(runner):
    names = {id(p): n for n, p in _model(runner).named_parameters()}
    return {names[id(p)]: {k: v.clone() if torch.is_tensor(v) else v
                           for k, v in state.items()}
            for p, state in runner.optim_wrapper.optimizer.state.items()}


@HOOKS.register_module()
class RIFLESnapshotHook(Hook):
    """Before RIFLEHook (NORMAL) in each before_train_iter: the weights and
    the optimizer state."""

    priority = 'ABOVE_NORMAL'

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        self.params = _tensors(runner)
        self.state = _optimizer_state(runner)


@HOOKS.register_module()
class RIFLEProbeHook(Hook):
    """After RIFLEHook in each before_train_iter: what changed since
    RIFLESnapshotHook; written to ``out_dir/probe_rank<r>.json`` at the
    end."""

    priority = 'BELOW_NORMAL'

    def __init__(self, out_dir):
        self.out_dir = out_dir
        self.records = {}

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        [snapshot] = [h for h in runner.hooks
                      if isinstance(h, RIFLESnapshotHook)]
        params = _tensors(runner)
        state = _optimizer_state(runner)
        self.records[runner.iter] = dict(
            changed=sorted(n for n, p in params.items()
                           if not torch.equal(p, snapshot.params[n])),
            state_dropped=sorted(set(snapshot.state) - set(state)),
            state_changed=sorted(
                n for n in state if n in snapshot.state and any(
                    not torch.equal(v, snapshot.state[n][k])
                    if torch.is_tensor(v) else v != snapshot.state[n][k]
                    for k, v in state[n].items())),
            with_state=sorted(state),
            reinit_iters=runner.message_hub.get_info('rifle_reinit_iters'))

    def after_train(self, runner):
        with open(osp.join(self.out_dir, f'probe_rank{get_rank()}.json'),
                  'w') as f:
            json.dump(self.records, f)


def read_probe(folder, rank=0):
    with open(osp.join(folder, f'probe_rank{rank}.json')) as f:
        return {int(k): v for k, v in json.load(f).items()}


# ---------------------------------------------------------------------------
# The demo through tools/train.py: 8 images, batch 4, 4 epochs = 8
# iterations; K=3 re-inits at epochs 1, 2, 3, i.e. before iterations 2, 4, 6.


def demo_with_rifle(folder):
    path = folder / 'demo_rifle.py'
    path.write_text(
        f"_base_ = '{DEMO}'\n"
        "custom_imports = dict(imports=['gc_mm', 'gc_mm.datasets', "
        "'test_rifle'], allow_failed_imports=False)\n"
        "custom_hooks = [dict(type='RIFLEHook', num_reinits=3), "
        "dict(type='RIFLESnapshotHook'), "
        f"dict(type='RIFLEProbeHook', out_dir='{folder}')]\n")
    return str(path)


FOUR_EPOCHS = [o.replace('max_epochs=1', 'max_epochs=4') for o in DEMO_SMALL
               ] + ['default_hooks.checkpoint.interval=1',
                    'train_cfg.val_interval=10']
TEST_ENV = dict(PYTHONPATH=osp.join(REPO, 'tests'))


@pytest.fixture(scope='module')
def demo_rifle_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp('rifle')
    proc = run_tool([TRAIN, demo_with_rifle(folder), '--work-dir',
                     str(folder / 'work'), '--cfg-options', *FOUR_EPOCHS],
                    cwd=folder, env=TEST_ENV)
    return folder, proc


def test_demo_reinits_exactly_the_planned_layers_at_the_planned_iterations(
        demo_rifle_run):
    folder, proc = demo_rifle_run
    records = read_probe(folder)
    assert sorted(records) == list(range(8))
    assert ('RIFLEHook: 3 re-inits of ' + ', '.join(DEMO_LAYERS) +
            ' before iterations [2, 4, 6]') in proc.stdout
    for it, record in records.items():
        if it in (2, 4, 6):
            # The six tensors of the three layers, and nothing else.
            assert record['changed'] == DEMO_PARAMS, it
            # Their optimizer state (SGD_GC's momentum) is gone; every other
            # tensor keeps its state, unchanged.
            assert record['state_dropped'] == DEMO_PARAMS, it
            assert not set(DEMO_PARAMS) & set(record['with_state'])
            assert len(record['with_state']) > 50
            assert record['state_changed'] == []
            assert (f're-init {it // 2} of 3 (epoch {it // 2}, iteration '
                    f'{it})') in proc.stdout
        else:
            assert record['changed'] == [] and record['state_dropped'] == []
            assert record['state_changed'] == []
    assert records[7]['reinit_iters'] == [2, 4, 6]
    # The momentum of the re-initialized layers starts afresh: one
    # iteration after a re-init, they have state again (made at that step).
    assert set(DEMO_PARAMS) <= set(records[3]['with_state'])


def test_resume_does_not_repeat_a_reinit_and_ends_as_the_straight_run(
        demo_rifle_run, tmp_path):
    """Resumed from epoch_2.pth (after the re-init at iteration 2, before
    the one at 4): the re-inits at 4 and 6 run, the one at 2 does not, and
    the run ends bit-equal to the uninterrupted one."""
    folder, _ = demo_rifle_run
    source = osp.join(folder, 'work', 'epoch_2.pth')
    proc = run_tool([TRAIN, demo_with_rifle(tmp_path), '--work-dir',
                     str(tmp_path / 'work'), '--resume', source,
                     '--cfg-options', *FOUR_EPOCHS], cwd=folder, env=TEST_ENV)
    assert 'resumed epoch: 2, iter: 4' in proc.stdout
    assert 'done before the checkpoint: iterations [2]' in proc.stdout
    records = read_probe(tmp_path)
    assert sorted(records) == [4, 5, 6, 7]
    assert [it for it, r in records.items() if r['changed']] == [4, 6]
    assert records[7]['reinit_iters'] == [2, 4, 6]
    a = checkpoint(osp.join(folder, 'work', 'epoch_4.pth'))['state_dict']
    b = checkpoint(osp.join(tmp_path, 'work', 'epoch_4.pth'))['state_dict']
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, rtol=0, atol=0, msg=key)


def test_balloon_rifle_config_reinits_its_heads(tmp_path, balloon):
    """The balloon RIFLE twin on 4 images (one iteration per epoch) for 3
    epochs: its two re-inits come before iterations 1 and 2."""
    config = osp.join(REPO,
                      'configs/finetune/mask_rcnn_r18_fpn_gc_balloon_rifle.py')
    options = [o.replace('max_epochs=1', 'max_epochs=3').replace(
        'val_interval=1', 'val_interval=10') for o in balloon_small(balloon)]
    proc = run_tool([TRAIN, config, '--work-dir', str(tmp_path / 'work'),
                     '--cfg-options', *options], cwd=tmp_path)
    assert ('RIFLEHook: 2 re-inits of ' + ', '.join(DEMO_LAYERS) +
            ' before iterations [1, 2]') in proc.stdout
    for it in (1, 2):
        assert (f're-init {it} of 2 (epoch {it}, iteration {it}): '
                + ', '.join(DEMO_LAYERS)) in proc.stdout


# ---------------------------------------------------------------------------
# The re-initialized values: what the model's init gives.


def test_reinit_draws_from_the_models_init_not_torchs_default():
    """mmdet's BBoxHead inits fc_cls with Normal(0, 0.01) and fc_reg with
    Normal(0, 0.001) (its init_cfg), FCNMaskHead conv_logits with Kaiming
    normal, fan_out (its init_weights); biases 0. torch's own Linear init
    (uniform, std 1/sqrt(3 * fan_in) = 0.036 here) would fail these."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules()
    cfg = Config.fromfile(DEMO)
    # 80 classes: enough weights for tight estimates of each std.
    cfg.model.roi_head.bbox_head.num_classes = 80
    cfg.model.roi_head.mask_head.num_classes = 80
    model = MODELS.build(cfg.model)
    model.init_weights()
    hook = RIFLEHook()
    layers = hook._select(model)
    assert list(layers) == list(DEMO_LAYERS)
    # A module inside one already selected is part of it (re-initialized
    # once).
    assert list(RIFLEHook(layers=['fc_cls', r'bbox_head$'])._select(
        model)) == ['roi_head.bbox_head']
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for layer in layers.values():
            for param in layer.parameters():
                param.fill_(1.0)  # as if trained
    torch.manual_seed(0)
    for name, layer in layers.items():
        _reinitialize(layer, *_initializer(layer, model, name))
    after = model.state_dict()
    for key in after:
        if key.rsplit('.', 1)[0] not in DEMO_LAYERS:
            assert torch.equal(after[key], before[key]), key
    head, mask_head = model.roi_head.bbox_head, model.roi_head.mask_head
    fan_out = mask_head.conv_logits.weight.shape[0]  # 80 x 1 x 1
    for weight, std in ((head.fc_cls.weight, 0.01),
                        (head.fc_reg.weight, 0.001),
                        (mask_head.conv_logits.weight, (2 / fan_out)**0.5)):
        assert weight.numel() >= 5000
        assert abs(weight.std().item() / std - 1) < 0.06, (weight.shape, std)
        assert abs(weight.mean().item()) < 4 * std / weight.numel()**0.5
        assert not torch.equal(weight, before_weight(before, model, weight))
    for layer in layers.values():
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))


def before_weight(before, model, weight):
    [name] = [n for n, p in model.named_parameters() if p is weight]
    return before[name]


# ---------------------------------------------------------------------------
# A real Runner on a tiny model: iterations, Adam, bad input, DDP.


def tiny_runner(work_dir, hooks, max_iters=8, optimizer=None, launcher='none',
                diff_rank_seed=False, accumulative_counts=1, checkpoint=None,
                resume_from=None):
    return Runner(
        model=Tiny(), work_dir=str(work_dir), experiment_name=work_dir.name,
        train_dataloader=dict(
            dataset=Pairs(n=16), batch_size=2, num_workers=0,
            sampler=dict(type='DefaultSampler', shuffle=False),
            collate_fn=dict(type='default_collate')),
        optim_wrapper=dict(
            optimizer=optimizer or dict(type='Adam', lr=0.01),
            accumulative_counts=accumulative_counts),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        custom_hooks=hooks,
        default_hooks=dict(logger=dict(type='LoggerHook', interval=1),
                           checkpoint=checkpoint),
        randomness=dict(seed=0, diff_rank_seed=diff_rank_seed),
        launcher=launcher, resume=resume_from is not None,
        load_from=resume_from,
        cfg=dict(model_wrapper_cfg=dict(type='MMDistributedDataParallel',
                                        device_ids=None)))


def probed(folder, **rifle):
    return [dict(type='RIFLEHook', **rifle), dict(type='RIFLESnapshotHook'),
            dict(type='RIFLEProbeHook', out_dir=str(folder))]


def test_iterations_with_adam_and_a_regex(tmp_path):
    """by_epoch=False over 8 iterations: re-inits before 2, 4 and 6 of the
    layer the regex selects; Adam's moments and step count of its two
    tensors start afresh, the conv's go on."""
    runner = tiny_runner(tmp_path, probed(tmp_path, by_epoch=False,
                                          layers=[r'^fc$']))
    runner.train()
    records = read_probe(tmp_path)
    for it, record in records.items():
        want = ['fc.bias', 'fc.weight'] if it in (2, 4, 6) else []
        assert record['changed'] == want, it
        assert record['state_dropped'] == want, it
        assert record['state_changed'] == []
    state = runner.optim_wrapper.optimizer.state
    model = runner.model
    # 8 steps for the conv; the fc's count restarted before iteration 6.
    assert state[model.conv.weight]['step'] == 8
    assert state[model.fc.weight]['step'] == 2
    # torch's own init of the re-initialized Linear (uniform in
    # +-1/sqrt(fan_in)), after two Adam steps of lr 0.01.
    bound = 1 / model.fc.in_features**0.5 + 2 * 0.01 + 1e-6
    assert model.fc.weight.abs().max() <= bound


def test_resume_at_a_planned_iteration_does_that_reinit_once(tmp_path):
    """Iteration checkpoints every 2 iterations; re-inits before 2, 4, 6.
    iter_4.pth is saved after iteration 3, before the re-init at 4: the run
    resumed from it does the re-inits at 4 and 6 (not 2) and ends as the
    straight run (RandomStateHook restores the generators the re-inits
    draw from)."""
    hooks = [dict(type='RIFLEHook', by_epoch=False, layers=['fc']),
             dict(type='RIFLESnapshotHook'), dict(type='RandomStateHook')]
    every_2 = dict(type='CheckpointHook', interval=2, by_epoch=False)
    straight = tiny_runner(tmp_path / 'straight', hooks + [dict(
        type='RIFLEProbeHook', out_dir=str(tmp_path / 'straight'))],
        checkpoint=every_2)
    straight.train()
    resumed = tiny_runner(tmp_path / 'resumed', hooks + [dict(
        type='RIFLEProbeHook', out_dir=str(tmp_path / 'resumed'))],
        checkpoint=every_2,
        resume_from=str(tmp_path / 'straight' / 'iter_4.pth'))
    resumed.train()
    straight_records = read_probe(tmp_path / 'straight')
    records = read_probe(tmp_path / 'resumed')
    assert [it for it, r in straight_records.items() if r['changed']] == [
        2, 4, 6]
    assert sorted(records) == [4, 5, 6, 7]
    assert [it for it, r in records.items() if r['changed']] == [4, 6]
    assert records[4]['reinit_iters'] == [2, 4]
    for name, param in straight.model.named_parameters():
        torch.testing.assert_close(dict(resumed.model.named_parameters())[
            name], param, rtol=0, atol=0, msg=name)


def test_lookahead_slow_weights_restart_at_the_new_weights(tmp_path):
    """Lookahead(k=2) around SGD with momentum; a re-init before iteration
    2 (3rd inner step, no synchronization): the fc's momentum and slow
    weights are dropped, and its slow weights start again at the
    re-initialized weights; the conv's go on."""
    seen = {}

    class Watch(Hook):
        priority = 'BELOW_NORMAL'  # after RIFLEHook

        def before_train_iter(self, runner, batch_idx, data_batch=None):
            state = runner.optim_wrapper.optimizer.state
            model = runner.model
            seen[runner.iter] = dict(
                fc=model.fc.weight.detach().clone(),
                fc_state={k: v.clone() for k, v in state.get(
                    model.fc.weight, {}).items()},
                conv_slow=state[model.conv.weight]['slow_weight'].clone()
                if runner.iter else None)

    runner = tiny_runner(tmp_path, [
        dict(type='RIFLEHook', by_epoch=False, num_reinits=1, layers=['fc'],
             end=4), Watch()], max_iters=4, optimizer=dict(
                 type='Lookahead', k=2, alpha=0.5,
                 optimizer=dict(type='SGD', lr=0.01, momentum=0.9)))
    runner.train()
    assert set(seen[1]['fc_state']) == {'momentum_buffer', 'slow_weight'}
    assert seen[2]['fc_state'] == {}
    assert not torch.equal(seen[2]['fc'], seen[1]['fc'])
    slow = seen[3]['fc_state']['slow_weight']
    assert torch.equal(slow, seen[2]['fc'])
    assert torch.equal(seen[3]['conv_slow'], seen[2]['conv_slow'])


def test_gradient_accumulation_zeroes_the_stale_gradients(tmp_path):
    """A re-init between two micro-batches: the first micro-batch's
    gradient was of the old weights and is dropped, the other weights'
    stays."""
    seen = {}

    class Check(Hook):
        priority = 'LOW'

        def before_train_iter(self, runner, batch_idx, data_batch=None):
            if runner.iter == 3:
                seen.update({n: None if p.grad is None else p.grad.clone()
                             for n, p in runner.model.named_parameters()})

    runner = tiny_runner(tmp_path, [
        dict(type='RIFLEHook', by_epoch=False, num_reinits=1, layers=['fc'],
             begin=2, end=4), Check()], max_iters=6, accumulative_counts=2,
        optimizer=dict(type='SGD', lr=0.01))
    runner.train()
    assert torch.count_nonzero(seen['fc.weight']) == 0
    assert torch.count_nonzero(seen['conv.weight']) > 0


@pytest.mark.parametrize('kwargs,message', [
    (dict(num_reinits=0), 'num_reinits must be an int >= 1'),
    (dict(by_epoch='yes'), 'by_epoch must be True or False'),
    (dict(end=0), 'end must be an int >= 1'),
    (dict(layers=['(']), 'layers must be a list of regular expressions'),
])
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RIFLEHook(**kwargs)


@pytest.mark.parametrize('kwargs,message', [
    (dict(by_epoch=False, layers=['fc'], end=3), 'do not fit evenly'),
    (dict(by_epoch=False, layers=['nothing']), 'matches no module'),
    (dict(by_epoch=False), 'none of the default layers'),
    (dict(by_epoch=True, layers=['fc']), 'needs an epoch-based train loop'),
    (dict(by_epoch=False, layers=['fc'], end=9),
     'begin < end <= the schedule length'),
])
def test_a_plan_that_cannot_run_is_refused_before_training(
        tmp_path, kwargs, message):
    runner = tiny_runner(tmp_path, [dict(type='RIFLEHook', **kwargs)])
    weights = {n: p.clone() for n, p in runner.model.named_parameters()}
    with pytest.raises(ValueError, match=message):
        runner.train()
    for name, param in runner.model.named_parameters():
        assert torch.equal(param, weights[name])


def _train_on_rank(rank, folder):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE='2')
    torch.distributed.init_process_group(
        'gloo', init_method=f'file://{folder}/rendezvous', rank=rank,
        world_size=2)
    folder = pathlib.Path(folder)
    runner = tiny_runner(folder / 'work', probed(
        folder, by_epoch=False, num_reinits=1, layers=['fc']),
        max_iters=4, launcher='pytorch', diff_rank_seed=True,
        optimizer=dict(type='SGD', lr=0.01, momentum=0.9))
    runner.train()
    torch.save({n: p.detach() for n, p in runner.model.module.
                named_parameters()}, folder / f'params{rank}.pth')
    torch.distributed.destroy_process_group()


def test_ddp_ranks_get_rank0s_new_weights(tmp_path):
    """Two gloo ranks with different seeds: both take rank 0's re-init
    (before iteration 2) and end with identical weights."""
    (tmp_path / 'work').mkdir()
    mp.spawn(_train_on_rank, args=(str(tmp_path), ), nprocs=2)
    for rank in (0, 1):
        records = read_probe(tmp_path, rank)
        assert [it for it, r in records.items() if r['changed']] == [2]
    params = [torch.load(tmp_path / f'params{r}.pth', weights_only=True)
              for r in (0, 1)]
    for name in params[0]:
        torch.testing.assert_close(params[1][name], params[0][name], rtol=0,
                                   atol=0, msg=name)
