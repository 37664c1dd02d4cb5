"""Lookahead around any optimizer: the float64 reference, its state dict,
MMEngine's parameter schedulers through it, SlowWeightsHook in a real
runner, and a real demo run resumed through tools/train.py."""
import copy
import io
import os.path as osp

import numpy as np
import pytest
import torch
import torch.nn as nn
from mmengine.evaluator import BaseMetric
from mmengine.model import BaseModel
from mmengine.optim import LinearLR, MultiStepLR, OptimWrapper
from mmengine.registry import METRICS, OPTIMIZERS
from mmengine.runner import Runner

import gc_mm  # noqa: F401  (registers the optimizers and hooks)
from conftest import needs_cpu_amp, run_tool
from gc_mm.hooks import SlowWeightsHook
from gc_mm.optimizers import inner_optimizer
from reference import Reference
from test_tools import DEMO, DEMO_SMALL, TRAIN, checkpoint

F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16
SHAPES = [(6, 3, 3, 3), (5, 7), (5, )]
SGD_GC = dict(type='SGD_GC', lr=0.1, momentum=0.9, weight_decay=0.01)


def lookahead_reference(inner, weights, grads, k, alpha):
    """``inner`` (a reference with .step) plus Lookahead: slow weights start
    as the initial weights; every k steps phi += alpha (w - phi), w = phi."""
    slow = [w.copy() for w in weights]
    for t, step_grads in enumerate(grads, start=1):
        weights = inner.step(weights, step_grads)
        if t % k == 0:
            slow = [s + alpha * (w - s) for s, w in zip(slow, weights)]
            weights = [s.copy() for s in slow]
    return weights


def gradients(steps, seed=0):
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(s) for s in SHAPES] for _ in range(steps)]


def initial_weights(dtype=F64, seed=1):
    rng = np.random.default_rng(seed)
    return [torch.tensor(rng.standard_normal(s)).to(dtype).double().numpy()
            for s in SHAPES]


def build(cfg, weights, dtype=F64):
    params = [nn.Parameter(torch.tensor(w, dtype=dtype)) for w in weights]
    return params, OPTIMIZERS.build(dict(cfg, params=params))


def run(opt, params, grads, dtype=F64):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = torch.tensor(g, dtype=dtype)
        opt.step()


@pytest.mark.parametrize('inner,reference', [
    (SGD_GC, dict(name='SGD_GC', lr=0.1, momentum=0.9, weight_decay=0.01)),
    (dict(type='SGD', lr=0.1, momentum=0.9),
     dict(name='SGD_GC', gc_mode=None, lr=0.1, momentum=0.9)),
])
@pytest.mark.parametrize('k,alpha', [(5, 0.5), (3, 0.8), (1, 1.0)])
def test_matches_reference(inner, reference, k, alpha):
    """Around a GC optimizer and around torch's SGD, 12 steps."""
    weights, grads = initial_weights(), gradients(12)
    params, opt = build(dict(type='Lookahead', optimizer=inner, k=k,
                             alpha=alpha), weights)
    run(opt, params, grads)
    want = lookahead_reference(Reference(**reference), weights, grads, k,
                               alpha)
    for p, w in zip(params, want):
        np.testing.assert_allclose(p.detach().numpy(), w, rtol=1e-12,
                                   atol=1e-12)
    if k > 1:  # the reference is sensitive to Lookahead
        plain = lookahead_reference(Reference(**reference), weights, grads,
                                    k=1, alpha=1.)
        assert not np.allclose(want[0], plain[0], atol=1e-6)


def test_groups_and_state_are_the_inner_optimizers():
    """The same objects, also after load_state_dict replaced them."""
    params, opt = build(dict(type='Lookahead', optimizer=SGD_GC),
                        initial_weights())
    assert inner_optimizer(opt) is opt.optimizer
    run(opt, params, gradients(2))
    opt.load_state_dict(opt.state_dict())
    assert opt.param_groups is opt.optimizer.param_groups
    assert opt.state is opt.optimizer.state
    opt.add_param_group(dict(params=[nn.Parameter(torch.zeros(3))], lr=0.5))
    assert opt.optimizer.param_groups[-1]['lr'] == 0.5
    assert opt.optimizer.param_groups[-1]['momentum'] == 0.9


