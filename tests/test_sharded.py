"""GC under sharded data parallelism, on two gloo ranks.

FSDP2 (``fully_shard``: DTensor parameters sharded ``Shard(0)``, here with
even, uneven and empty shards) trains to the single-process run's weights
for every GC optimizer family and both GC wrappers, with no collective in
the optimizer step and DTensor state (what torch's distributed
checkpointing saves). FSDP1's flat 1-D shards, where GC would silently do
nothing, are refused with one line before the first step.
"""
import os

import pytest
import torch
import torch.multiprocessing as mp
from mmengine.optim import build_optim_wrapper
from torch import nn

import gc_mm  # noqa: F401  (registers the GC optimizers and wrappers)

STEPS = 3
SGD = dict(lr=0.1, momentum=0.9, weight_decay=1e-2)
ADAM = dict(lr=1e-2, weight_decay=1e-2)
# Each GC optimizer family (SGD's paths: the kernel, the multi-tensor and
# the plain path; the adaptive families' kernel and default) and both GC
# wrappers, as optim_wrapper configs.
CASES = {
    'SGD_GC': dict(optimizer=dict(type='SGD_GC', **SGD)),
    'SGD_GC-fused': dict(optimizer=dict(type='SGD_GC', fused=True, **SGD)),
    'SGD_GC-foreach': dict(optimizer=dict(type='SGD_GC', foreach=True,
                                          **SGD)),
    'SGDW_GCC-plain': dict(optimizer=dict(
        type='SGDW_GCC', nesterov=True, fused=False, foreach=False, **SGD)),
    'Adam_GC': dict(optimizer=dict(type='Adam_GC', **ADAM)),
    'Adam_GC-fused': dict(optimizer=dict(type='Adam_GC', fused=True,
                                         **ADAM)),
    'AdamW_GC2-fused': dict(optimizer=dict(type='AdamW_GC2', fused=True,
                                           **ADAM)),
    'Adagrad_GC-fused': dict(optimizer=dict(type='Adagrad_GC', fused=True,
                                            **ADAM)),
    'RAdam_GC': dict(optimizer=dict(type='RAdam_GC', **ADAM)),
    'Ranger': dict(optimizer=dict(type='Ranger', k=2, **ADAM)),
    'GCOptimWrapper-SGD': dict(type='GCOptimWrapper',
                               optimizer=dict(type='SGD', **SGD)),
    'GCOptimWrapper-AdamW': dict(type='GCOptimWrapper',
                                 optimizer=dict(type='AdamW', **ADAM)),
    'AmpGCOptimWrapper-SGD': dict(type='AmpGCOptimWrapper', loss_scale=64.,
                                  optimizer=dict(type='SGD', **SGD)),
}


