"""The real tools on real (small) data: train, test, resume, load_from, two
gloo processes, and bad input refused early."""
import glob
import json
import os
import os.path as osp
import random
import shutil
import subprocess
import sys
import types
import zipfile

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import gc_mm  # noqa: F401  (allow-lists the types of mmengine checkpoints)
from conftest import REPO, load_checkpoint, run_tool
from gc_mm.hooks import RandomStateHook

DEMO = osp.join(REPO, 'configs/demo/mask_rcnn_r18_fpn_gc_shapes.py')
BALLOON_GC = osp.join(REPO, 'configs/finetune/mask_rcnn_r50_gc_balloon.py')
TRAIN = osp.join(REPO, 'tools/train.py')
TEST = osp.join(REPO, 'tools/test.py')

# Few images, one epoch, no random flip (so a resumed run can be compared).
DEMO_SMALL = [
    'train_cfg.max_epochs=1', 'train_cfg.val_interval=1',
    'train_dataloader.dataset.indices=8', 'val_dataloader.dataset.indices=4',
    'train_dataloader.dataset.pipeline.3.prob=0.0',
    'randomness.seed=0', 'default_hooks.logger.interval=1'
]


def balloon_small(root):
    """A 4-image subset of balloon at a small scale, batch 2."""
    return [
        f'data_root={root}/', f'train_dataloader.dataset.data_root={root}/',
        f'val_dataloader.dataset.data_root={root}/',
        f'test_dataloader.dataset.data_root={root}/',
        f'val_evaluator.ann_file={root}/val/annotation_coco.json',
        f'test_evaluator.ann_file={root}/val/annotation_coco.json',
        'train_dataloader.dataset.indices=4',
        'val_dataloader.dataset.indices=2',
        'test_dataloader.dataset.indices=2',
        *[f'{loader}_dataloader.{key}' for loader in ('train', 'val', 'test')
          for key in ('num_workers=0', 'persistent_workers=False')],
        'train_dataloader.dataset.pipeline.2.scale=(320,256)',
        'val_dataloader.dataset.pipeline.1.scale=(320,256)',
        'test_dataloader.dataset.pipeline.1.scale=(320,256)',
        'train_cfg.max_epochs=1', 'train_cfg.val_interval=1',
        'model.backbone.init_cfg=None', 'load_from=None',
        'default_hooks.logger.interval=1', 'randomness.seed=0'
    ]


def scalars(work_dir):
    """The training scalars mmengine logged (vis_data/scalars.json)."""
    [path] = glob.glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json'))
    with open(path) as f:
        return [json.loads(line) for line in f]


def checkpoint(path):
    return load_checkpoint(path)  # weights_only=True where torch allows


@pytest.fixture(scope='module')
def demo_run(tmp_path_factory):
    """Train the GC demo for one short epoch through tools/train.py."""
    cwd = tmp_path_factory.mktemp('demo')
    work_dir = str(cwd / 'work')
    proc = run_tool([TRAIN, DEMO, '--work-dir', work_dir,
                     '--cfg-options', *DEMO_SMALL], cwd=cwd)
    return cwd, work_dir, proc