def test_a_deep_copy_steps_as_the_original():
    weights, grads = initial_weights(), gradients(8)
    params, opt = build(dict(type='Lookahead', optimizer=SGD_GC, k=3),
                        weights)
    run(opt, params, grads[:4])
    twin = copy.deepcopy(dict(params=params, opt=opt))
    assert twin['opt'].param_groups[0]['params'][0] is twin['params'][0]
    run(opt, params, grads[4:])
    run(twin['opt'], twin['params'], grads[4:])
    for a, b in zip(params, twin['params']):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def schedule(optimizer_cfg, grads, resume_at=None):
    """OptimWrapper + LinearLR + MultiStepLR (mmengine's, by iteration):
    the inner optimizer's lr and the weights after each step."""
    weights = initial_weights()

    def make():
        params, opt = build(optimizer_cfg, weights)
        wrapper = OptimWrapper(opt)
        schedulers = [
            LinearLR(wrapper, start_factor=0.1, by_epoch=False, begin=0,
                     end=4),
            MultiStepLR(wrapper, milestones=[6], gamma=0.1, by_epoch=False)
        ]
        return params, wrapper, schedulers

    params, wrapper, schedulers = make()
    lrs, trace = [], []
    for t, step_grads in enumerate(grads):
        if t == resume_at:  # a new optimizer and schedulers, loaded
            saved = (wrapper.state_dict(),
                     [s.state_dict() for s in schedulers],
                     [p.detach().clone() for p in params])
            params, wrapper, schedulers = make()
            wrapper.load_state_dict(saved[0])
            for scheduler, state in zip(schedulers, saved[1]):
                scheduler.load_state_dict(state)
            with torch.no_grad():
                for p, s in zip(params, saved[2]):
                    p.copy_(s)
        for p, g in zip(params, step_grads):
            p.grad = torch.tensor(g)
        wrapper.step()
        lrs.append(inner_optimizer(wrapper.optimizer).param_groups[0]['lr'])
        trace.append([p.detach().clone() for p in params])
        for scheduler in schedulers:
            scheduler.step()
    return lrs, trace


@pytest.mark.parametrize('resume_at', [None, 5])
def test_param_schedulers_change_the_inner_lr(resume_at):
    """LinearLR and MultiStepLR built on the wrapper of a Lookahead change
    the lr its inner optimizer steps with (also after a resume): with
    k=1, alpha=1 the run equals the inner optimizer's alone, bit for bit."""
    grads = gradients(9)
    lrs, trace = schedule(SGD_GC, grads)
    # The warm-up from 0.1 * lr over 4 steps, then x0.1 at step 6.
    assert lrs == pytest.approx([0.01, 0.04, 0.07, 0.1, 0.1, 0.1, 0.01,
                                 0.01, 0.01])
    got_lrs, got = schedule(dict(type='Lookahead', optimizer=SGD_GC, k=1,
                                 alpha=1.), grads, resume_at)
    assert got_lrs == lrs
    for a, b in zip(trace, got):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