class Net(nn.Module):
    """On two ranks, Shard(0) gives the conv's 3 rows as 2 + 1 (uneven), the
    fc's 4 rows as 2 + 2 (even) and the head's one row as 1 + 0 (empty)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc = nn.Linear(12, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        x = torch.relu(self.conv(x)).flatten(1)
        return self.head(torch.tanh(self.fc(x)))


def batch(step):
    """The global batch of a step; rank r trains on its rows 2r, 2r + 1."""
    return torch.randn(4, 2, 4, 4,
                       generator=torch.Generator().manual_seed(step))


def loss_of(model, x):
    return model(x).pow(2).mean() * 10


def train(model, cfg, inputs, count_comms=False):
    """STEPS updates; the number of collectives in the optimizer steps."""
    from torch.distributed.tensor.debug import CommDebugMode
    wrapper = build_optim_wrapper(model, cfg)
    collectives = 0
    for step in range(STEPS):
        wrapper.backward(loss_of(model, inputs(step)))
        with CommDebugMode() as comms:
            wrapper.step()
        collectives += comms.get_total_counts()
        wrapper.zero_grad()
    return wrapper, collectives


def reference(cfg):
    model = Net()
    train(model, cfg, batch)
    return {n: p.detach() for n, p in model.named_parameters()}


def _init(rank, folder):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE='2')
    torch.distributed.init_process_group(
        'gloo', init_method=f'file://{folder}/rendezvous', rank=rank,
        world_size=2)


def _fsdp2_on_rank(rank, folder):
    from torch.distributed.checkpoint.state_dict import \
        get_optimizer_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    _init(rank, folder)
    sharded = Net()
    for module in (sharded.conv, sharded.fc, sharded.head, sharded):
        fully_shard(module)
    results = {'local_rows': {n: p.to_local().shape[0]
                              for n, p in sharded.named_parameters()}}
    for name, cfg in CASES.items():
        model = Net()
        for module in (model.conv, model.fc, model.head, model):
            fully_shard(module)
        try:
            wrapper, collectives = train(
                model, cfg, lambda step: batch(step)[2 * rank:2 * rank + 2])
        except Exception as error:  # reported by the test, per case
            results[name] = f'{type(error).__name__}: {error}'
            continue
        # The DTensor state torch's distributed checkpointing saves.
        saved = get_optimizer_state_dict(model, wrapper.optimizer)
        state_is_sharded = all(
            isinstance(value, DTensor)
            for state in saved['state'].values() for value in state.values()
            if torch.is_tensor(value) and value.ndim)
        results[name] = dict(
            weights={n: p.full_tensor() for n, p in model.named_parameters()},
            collectives=collectives, state_is_sharded=state_is_sharded)
    results['rows_split'] = _rows_split_outcomes()
    torch.save(results, f'{folder}/rank{rank}.pth')
    torch.distributed.destroy_process_group()


def _rows_split_outcomes():
    """What a GC optimizer and a GC wrapper do with a weight whose rows
    are split between the ranks (Shard(1), as tensor parallelism places
    some), named through named_parameters."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = init_device_mesh('cpu', (2, ))
    outcomes = []
    for cfg in (CASES['SGD_GC'], CASES['GCOptimWrapper-SGD']):
        model = nn.Linear(4, 3)
        model.weight = nn.Parameter(
            distribute_tensor(model.weight.detach(), mesh, [Shard(1)]))
        model.bias = nn.Parameter(
            distribute_tensor(model.bias.detach(), mesh, [Shard(0)]))
        before = model.weight.full_tensor()
        try:
            wrapper = build_optim_wrapper(model, cfg)
            wrapper.update_params(model(torch.ones(2, 4)).sum())
            outcomes.append('trained')
        except ValueError as error:
            outcomes.append(str(error))
        assert torch.equal(model.weight.full_tensor(), before)
    return outcomes


@pytest.fixture(scope='module')
def fsdp2_runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp('fsdp2')
    mp.spawn(_fsdp2_on_rank, args=(str(folder), ), nprocs=2)
    return [torch.load(folder / f'rank{r}.pth', weights_only=True)
            for r in (0, 1)]


def test_fsdp2_shards_are_even_uneven_and_empty(fsdp2_runs):
    assert [runs['local_rows'] for runs in fsdp2_runs] == [
        {'conv.weight': 2, 'conv.bias': 2, 'fc.weight': 2, 'fc.bias': 2,
         'head.weight': 1, 'head.bias': 1},
        {'conv.weight': 1, 'conv.bias': 1, 'fc.weight': 2, 'fc.bias': 2,
         'head.weight': 0, 'head.bias': 0}]


@pytest.mark.parametrize('name', list(CASES))
def test_fsdp2_equals_one_process(fsdp2_runs, name):
    """Each rank centralizes its own rows: the weights equal the
    single-process run's, with no collective for GC in the optimizer step
    (the gradient reduce-scatter of backward is FSDP's own), and the state
    is DTensors."""
    want = reference(CASES[name])
    for rank, runs in enumerate(fsdp2_runs):
        run = runs[name]
        assert isinstance(run, dict), f'rank {rank}: {run}'
        for param, weight in want.items():
            torch.testing.assert_close(run['weights'][param], weight,
                                       rtol=1e-5, atol=1e-6, msg=param)
        # GradScaler's inf check all-reduces once per step (torch's, for
        # DTensor gradients); GC adds nothing.
        assert run['collectives'] == (STEPS if name.startswith('Amp') else 0)
        assert run['state_is_sharded']
    # GC made a difference here: the run without it ends elsewhere.
    without_gc = reference(dict(optimizer=dict(
        CASES[name]['optimizer'], gc_mode=None)) if 'type' not in CASES[name]
        else dict(CASES[name], gc_mode=None))
    assert not torch.allclose(without_gc['fc.weight'], want['fc.weight'])


