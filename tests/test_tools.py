"""The real tools on real (small) data: train, test, resume, load_from, two
gloo processes, and bad input refused early."""
import glob
import json
import os
import os.path as osp
import sys

import pytest
import torch

import gc_mm  # noqa: F401  (allow-lists the types of mmengine checkpoints)
from conftest import REPO, run_tool

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
    return torch.load(path, map_location='cpu', weights_only=True)


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


def test_test_py_evaluates_the_checkpoint(demo_run):
    cwd, work_dir, _ = demo_run
    proc = run_tool([TEST, DEMO, osp.join(work_dir, 'epoch_1.pth'),
                     '--work-dir', str(cwd / 'test'), '--cfg-options',
                     'test_dataloader.dataset.indices=4'], cwd=cwd)
    assert 'coco/bbox_mAP:' in proc.stdout and 'coco/segm_mAP:' in proc.stdout


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
    proc = run_tool([TRAIN, demo_dumping_state(tmp_path), '--work-dir',
                     resumed, '--resume', osp.join(straight, 'epoch_1.pth'),
                     '--cfg-options', *two_epochs],
                    cwd=cwd, env=TEST_HOOK_ENV)
    assert 'resumed epoch: 1, iter: 2' in proc.stdout
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
    a = checkpoint(osp.join(straight, 'epoch_2.pth'))
    b = checkpoint(osp.join(resumed, 'epoch_2.pth'))
    assert a['meta']['iter'] == b['meta']['iter'] == 4
    for key, value in a['state_dict'].items():
        torch.testing.assert_close(b['state_dict'][key], value, rtol=0,
                                   atol=0, msg=key)
    assert not torch.equal(a['state_dict']['backbone.conv1.weight'],
                           saved['state_dict']['backbone.conv1.weight'])


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
         *DEMO_SMALL, 'train_cfg.val_interval=10'],
        cwd=tmp_path,
        env=dict(TEST_HOOK_ENV, PORT=str(29500 + os.getpid() % 1000)))
    assert 'distributed training uses the gloo backend' in proc.stdout
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
    for family in ('sgd', 'adam'):
        assert all(r['ms'] > 0 for r in report[family].values())
    assert "authors' SGD_GC (per tensor)" in proc.stdout
    # The kernel installed by tools/install.sh is SGD_GC's default on CPU.
    assert report['kernel_installed'] and report['kernel_load_s'] >= 0
    assert 'gc_mm SGD_GC (default: C++ kernel)' in report['sgd']
    # torch's fastest steps are among those compared, and the wrapper
    # wraps them.
    for name in ('torch SGD fused', 'GCOptimWrapper(torch SGD fused)'):
        assert name in report['sgd']
    for name in ('torch Adam fused', 'torch AdamW fused',
                 'GCOptimWrapper(torch AdamW fused)'):
        assert name in report['adam']
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
    for family, count in (('sgd', 6), ('adam', 7)):
        results = benchmark_gc.time_steps(shapes, family, device, 1, 0)
        assert len(results) == count and all(
            r['ms'] > 0 for r in results.values())
    assert not any('fused' in name for family in ('sgd', 'adam')
                   for name in benchmark_gc.variants(family, device))
    assert list(benchmark_gc.variants('sgd', device))[2:4] == [
        'gc_mm SGD_GC (default: multi-tensor)', 'gc_mm SGD_GC (plain path)']