def test_demo_trains_evaluates_and_saves(demo_run):
    cwd, work_dir, proc = demo_run
    assert osp.isfile(cwd / 'data/shapes/train/annotation_coco.json')
    logs = scalars(work_dir)
    losses = [entry['loss'] for entry in logs if 'loss' in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert any('coco/bbox_mAP' in e and 'coco/segm_mAP' in e for e in logs)
    ckpt = checkpoint(osp.join(work_dir, 'epoch_1.pth'))
    assert ckpt['meta']['epoch'] == 1 and ckpt['meta']['iter'] == 2
    assert 'Gradient Centralization on' in proc.stdout
    assert f'Checkpoint: {work_dir}/epoch_1.pth' in proc.stdout


COUNT_LOADS = """
import atexit, os, runpy, sys
import torch
path = os.path.realpath(os.environ['COUNT_LOADS_OF'])
load, calls = torch.load, []
def counting_load(f, *args, **kwargs):
    if isinstance(f, (str, os.PathLike)) and os.path.realpath(f) == path:
        calls.append(f)
    return load(f, *args, **kwargs)
torch.load = counting_load
atexit.register(lambda: print(f'torch.load of the checkpoint: {len(calls)}'))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def counting_loads(folder, tool):
    """The command line that runs ``tool`` and prints how often it called
    torch.load on the file named by $COUNT_LOADS_OF."""
    wrapper = folder / 'count_loads.py'
    wrapper.write_text(COUNT_LOADS)
    return [str(wrapper), tool]


def test_test_py_evaluates_with_only_test_data_loading_once(demo_run,
                                                            tmp_path):
    """Evaluating a checkpoint needs only the test data (here the training
    set is a COCO dataset whose annotation file is absent), and the
    checkpoint is loaded once."""
    cwd, work_dir, _ = demo_run
    ckpt = osp.join(work_dir, 'epoch_1.pth')
    (tmp_path / 'coco').mkdir()
    proc = run_tool([*counting_loads(tmp_path, TEST), DEMO, ckpt,
                     '--work-dir', str(tmp_path / 'test'), '--cfg-options',
                     'test_dataloader.dataset.indices=4',
                     'train_dataloader.dataset.type=CocoDataset',
                     f'train_dataloader.dataset.data_root={tmp_path}/coco/',
                     'train_dataloader.dataset.ann_file='
                     'annotations/instances_train2017.json'],
                    cwd=cwd, env=dict(COUNT_LOADS_OF=ckpt))
    assert 'coco/bbox_mAP:' in proc.stdout and 'coco/segm_mAP:' in proc.stdout
    assert 'torch.load of the checkpoint: 1\n' in proc.stdout


def test_train_refuses_to_resume_from_weights_only(demo_run, tmp_path):
    """What the checkpoint holds is checked on the runner's load: a weights
    file cannot be resumed from."""
    cwd, work_dir, _ = demo_run
    weights = tmp_path / 'weights.pth'
    torch.save({'state_dict': checkpoint(osp.join(work_dir, 'epoch_1.pth'))[
        'state_dict']}, weights)
    proc = run_tool([TRAIN, DEMO, '--work-dir', str(tmp_path / 'w'),
                     '--resume', str(weights), '--cfg-options', *DEMO_SMALL],
                    cwd=cwd, check=False)
    assert proc.returncode != 0
    assert (f"error: --resume: '{weights}' is not a training checkpoint of "
            "MMEngine (missing ['meta', 'optimizer'])") in proc.stderr
    assert not glob.glob(str(tmp_path / 'w' / '*.pth'))


def demo_dumping_state(out_dir):
    """The demo config plus StateDumpHook: every rank saves its state."""
    path = out_dir / 'demo_dumping_state.py'
    path.write_text(
        f"_base_ = '{DEMO}'\n"
        "custom_imports = dict(imports=['gc_mm', 'gc_mm.datasets', "
        "'state_dump_hook'], allow_failed_imports=False)\n"
        f"custom_hooks = [dict(type='StateDumpHook', out_dir='{out_dir}')]\n")
    return str(path)


TEST_HOOK_ENV = dict(PYTHONPATH=osp.join(REPO, 'tests'))


def assert_same_epoch_2(straight, resumed):
    """Both runs' epoch_2.pth (iteration 4) hold the same model, bit for
    bit; returns the straight run's."""
    a = checkpoint(osp.join(straight, 'epoch_2.pth'))
    b = checkpoint(osp.join(resumed, 'epoch_2.pth'))
    assert a['meta']['iter'] == b['meta']['iter'] == 4
    for key, value in a['state_dict'].items():
        torch.testing.assert_close(b['state_dict'][key], value, rtol=0,
                                   atol=0, msg=key)
    return a


def test_resume_continues_at_the_right_iteration_with_identical_state(
        demo_run, tmp_path):
    """--resume from epoch_1.pth starts from exactly its model and optimizer
    state, at iteration 2, and ends where the uninterrupted run ended."""
    cwd, _, _ = demo_run
    two_epochs = [o.replace('max_epochs=1', 'max_epochs=2') for o in
                  DEMO_SMALL] + ['default_hooks.checkpoint.interval=1',
                                 'train_cfg.val_interval=10']
    straight = str(tmp_path / 'straight')
    run_tool([TRAIN, DEMO, '--work-dir', straight, '--cfg-options',
              *two_epochs], cwd=cwd)
    saved = checkpoint(osp.join(straight, 'epoch_1.pth'))
    assert 'random_state' in saved
    resumed = str(tmp_path / 'resumed')
    source = osp.join(straight, 'epoch_1.pth')
    proc = run_tool([*counting_loads(tmp_path, TRAIN),
                     demo_dumping_state(tmp_path), '--work-dir', resumed,
                     '--resume', source, '--cfg-options', *two_epochs],
                    cwd=cwd, env=dict(TEST_HOOK_ENV, COUNT_LOADS_OF=source))
    assert 'resumed epoch: 1, iter: 2' in proc.stdout
    assert 'torch.load of the checkpoint: 1\n' in proc.stdout
    start = torch.load(tmp_path / 'before_train_rank0.pth', weights_only=True)
    assert (start['epoch'], start['iter']) == (1, 2)
    for key, value in saved['state_dict'].items():
        torch.testing.assert_close(start['model'][key], value, rtol=0,
                                   atol=0, msg=key)
    want, got = saved['optimizer'], start['optimizer']
    assert got['param_groups'] == want['param_groups']
    assert got['state'].keys() == want['state'].keys()
    for index, state in want['state'].items():
        torch.testing.assert_close(got['state'][index]['momentum_buffer'],
                                   state['momentum_buffer'], rtol=0, atol=0)
    # Random states are checkpointed too: the resumed run ends bit-equal to
    # the uninterrupted one.
    a = assert_same_epoch_2(straight, resumed)
    assert not torch.equal(a['state_dict']['backbone.conv1.weight'],
                           saved['state_dict']['backbone.conv1.weight'])


def test_resume_validating_every_epoch_with_persistent_workers_is_bit_equal(
        demo_run, tmp_path):
    """As the paper configs run: validation after every epoch, two
    persistent workers per loader and the random flip on. Resumed from
    epoch_1.pth (saved before that epoch's validation, which the resumed
    run skips), the run ends bit-equal to the uninterrupted one."""
    cwd, _, _ = demo_run
    options = [o.replace('max_epochs=1', 'max_epochs=2') for o in DEMO_SMALL
               if 'pipeline.3.prob' not in o] + [
        'default_hooks.checkpoint.interval=1', 'train_cfg.val_interval=1',
        *[f'{loader}_dataloader.{key}' for loader in ('train', 'val')
          for key in ('num_workers=2', 'persistent_workers=True')]]
    straight = str(tmp_path / 'straight')
    run_tool([TRAIN, DEMO, '--work-dir', straight, '--cfg-options',
              *options], cwd=cwd)
    assert sum('coco/bbox_mAP' in e for e in scalars(straight)) == 2
    resumed = str(tmp_path / 'resumed')
    run_tool([TRAIN, DEMO, '--work-dir', resumed, '--resume',
              osp.join(straight, 'epoch_1.pth'), '--cfg-options', *options],
             cwd=cwd)
    assert_same_epoch_2(straight, resumed)


def test_amp_keeps_gc(demo_run):
    cwd, _, _ = demo_run
    work_dir = str(cwd / 'amp')
    run_tool([TRAIN, DEMO, '--amp', '--work-dir', work_dir,
                     '--cfg-options', *DEMO_SMALL,
                     'train_cfg.val_interval=10'], cwd=cwd)
    ckpt = checkpoint(osp.join(work_dir, 'epoch_1.pth'))
    assert 'loss_scaler' in ckpt['optimizer']
    # The optimizer is still SGD_GC: its groups carry a GC mode.
    assert ckpt['optimizer']['param_groups'][0]['gc_mode'] == 'conv_fc'


class OnAnotherDevice(torch.Tensor):
    """A tensor that says it lives on a GPU, as a checkpoint that MMEngine's
    resume loaded onto the runner's device does; its data (kept on the CPU)
    can only be read by copying it to the CPU."""

    @staticmethod
    def __new__(cls, data):
        return torch.Tensor._make_wrapper_subclass(
            cls, data.shape, dtype=data.dtype, strides=data.stride(),
            device=torch.device('cuda'))

    def __init__(self, data):
        self.cpu_data = data

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func is torch.ops.aten._to_copy.default
                and torch.device(kwargs.get('device', 'cuda')).type == 'cpu'):
            return args[0].cpu_data.clone()
        raise NotImplementedError(f'{func} of a tensor on another device')