def _fsdp1_on_rank(rank, folder):
    from torch.distributed.fsdp import FullyShardedDataParallel
    _init(rank, folder)
    cases = dict(CASES, **{'SGD_GC-off': dict(optimizer=dict(
        type='SGD_GC', gc_mode=None, **SGD))})
    results = {}
    for use_orig_params in (False, True):
        for name, cfg in cases.items():
            model = FullyShardedDataParallel(
                Net(), use_orig_params=use_orig_params,
                device_id=torch.device('cpu'))
            before = [p.detach().clone() for p in model.parameters()]
            try:
                train(model, cfg,
                      lambda step: batch(step)[2 * rank:2 * rank + 2])
                outcome = 'trained'
            except ValueError as error:
                outcome = str(error)
            unchanged = all(torch.equal(p, b) for p, b in zip(
                model.parameters(), before))
            results[name, use_orig_params] = outcome, unchanged
    torch.save(results, f'{folder}/rank{rank}.pth')
    torch.distributed.destroy_process_group()


def test_fsdp1_flat_shards_are_refused_before_the_first_step(tmp_path):
    """FSDP1 (either use_orig_params) hands the optimizer flat 1-D shards:
    every GC optimizer and both GC wrappers refuse them with one line that
    says why and what to use, before any weight moves; with GC off the
    same model trains."""
    mp.spawn(_fsdp1_on_rank, args=(str(tmp_path), ), nprocs=2)
    for rank in (0, 1):
        results = torch.load(tmp_path / f'rank{rank}.pth', weights_only=True)
        for (name, use_orig_params), (outcome, unchanged) in results.items():
            where = f'rank {rank}, {name}, use_orig_params={use_orig_params}'
            if name == 'SGD_GC-off':
                assert outcome == 'trained', where
                assert not unchanged, where
                continue
            assert 'FSDP1' in outcome and 'flat' in outcome, where
            assert 'GC would silently do nothing' in outcome, where
            assert 'fully_shard' in outcome and 'DDP' in outcome, where
            assert '\n' not in outcome, where
            assert unchanged, where


def _deepspeed_on_rank(rank, folder):
    os.environ['DS_ACCELERATOR'] = 'cpu'
    _init(rank, folder)
    import deepspeed
    from mmengine.registry import OPTIMIZERS
    deepspeed.init_distributed(dist_backend='gloo')  # takes the group above
    results = {}
    for stage in (0, 1, 2):
        for name in ('SGD_GC', 'Adam_GC'):
            model = Net()
            before = [p.detach().clone() for p in model.parameters()]
            optimizer = OPTIMIZERS.build(
                dict(CASES[name]['optimizer'], params=model.parameters()))
            engine, *_ = deepspeed.initialize(
                model=model, optimizer=optimizer, config=dict(
                    train_micro_batch_size_per_gpu=2, gradient_clipping=0.,
                    zero_optimization=dict(stage=stage),
                    zero_allow_untested_optimizer=True))
            try:
                for step in range(STEPS):
                    engine.backward(loss_of(
                        engine, batch(step)[2 * rank:2 * rank + 2]))
                    engine.step()
                outcome = {n: p.detach().clone()
                           for n, p in model.named_parameters()}
            except ValueError as error:
                outcome = str(error)
            unchanged = all(torch.equal(p, b) for p, b in zip(
                model.parameters(), before))
            results[name, stage] = outcome, unchanged
    torch.save(results, f'{folder}/rank{rank}.pth')
    torch.distributed.destroy_process_group()


def test_deepspeed_zero_1_2_refused_zero_0_exact(tmp_path):
    """DeepSpeed on CPU with gloo: ZeRO stage 0 hands the optimizer the
    weights (GC exact: the single-process run's weights); stages 1 and 2
    swap each group's parameters for one flat partition after the
    optimizer is built, refused at the first step before anything
    moves."""
    pytest.importorskip('deepspeed')
    mp.spawn(_deepspeed_on_rank, args=(str(tmp_path), ), nprocs=2)
    for rank in (0, 1):
        results = torch.load(tmp_path / f'rank{rank}.pth', weights_only=True)
        for (name, stage), (outcome, unchanged) in results.items():
            where = f'rank {rank}, {name}, ZeRO stage {stage}'
            if stage == 0:
                assert isinstance(outcome, dict), f'{where}: {outcome}'
                for param, weight in reference(CASES[name]).items():
                    torch.testing.assert_close(outcome[param], weight,
                                               rtol=1e-5, atol=1e-6)
                continue
            assert isinstance(outcome, str), where
            assert 'DeepSpeed ZeRO' in outcome, where
            assert 'GC would silently do nothing' in outcome, where
            assert 'stage 0' in outcome and 'fully_shard' in outcome, where
            assert unchanged, where