def save_load(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize('inner', [SGD_GC, dict(type='AdamW', lr=0.01,
                                                weight_decay=0.1)])
@pytest.mark.parametrize('dtype', [F32, BF16])
def test_state_dict_holds_slow_weights_and_resumes_bit_exact(inner, dtype):
    """Saved mid-window (3 of k=5 steps), through torch.save with
    weights_only: the slow weights (float32 for bfloat16 parameters, also
    around torch's AdamW, which would cast its state to the parameter's
    dtype) and the step count come back; 12 steps end bit-equal."""
    weights, grads = initial_weights(dtype), gradients(12)
    cfg = dict(type='Lookahead', optimizer=inner, k=5)
    params, opt = build(cfg, weights, dtype)
    run(opt, params, grads[:3], dtype)
    saved = save_load(opt.state_dict())
    assert saved['lookahead'] == dict(steps=3)
    for index, w in enumerate(weights):  # slow = initial weights, so far
        slow = saved['state'][index]['slow_weight']
        assert slow.dtype == F32 if dtype == BF16 else dtype
        np.testing.assert_array_equal(slow.double().numpy(), w)
    saved_params = [p.detach().clone() for p in params]
    run(opt, params, grads[3:], dtype)

    resumed, opt2 = build(cfg, weights, dtype)
    with torch.no_grad():
        for p, s in zip(resumed, saved_params):
            p.copy_(s)
    opt2.load_state_dict(saved)
    for p in resumed:
        assert opt2.state[p]['slow_weight'].dtype == (F32 if dtype == BF16
                                                      else dtype)
    run(opt2, resumed, grads[3:], dtype)
    for a, b in zip(params, resumed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(opt.state[a]['slow_weight'],
                                   opt2.state[b]['slow_weight'], rtol=0,
                                   atol=0)


def test_loads_a_state_dict_of_the_inner_optimizer_alone():
    """A checkpoint of a run without Lookahead: the inner state is loaded,
    the slow weights start at the next step, from the weights then."""
    weights, grads = initial_weights(), gradients(3)
    params, plain = build(SGD_GC, weights)
    run(plain, params, grads[:2])
    resumed, opt = build(dict(type='Lookahead', optimizer=SGD_GC, k=5),
                         weights)
    with torch.no_grad():
        for p, q in zip(resumed, params):
            p.copy_(q)
    opt.load_state_dict(save_load(plain.state_dict()))
    assert opt.lookahead_steps == 0
    starts = [p.detach().clone() for p in resumed]
    run(opt, resumed, grads[2:])
    run(plain, params, grads[2:])
    for p, q, start in zip(resumed, params, starts):
        assert torch.equal(p, q)  # momentum resumed: the same step
        assert torch.equal(opt.state[p]['slow_weight'], start)


def test_refuses_slow_weights_of_another_shape_before_loading():
    params, opt = build(dict(type='Lookahead', optimizer=SGD_GC),
                        initial_weights())
    run(opt, params, gradients(2))
    state_dict = save_load(opt.state_dict())
    state_dict['state'][1]['slow_weight'] = torch.zeros(7, 5)
    state_dict['lookahead']['steps'] = 4
    before = save_load(opt.state_dict())
    with pytest.raises(ValueError, match=r'slow weights saved for parameter '
                       r'1 are of shape \(7, 5\), not a tensor of its shape '
                       r'\(5, 7\)'):
        opt.load_state_dict(state_dict)
    assert opt.lookahead_steps == 2
    for index, p in enumerate(params):
        for key, value in before['state'][index].items():
            torch.testing.assert_close(opt.state[p][key], value, rtol=0,
                                       atol=0)


def test_a_parameter_whose_state_is_dropped_restarts_its_slow_weights():
    """Dropping a parameter's optimizer state (as a re-initialization does)
    drops its slow weights too: they restart from its weights at its next
    step, and its next synchronization pulls it towards those."""
    weights, grads = initial_weights(), gradients(6)
    params, opt = build(dict(type='Lookahead', optimizer=SGD_GC, k=3),
                        weights)
    run(opt, params, grads[:4])
    with torch.no_grad():
        params[1].normal_()
    restart = params[1].detach().clone()
    del opt.state[params[1]]
    run(opt, params, grads[4:5])
    assert torch.equal(opt.state[params[1]]['slow_weight'], restart)
    assert 'momentum_buffer' in opt.state[params[1]]
    run(opt, params, grads[5:6])  # the sync at step 6
    assert torch.equal(params[1].detach(),
                       opt.state[params[1]]['slow_weight'])


@needs_cpu_amp
def test_a_step_the_loss_scaler_skips_is_not_counted():
    """Under AMP, GradScaler skips the step for non-finite gradients (it
    does not call step): the parameters, the slow weights and the count of
    inner steps stay as they were."""
    weights, grads = initial_weights(), gradients(3)
    params, opt = build(dict(type='Lookahead', optimizer=SGD_GC, k=2),
                        weights, F32)
    scaler = torch.amp.GradScaler('cpu', init_scale=4.)
    for t, step_grads in enumerate(grads):
        step_grads = [torch.tensor(g, dtype=F32) for g in step_grads]
        if t == 1:
            step_grads[0][0, 0, 0, 0] = float('inf')
            before = [p.detach().clone() for p in params]
        opt.zero_grad()
        # A loss whose gradient is this step's.
        scaler.scale(sum((p * g).sum()
                         for p, g in zip(params, step_grads))).backward()
        scaler.step(opt)
        scaler.update()
        if t == 1:
            assert opt.lookahead_steps == 1
            for p, b in zip(params, before):
                assert torch.equal(p.detach(), b)
    assert opt.lookahead_steps == 2  # and the sync came at the 2nd real step
    for p in params:
        assert torch.equal(p.detach(), opt.state[p]['slow_weight'])


def test_frozen_parameters_get_no_slow_weights():
    params, opt = build(dict(type='Lookahead', optimizer=SGD_GC),
                        initial_weights())
    params[2].requires_grad_(False)
    run(opt, params[:2], gradients(1))
    assert 'slow_weight' not in opt.state.get(params[2], {})


@pytest.mark.parametrize('cfg,message', [
    (dict(k=0), 'k must be a positive int'),
    (dict(k=2.), 'k must be a positive int'),
    (dict(alpha=0), r'alpha must be a number in \(0, 1\]'),
    (dict(optimizer='SGD_GC'), 'optimizer must be the config dict'),
    (dict(optimizer=dict(lr=0.1)), 'optimizer must be the config dict'),
    (dict(optimizer=dict(SGD_GC, params=[])), 'give the parameters to '
     'Lookahead'),
])
def test_bad_options_are_refused_naming_them(cfg, message):
    with pytest.raises(ValueError, match=message):
        build(dict(dict(type='Lookahead', optimizer=SGD_GC), **cfg),
              initial_weights())


# SlowWeightsHook in a real MMEngine runner, on a toy regression.
class ToyModel(BaseModel):

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 1)
        with torch.no_grad():
            self.linear.weight.copy_(torch.tensor([[0.5, -0.3]]))
            self.linear.bias.fill_(0.1)
        self.predicted_with = []  # weights at each val/test forward

    def forward(self, inputs, labels=None, mode='tensor'):
        out = self.linear(inputs)
        if mode == 'loss':
            return dict(loss=((out - labels)**2).mean())
        if mode == 'predict':
            self.predicted_with.append(self.linear.weight.detach().clone())
            return list(out)
        return out


@METRICS.register_module(force=True)
class ToyCount(BaseMetric):

    def process(self, data_batch, data_samples):
        self.results.append(len(data_samples))

    def compute_metrics(self, results):
        return dict(count=sum(results))


def toy_data():
    rng = np.random.default_rng(0)
    return [dict(inputs=torch.tensor(rng.standard_normal(2), dtype=F32),
                 labels=torch.tensor(rng.standard_normal(1), dtype=F32))
            for _ in range(4)]


def toy_runner(work_dir, name, hook=None, max_epochs=2, resume_from=None):
    loader = dict(dataset=toy_data(), batch_size=2, num_workers=0,
                  sampler=dict(type='DefaultSampler', shuffle=False),
                  collate_fn=dict(type='default_collate'))
    return Runner(
        model=ToyModel(), work_dir=str(work_dir), experiment_name=name,
        train_dataloader=loader, val_dataloader=loader,
        test_dataloader=loader, val_evaluator=dict(type='ToyCount'),
        test_evaluator=dict(type='ToyCount'),
        train_cfg=dict(by_epoch=True, max_epochs=max_epochs,
                       val_interval=1),
        val_cfg=dict(), test_cfg=dict(),
        optim_wrapper=dict(optimizer=dict(
            type='Lookahead', k=3, alpha=0.5,
            optimizer=dict(type='SGD', lr=0.1, momentum=0.9))),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook',
                                           interval=1)),
        custom_hooks=[hook] if hook else [],
        load_from=resume_from, resume=resume_from is not None,
        default_scope='mmengine')