def on_another_device(obj):
    """What map_location='cuda' makes of a checkpoint's tensors."""
    if torch.is_tensor(obj):
        return OnAnotherDevice(obj)
    if isinstance(obj, dict):
        return {k: on_another_device(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(on_another_device(v) for v in obj)
    return obj


def draws():
    return (random.random(), np.random.rand(), torch.rand(4).tolist())


def test_resume_restores_random_states_loaded_onto_a_gpu():
    """The hook's round trip, with the checkpoint's tensors on another
    device (torch's setters take CPU byte tensors only): the generators
    continue exactly the saved streams. The runner is the one attribute
    the hook reads at load."""
    hook, checkpoint = RandomStateHook(), {}
    runner = types.SimpleNamespace(_resume=True, iter=7, hooks=[hook])
    hook.before_save_checkpoint(runner, checkpoint)
    want = draws()
    draws()
    loaded = on_another_device(checkpoint)
    ranks = loaded['random_state'].get('ranks') or [loaded['random_state']]
    assert isinstance(ranks[0]['torch'], OnAnotherDevice)
    hook.after_load_checkpoint(runner, loaded)
    assert draws() == want


def _save_and_resume_on_two_ranks(rank, folder):
    torch.distributed.init_process_group(
        'gloo', init_method=f'file://{folder}/rendezvous', rank=rank,
        world_size=2)
    random.seed(rank)
    np.random.seed(rank)
    torch.manual_seed(rank)
    hook, checkpoint = RandomStateHook(), {}
    runner = types.SimpleNamespace(_resume=True, iter=3, hooks=[hook])
    hook.after_train_epoch(runner)  # every rank, before CheckpointHook
    if rank == 0:  # MMEngine saves on rank 0 only
        hook.before_save_checkpoint(runner, checkpoint)
        torch.save(checkpoint, f'{folder}/epoch_1.pth')
    want = draws()
    draws()
    torch.distributed.barrier()
    loaded = torch.load(f'{folder}/epoch_1.pth', weights_only=True)
    hook.after_load_checkpoint(runner, on_another_device(loaded))
    torch.save(dict(want=want, got=draws()), f'{folder}/rank{rank}.pth')
    torch.distributed.destroy_process_group()


def test_resume_restores_each_rank_its_own_random_states(tmp_path):
    """Two gloo processes with different seeds: the checkpoint (written by
    rank 0) holds both ranks' states, and each rank continues its own
    stream."""
    mp.spawn(_save_and_resume_on_two_ranks, args=(str(tmp_path), ), nprocs=2)
    results = [torch.load(tmp_path / f'rank{r}.pth', weights_only=True)
               for r in (0, 1)]
    assert results[0]['want'] != results[1]['want']
    for result in results:
        assert result['got'] == result['want']


@pytest.fixture(scope='module')
def balloon_run(tmp_path_factory, balloon):
    cwd = tmp_path_factory.mktemp('balloon')
    work_dir = str(cwd / 'work')
    run_tool([TRAIN, BALLOON_GC, '--work-dir', work_dir, '--cfg-options',
              *balloon_small(balloon)], cwd=cwd)
    return cwd, work_dir


def test_balloon_subset_trains_and_evaluates(balloon_run):
    _, work_dir = balloon_run
    logs = scalars(work_dir)
    losses = [e['loss'] for e in logs if 'loss' in e]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert any('coco/segm_mAP' in e for e in logs)
    assert osp.getsize(osp.join(work_dir, 'epoch_1.pth')) > 10**6


def test_load_from_fine_tunes_from_the_checkpoint(balloon_run, balloon):
    cwd, work_dir = balloon_run
    source = osp.join(work_dir, 'epoch_1.pth')
    tuned = str(cwd / 'tuned')
    options = [o for o in balloon_small(balloon) if o != 'load_from=None']
    proc = run_tool([TRAIN, BALLOON_GC, '--work-dir', tuned,
                     '--cfg-options', *options, f'load_from={source}',
                     'optim_wrapper.optimizer.lr=0.0'], cwd=cwd)
    assert f'Load checkpoint from {source}' in proc.stdout
    # With lr 0 the fine-tuned weights are exactly the loaded ones.
    a = checkpoint(source)['state_dict']
    b = checkpoint(osp.join(tuned, 'epoch_1.pth'))['state_dict']
    for key in ('backbone.layer4.2.conv3.weight', 'roi_head.bbox_head.fc_cls.weight'):
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0)


def test_dist_train_two_gloo_processes_end_identical(tmp_path):
    proc = run_tool(
        [osp.join(REPO, 'tools/dist_train.sh'), demo_dumping_state(tmp_path),
         '2', '--work-dir', str(tmp_path / 'work'), '--cfg-options',
         *DEMO_SMALL, 'train_cfg.val_interval=10',
         'randomness.diff_rank_seed=True'],
        cwd=tmp_path,
        env=dict(TEST_HOOK_ENV, PORT=str(29500 + os.getpid() % 1000)))
    assert 'distributed training uses the gloo backend' in proc.stdout
    # Rank 0 wrote the checkpoint, with both ranks' random states.
    saved = checkpoint(tmp_path / 'work' / 'epoch_1.pth')['random_state']
    assert len(saved['ranks']) == 2
    assert not torch.equal(saved['ranks'][0]['torch'],
                           saved['ranks'][1]['torch'])
    ranks = [torch.load(tmp_path / f'after_train_rank{r}.pth',
                        weights_only=True) for r in (0, 1)]
    start = torch.load(tmp_path / 'before_train_rank0.pth', weights_only=True)
    assert ranks[0]['iter'] == ranks[1]['iter'] == 1  # 8 images / (2 x 4)
    # Parameters, not buffers: BN running statistics are per rank (mmengine's
    # DDP does not broadcast buffers), as on GPUs without SyncBN.
    model0, model1 = ranks[0]['params'], ranks[1]['params']
    assert model0.keys() == model1.keys() and len(model0) > 50
    for key in model0:
        torch.testing.assert_close(model1[key], model0[key], rtol=0, atol=0,
                                   msg=key)
    # They trained: the shared weights moved away from the start.
    assert not torch.equal(model0['backbone.conv1.weight'],
                           start['params']['backbone.conv1.weight'])


@pytest.mark.parametrize('option,message', [
    ('train_dataloader.dataset.data_root=/nonexistent/', 'data_root'),
    ('optim_wrapper.optimizer.type=SGD_GCX', "Did you mean 'SGD_GC'"),
])
def test_train_refuses_bad_config_before_training(option, message, tmp_path):
    proc = run_tool([TRAIN, BALLOON_GC, '--work-dir', str(tmp_path / 'w'),
                     '--cfg-options', option], cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr
    # mmengine imported pkg_resources (twice) to read the mmdet:: configs;
    # setuptools' deprecation warning about it is not shown.
    assert 'pkg_resources' not in proc.stderr
    assert not (tmp_path / 'w').exists() or not glob.glob(
        str(tmp_path / 'w' / '*.pth'))


def test_benchmark_runs_and_writes_json(tmp_path):
    """A smoke run of the benchmark on the demo model (timings are only
    reported, never asserted)."""
    out = tmp_path / 'bench.json'
    demo = osp.join(REPO, 'configs/demo/mask_rcnn_r18_fpn_shapes.py')
    proc = run_tool([osp.join(REPO, 'tools/analysis/benchmark_gc.py'),
                     '--config', demo, '--repeats', '1', '--warmup', '0',
                     '--e2e', '3', '--e2e-repeats', '1',
                     '--e2e-step-repeats', '1', '--e2e-config', demo,
                     '--e2e-twin', demo.replace('_shapes', '_gc_shapes'),
                     '--json', str(out)], cwd=tmp_path)
    report = json.loads(out.read_text())
    assert report['tensors'] > 50
    for family in ('sgd', 'adam', 'adamw', 'adagrad', 'radam'):
        assert all(r['ms'] > 0 and r['transient_mb'] >= 0
                   for r in report[family].values())
    assert "authors' SGD_GC (per tensor)" in proc.stdout
    # The kernels installed by tools/install.sh are the defaults on CPU.
    for kernel in ('sgd', 'adaptive'):
        assert report[f'{kernel}_kernel_installed']
        assert report[f'{kernel}_kernel_load_s'] >= 0
    assert 'gc_mm SGD_GC (default: C++ kernel)' in report['sgd']
    # torch's fastest steps are among those compared (each family against
    # its own base optimizer), and the wrapper wraps them.
    for family, names in {
            'sgd': ['torch SGD fused', 'GCOptimWrapper(SGD fused)',
                    'GCOptimWrapper(SGD for-loop)'],
            'adam': ['torch Adam fused', 'gc_mm Adam_GC2',
                     'GCOptimWrapper(Adam fused)'],
            'adamw': ['torch AdamW fused', 'gc_mm AdamW_GC',
                      'GCOptimWrapper(AdamW fused)'],
            'adagrad': ['torch Adagrad fused', 'gc_mm Adagrad_GCC'],
            'radam': ['torch RAdam foreach', 'gc_mm Ranger (k=6)']}.items():
        assert set(names) <= set(report[family]), family
    # The end-to-end mode compares the real twin pair, not a config with
    # itself.
    e2e = report['e2e']
    assert (e2e['baseline optimizer'], e2e['GC twin optimizer']) == (
        'SGD', 'SGD_GC')
    assert e2e['baseline step'] > 0 and e2e['GC twin step'] > 0


def test_benchmark_variants_step_off_the_cpu():
    """Off the CPU (here the meta device, which runs every op without data)
    the benchmark times SGD_GC's multi-tensor default and leaves out the
    CPU-only kernel, and torch's fused steps where torch has none; every
    variant builds and steps."""
    sys.path.insert(0, osp.join(REPO, 'tools/analysis'))
    try:
        import benchmark_gc
    finally:
        sys.path.pop(0)
    shapes = [(8, 3, 3, 3), (8, ), (4, 8, 1, 1), (10, 8)]
    device = torch.device('meta')
    families = {'sgd': 6, 'adam': 8, 'adamw': 7, 'adagrad': 4, 'radam': 8}
    for family, count in families.items():
        results = benchmark_gc.time_steps(shapes, family, device, 1, 0)
        assert len(results) == count and all(
            r['ms'] > 0 for r in results.values())
    assert not any('fused' in name for family in families
                   for name in benchmark_gc.variants(family, device))
    assert list(benchmark_gc.variants('sgd', device))[2:4] == [
        'gc_mm SGD_GC (default: multi-tensor)', 'gc_mm SGD_GC (plain path)']
    # --only keeps the variants it matches and torch's own steps.
    only = benchmark_gc.time_steps(shapes, 'adamw', device, 1, 0,
                                   only='AdamW_GC2')
    assert list(only) == ['torch AdamW foreach', 'torch AdamW for-loop',
                          'gc_mm AdamW_GC2']


BENCHMARK = osp.join(REPO, 'tools/analysis/benchmark_gc.py')
SHAPES = {'configs/mask_rcnn_r50_gc.py': 'mask_rcnn_r50_fpn.json',
          'configs/mask_rcnn_x101_64x4d_gc.py':
          'mask_rcnn_x101_64x4d_fpn.json'}
# The benchmark run where mmdet and mmcv cannot be imported (as on the GPU
# machine of tools/analysis/device_check.sh).
WITHOUT_MMDET = """
import runpy, sys
sys.modules['mmdet'] = sys.modules['mmcv'] = None
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def test_benchmark_times_saved_shapes_without_mmdet(tmp_path):
    """--dump-shapes writes the trainable parameters the GC twin's optimizer
    steps, in its order, and which of them get GC; --shapes times tensors of
    those shapes without mmdet (here briefly, on CPU) and writes JSON and a
    Markdown table; a file that is not such a list is refused in one
    line."""
    demo = osp.join(REPO, 'configs/demo/mask_rcnn_r18_fpn_gc_shapes.py')
    shapes = tmp_path / 'shapes.json'
    run_tool([BENCHMARK, '--config', demo, '--dump-shapes', str(shapes)],
             cwd=tmp_path)
    spec = json.loads(shapes.read_text())
    sys.path.insert(0, osp.join(REPO, 'tools/analysis'))
    try:
        import benchmark_gc
    finally:
        sys.path.pop(0)
    _, model = benchmark_gc.build_model(demo)
    trainable = [(n, list(p.shape)) for n, p in model.named_parameters()
                 if p.requires_grad]
    assert [(p['name'], p['shape']) for p in spec['params']] == trainable
    # SGD_GC centralizes conv and fc weights (ndim > 1), nothing else.
    assert [p['gc'] for p in spec['params']] == [
        len(shape) > 1 for _, shape in trainable]
    assert spec['optimizer'] == 'SGD_GC' and spec['tensors'] == len(trainable)
    assert 0 < spec['gc_tensors'] < spec['tensors']

    out, table = tmp_path / 'bench.json', tmp_path / 'bench.md'
    proc = subprocess.run(
        [sys.executable, '-c', WITHOUT_MMDET, BENCHMARK, '--shapes',
         str(shapes), '--device', 'cpu', '--families', 'sgd', 'adamw',
         '--repeats', '1', '--warmup', '0', '--json', str(out), '--markdown',
         str(table)], cwd=tmp_path, capture_output=True, text=True,
        timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert (report['tensors'], report['parameters'], report['gc_tensors']) == (
        spec['tensors'], spec['parameters'], spec['gc_tensors'])
    assert report['shapes'] == str(shapes) and report['config'] == demo
    assert set(report) >= {'sgd', 'adamw'} and 'adam' not in report
    rows = [line for line in table.read_text().splitlines()
            if line.startswith('| sgd |') or line.startswith('| adamw |')]
    assert len(rows) == len(report['sgd']) + len(report['adamw'])
    assert '| sgd | torch SGD fused |' in table.read_text()

    shapes.write_text('{"params": [{"shape": "3x3"}]}')
    proc = run_tool([BENCHMARK, '--shapes', str(shapes)], cwd=tmp_path,
                    check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f'--shapes {shapes}: not a shapes file written by --dump-shapes')


@pytest.mark.parametrize('config', list(SHAPES))
def test_shipped_shapes_are_the_models(config, monkeypatch):
    """tools/analysis/shapes/ holds what --dump-shapes writes for the Mask
    R-CNN GC twins today (the GPU check times these shapes)."""
    sys.path.insert(0, osp.join(REPO, 'tools/analysis'))
    try:
        import benchmark_gc
    finally:
        sys.path.pop(0)
    shipped = osp.join(REPO, 'tools/analysis/shapes', SHAPES[config])
    with open(shipped) as f:
        want = json.load(f)
    monkeypatch.chdir(REPO)  # the files name their configs from there
    got = benchmark_gc.dump_shapes(config, os.devnull)
    assert got == want


FAILING_CXX = """#!/bin/sh
# A C++ compiler that answers version queries and fails every compile.
case "$1" in --version|-v|-dumpversion|-dumpfullversion)
    [ -n "$REAL_CXX" ] && exec "$REAL_CXX" "$@";; esac
echo 'c++: cannot compile here' >&2
exit 1
"""

STEP_WITHOUT_KERNEL = """
import torch, gc_mm, gc_mm.kernels
assert gc_mm.__file__.startswith(%r), gc_mm.__file__
assert all(gc_mm.kernels.installed(k) is None for k in gc_mm.kernels.KERNELS)
w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
g = torch.randn_like(w)
centralized = g - g.mean(dim=(1, 2, 3), keepdim=True)
p = torch.nn.Parameter(w.clone())
p.grad = g.clone()
gc_mm.SGD_GC([p], lr=0.1, momentum=0.9).step()
torch.testing.assert_close(p.detach(), w - 0.1 * centralized, rtol=0,
                           atol=1e-15)
# Adagrad's first step (sum 0): w - lr * d / (|d| + eps), d centralized.
q = torch.nn.Parameter(w.clone())
q.grad = g.clone()
gc_mm.optimizers.Adagrad_GC([q], lr=0.1).step()
torch.testing.assert_close(
    q.detach(), w - 0.1 * centralized / (centralized.abs() + 1e-10),
    rtol=0, atol=1e-12)
print('stepped without a kernel')
"""


def test_installs_and_steps_without_a_working_compiler(tmp_path):
    """pip builds gc_mm with a compiler that fails every compile: the wheel
    has no kernel, and SGD_GC and Adagrad_GC import and step without
    one."""
    src = tmp_path / 'src'
    shutil.copytree(osp.join(REPO, 'gc_mm'), src / 'gc_mm',
                    ignore=shutil.ignore_patterns('*.so', '__pycache__'))
    for name in ('setup.py', 'README.md'):
        shutil.copy(osp.join(REPO, name), src)
    cxx = tmp_path / 'c++'
    cxx.write_text(FAILING_CXX)
    cxx.chmod(0o755)
    env = dict(os.environ, CXX=str(cxx), CC=str(cxx),
               REAL_CXX=shutil.which('c++') or '')
    proc = subprocess.run(
        [sys.executable, '-m', 'pip', 'wheel', '-v', '--no-deps',
         '--no-build-isolation', '--use-pep517', '-w', str(tmp_path / 'w'),
         str(src)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert 'the C++ kernels did not compile' in proc.stdout + proc.stderr
    [wheel] = glob.glob(str(tmp_path / 'w' / 'gc_mm-*.whl'))
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        # The sources, for fused=True to compile on first use.
        assert {'gc_mm/kernels/sgd.cpp', 'gc_mm/kernels/adaptive.cpp',
                'gc_mm/kernels/rows.h'} <= set(names)
        assert not [n for n in names if n.endswith('.so')]
        archive.extractall(tmp_path / 'site')
    site = str(tmp_path / 'site')
    proc = subprocess.run(
        [sys.executable, '-c', STEP_WITHOUT_KERNEL % site],
        env=dict(os.environ, PYTHONPATH=site), capture_output=True,
        text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'stepped without a kernel' in proc.stdout