def test_rows_split_between_ranks_are_refused(fsdp2_runs):
    """A weight placed Shard(1) (its rows split between the ranks): one
    line naming its placement, before anything moves."""
    for runs in fsdp2_runs:
        for outcome in runs['rows_split']:
            assert 'Shard(dim=1)' in outcome and 'splits its rows' in outcome
            assert 'shape (3, 4)' in outcome and '\n' not in outcome


GC_WRAPPERS = [
    dict(optimizer=dict(type='SGD_GC', lr=0.1)),
    dict(optimizer=dict(type='Lookahead', optimizer=dict(type='Adam_GC'))),
    dict(optimizer=dict(type='Ranger')),
    dict(type='GCOptimWrapper', optimizer=dict(type='SGD', lr=0.1)),
]
NO_GC_WRAPPERS = [
    dict(optimizer=dict(type='SGD', lr=0.1)),
    dict(optimizer=dict(type='SGD_GC', lr=0.1, gc_mode=None)),
    dict(type='GCOptimWrapper', gc_mode=None,
         optimizer=dict(type='SGD', lr=0.1)),
]


@pytest.mark.parametrize('wrapper', GC_WRAPPERS)
def test_flexible_runner_strategies_that_lose_gc_are_refused(
        wrapper, tmp_path):
    """FlexibleRunner's FSDPStrategy (FSDP1) and DeepSpeedStrategy with ZeRO
    stages 1-3 or without DeepSpeedOptimWrapper: one line before the run;
    DeepSpeed's ZeRO stage 0 with a GC optimizer runs."""
    from mmengine.config import Config

    from gc_mm.checks import ConfigError, check_strategy
    ds_wrapper = dict(wrapper, type='DeepSpeedOptimWrapper')
    (tmp_path / 'ds.json').write_text('{"zero_optimization": {"stage": 2}}')
    refused = [
        (dict(type='FSDPStrategy'), wrapper, 'FSDP1'),
        (dict(type='DeepSpeedStrategy', zero_optimization=dict(stage=1)),
         ds_wrapper, 'ZeRO stage 1'),
        (dict(type='DeepSpeedStrategy', config=str(tmp_path / 'ds.json')),
         ds_wrapper, 'ZeRO stage 2'),
        (dict(type='DeepSpeedStrategy', zero_optimization=dict(stage=3)),
         ds_wrapper, 'ZeRO stage 3'),
    ]
    if 'type' in wrapper:  # a GC wrapper, where DeepSpeed needs its own
        refused = [refused[0], (dict(type='DeepSpeedStrategy'), wrapper,
                                "not 'GCOptimWrapper'")]
    for strategy, optim_wrapper, match in refused:
        with pytest.raises(ConfigError, match=match) as error:
            check_strategy(Config(dict(runner_type='FlexibleRunner',
                                       strategy=strategy,
                                       optim_wrapper=optim_wrapper)))
        assert '\n' not in str(error.value)
    if 'type' not in wrapper:
        check_strategy(Config(dict(
            runner_type='FlexibleRunner', optim_wrapper=ds_wrapper,
            strategy=dict(type='DeepSpeedStrategy',
                          zero_optimization=dict(stage=0)))))


@pytest.mark.parametrize('wrapper', NO_GC_WRAPPERS)
def test_flexible_runner_strategies_without_gc_pass(wrapper):
    from mmengine.config import Config

    from gc_mm.checks import check_strategy
    for strategy in (dict(type='FSDPStrategy'),
                     dict(type='DeepSpeedStrategy',
                          zero_optimization=dict(stage=2))):
        check_strategy(Config(dict(runner_type='FlexibleRunner',
                                   strategy=strategy,
                                   optim_wrapper=wrapper)))