def slow_and_fast(runner):
    opt = runner.optim_wrapper.optimizer
    weight = runner.model.linear.weight
    return opt.state[weight]['slow_weight'].clone(), weight.detach().clone()


def test_hook_validates_tests_and_saves_the_slow_weights(tmp_path):
    """Two epochs of two steps, k=3: validation after epoch 1 sees the slow
    weights (still the initial ones), after epoch 2 the synchronized ones;
    training continues from the fast weights (it ends bit-equal to a run
    without the hook); a test after training sees the slow weights; each
    checkpoint holds the slow weights as its model and the fast ones for
    --resume, which continues from them bit-exactly."""
    plain = toy_runner(tmp_path / 'plain', 'plain')
    plain.train()
    runner = toy_runner(tmp_path / 'hook', 'hook',
                        dict(type='SlowWeightsHook'))
    runner.train()
    initial = torch.tensor([[0.5, -0.3]])
    seen = runner.model.predicted_with
    slow, fast = slow_and_fast(runner)
    assert len(seen) == 4  # two val epochs of two batches
    assert torch.equal(seen[0], initial) and torch.equal(seen[1], initial)
    assert torch.equal(seen[2], slow) and not torch.equal(slow, fast)
    assert torch.equal(fast, plain.model.linear.weight.detach())
    # Without the hook validation sees the fast weights.
    assert torch.equal(plain.model.predicted_with[-1], fast)
    runner.test()
    assert torch.equal(seen[-1], slow)
    assert torch.equal(runner.model.linear.weight.detach(), fast)

    ckpt = checkpoint(osp.join(runner.work_dir, 'epoch_2.pth'))
    assert torch.equal(ckpt['state_dict']['linear.weight'], slow)
    assert torch.equal(ckpt['lookahead_fast_weights']['linear.weight'], fast)
    epoch_1 = checkpoint(osp.join(runner.work_dir, 'epoch_1.pth'))
    assert torch.equal(epoch_1['state_dict']['linear.weight'], initial)
    # A checkpoint saved while the slow weights are in the model (e.g. by
    # a hook during validation) still carries the fast ones.
    [hook] = [h for h in runner.hooks if isinstance(h, SlowWeightsHook)]
    hook.before_val_epoch(runner)
    assert torch.equal(runner.model.linear.weight.detach(), slow)
    saved = dict(state_dict=runner.model.state_dict())
    hook.before_save_checkpoint(runner, saved)
    hook.after_val_epoch(runner)
    assert torch.equal(saved['lookahead_fast_weights']['linear.weight'], fast)
    assert torch.equal(runner.model.linear.weight.detach(), fast)

    resumed = toy_runner(tmp_path / 'resumed', 'resumed',
                         dict(type='SlowWeightsHook'),
                         resume_from=osp.join(runner.work_dir,
                                              'epoch_1.pth'))
    resumed.train()
    for a, b in zip(slow_and_fast(runner), slow_and_fast(resumed)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_hook_switches(tmp_path):
    """val=False validates the fast weights; checkpoint=False saves them as
    the model (and no copy)."""
    runner = toy_runner(tmp_path, 'switched',
                        dict(type='SlowWeightsHook', val=False,
                             checkpoint=False), max_epochs=1)
    runner.train()
    _, fast = slow_and_fast(runner)
    assert torch.equal(runner.model.predicted_with[-1], fast)
    ckpt = checkpoint(osp.join(runner.work_dir, 'epoch_1.pth'))
    assert torch.equal(ckpt['state_dict']['linear.weight'], fast)
    assert 'lookahead_fast_weights' not in ckpt
    with pytest.raises(ValueError, match='SlowWeightsHook: test must be a '
                       'bool'):
        SlowWeightsHook(test='yes')


def lookahead_demo(folder):
    """The GC demo with Lookahead(SGD_GC), k=3; tools/train.py adds
    SlowWeightsHook, since the config has none."""
    path = folder / 'lookahead_demo.py'
    path.write_text(
        f"_base_ = '{DEMO}'\n"
        "optim_wrapper = dict(optimizer=dict(\n"
        "    _delete_=True, type='Lookahead', k=3, alpha=0.5,\n"
        "    optimizer=dict(type='SGD_GC', lr=0.01, momentum=0.9,\n"
        "                   weight_decay=1e-4)))\n")
    return str(path)


def test_demo_resumed_through_train_py_ends_equal(tmp_path):
    """tools/train.py on the demo (2 epochs of 2 iterations; the sync at
    iteration 3), and again resumed from epoch_1.pth: the same final slow
    weights (the checkpoint's model), fast weights and optimizer state,
    bit for bit."""
    pytest.importorskip('mmdet')  # tools/train.py
    config = lookahead_demo(tmp_path)
    two_epochs = [o.replace('max_epochs=1', 'max_epochs=2') for o in
                  DEMO_SMALL] + ['default_hooks.checkpoint.interval=1',
                                 'train_cfg.val_interval=10']
    straight = str(tmp_path / 'straight')
    run_tool([TRAIN, config, '--work-dir', straight, '--cfg-options',
              *two_epochs], cwd=tmp_path)
    resumed = str(tmp_path / 'resumed')
    proc = run_tool([TRAIN, config, '--work-dir', resumed, '--resume',
                     osp.join(straight, 'epoch_1.pth'), '--cfg-options',
                     *two_epochs], cwd=tmp_path)
    assert 'resumed epoch: 1, iter: 2' in proc.stdout
    a = checkpoint(osp.join(straight, 'epoch_2.pth'))
    b = checkpoint(osp.join(resumed, 'epoch_2.pth'))
    assert a['optimizer']['lookahead'] == b['optimizer']['lookahead'] == dict(
        steps=4)
    for key in ('state_dict', 'lookahead_fast_weights'):
        assert a[key].keys() == b[key].keys()
        for name, value in a[key].items():
            torch.testing.assert_close(b[key][name], value, rtol=0, atol=0,
                                       msg=name)
    for index, state in a['optimizer']['state'].items():
        for name, value in state.items():
            torch.testing.assert_close(b['optimizer']['state'][index][name],
                                       value, rtol=0, atol=0)
    name = 'backbone.conv1.weight'  # the model is the slow weights
    assert not torch.equal(a['state_dict'][name],
                           a['lookahead_fast_weights'][name])
    assert any(torch.equal(a['state_dict'][name], state['slow_weight'])
               for state in a['optimizer']['state'].values())


def test_constructor_and_wrappers_see_the_gc_optimizer_inside_lookahead():
    """paramwise_cfg.gc reaches Ranger's (and Lookahead(SGD_GC)'s) inner GC
    optimizer, and GCOptimWrapper refuses to centralize twice."""
    from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS, OPTIM_WRAPPERS
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 1))
    for optimizer in (dict(type='Ranger'),
                      dict(type='Lookahead', optimizer=SGD_GC)):
        constructor = OPTIM_WRAPPER_CONSTRUCTORS.build(dict(
            type='GCOptimWrapperConstructor',
            optim_wrapper_cfg=dict(type='OptimWrapper', optimizer=optimizer),
            paramwise_cfg=dict(gc=dict(exclude=[r'^1\.']))))
        wrapper = constructor(model)
        modes = {id(p): g['gc_mode'] for g in wrapper.optimizer.param_groups
                 for p in g['params']}
        assert modes[id(model[0].weight)] == 'conv_fc'
        assert modes[id(model[1].weight)] is None
        with pytest.raises(ValueError, match='would centralize twice'):
            OPTIM_WRAPPERS.build(dict(type='GCOptimWrapper',
                                      gc_mode='conv_fc',
                                      optimizer=wrapper.optimizer))


@pytest.mark.parametrize('inner', [
    dict(type='RAdam_GC', lr=0.1), dict(type='Adam_GC', lr=0.1),
    dict(type='Adagrad_GC', lr=0.1), dict(type='AdamW', lr=0.1), SGD_GC])
def test_a_parameter_without_gradient_gets_its_slow_weights_when_updated(
        inner):
    """A parameter that gets its first gradient at the second step (a head
    unused at first) starts its slow weights then, from its weights before
    that step; until then it has no state, so the inner optimizer creates
    its moments as for a fresh parameter."""
    torch.manual_seed(0)
    a, b = (nn.Parameter(torch.randn(3, 4)) for _ in range(2))
    opt = OPTIMIZERS.build(dict(type='Lookahead', params=[a, b], k=5,
                                optimizer=inner))
    a.grad = torch.randn(3, 4)
    opt.step()
    assert b not in opt.state or not opt.state[b]
    before = b.detach().clone()
    b.grad = torch.randn(3, 4)
    opt.step()
    assert torch.equal(opt.state[b]['slow_weight'], before)
    assert not torch.equal(b, before)
