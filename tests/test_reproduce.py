"""tools/reproduce_paper.py: which pairs it runs, and the commands."""
import os.path as osp

from conftest import REPO, run_tool

PAPER_BASELINES = [
    'faster_rcnn_r101', 'faster_rcnn_r50', 'faster_rcnn_x101_32x4d',
    'faster_rcnn_x101_64x4d', 'mask_rcnn_r101', 'mask_rcnn_r101_gn',
    'mask_rcnn_r101_gn_ws', 'mask_rcnn_r50', 'mask_rcnn_r50_4conv1fc',
    'mask_rcnn_r50_gn_ws', 'mask_rcnn_x101_32x4d', 'mask_rcnn_x101_64x4d'
]


def dry_run(*args):
    proc = run_tool(['tools/reproduce_paper.py', '--dry-run', *args],
                    cwd=REPO)
    return [line[2:] for line in proc.stdout.splitlines()
            if line.startswith('+ ')]


def test_dry_run_prints_every_pair_seed_and_step_in_order(tmp_path):
    root = str(tmp_path / 'paper')
    lines = dry_run('--seeds', '0', '3', '--gpus', '8', '--work-root', root)
    # Per pair: baseline and twin, two seeds each, train then test; then
    # the table.
    assert len(lines) == len(PAPER_BASELINES) * 2 * 2 * 2 + 1
    trained = [line for line in lines if 'dist_train.sh' in line]
    expected = [(config, seed) for baseline in PAPER_BASELINES
                for config in (baseline, baseline + '_gc')
                for seed in (0, 3)]
    for line, (config, seed) in zip(trained, expected):
        work_dir = osp.join(root, f'{config}_s{seed}')
        assert line == (f'bash tools/dist_train.sh configs/{config}.py 8 '
                        f'--work-dir {work_dir} --resume --cfg-options '
                        f'randomness.seed={seed}')
        test = lines[lines.index(line) + 1]
        assert test == (f'bash tools/dist_test.sh configs/{config}.py '
                        f'@{work_dir}/last_checkpoint 8 --work-dir '
                        f'{work_dir}_test')
    work_dirs = ' '.join(osp.join(root, f'{config}_s{seed}')
                         for config, seed in expected)
    assert lines[-1].endswith(f'tools/analysis/gc_table.py {work_dirs} '
                              f'--csv {root}/gc_table.csv')
    assert not osp.exists(root)  # a dry run runs nothing


def test_dry_run_of_a_subset_on_slurm(tmp_path):
    lines = dry_run('--configs', 'mask_rcnn_r50', '--slurm', 'gpu',
                    '--gpus', '16', '--work-root', str(tmp_path))
    assert len(lines) == 2 * 2 + 1
    assert lines[0].startswith('bash tools/slurm_train.sh gpu '
                               'mask_rcnn_r50_s0 configs/mask_rcnn_r50.py ')
    assert lines[2].startswith('bash tools/slurm_train.sh gpu '
                               'mask_rcnn_r50_gc_s0 '
                               'configs/mask_rcnn_r50_gc.py ')
    assert lines[1].startswith('bash tools/slurm_test.sh gpu '
                               'mask_rcnn_r50_s0_test '
                               'configs/mask_rcnn_r50.py @')


def test_unknown_config_is_refused_naming_it():
    proc = run_tool(['tools/reproduce_paper.py', '--dry-run', '--configs',
                     'mask_rcnn_r50', 'mask_rcnn_r77'], cwd=REPO, check=False)
    assert proc.returncode != 0
    assert 'no twin pair for mask_rcnn_r77' in proc.stderr
    assert '+ ' not in proc.stdout  # refused before printing any command


def test_relative_work_root_is_the_callers(tmp_path):
    """--work-root relative to where the tool is run from, not to the
    repository where its jobs run: every path it prints is absolute."""
    caller = tmp_path / 'elsewhere'
    caller.mkdir()
    proc = run_tool([osp.join(REPO, 'tools/reproduce_paper.py'), '--dry-run',
                     '--configs', 'mask_rcnn_r50', '--work-root', 'runs'],
                    cwd=caller)
    root = caller / 'runs'
    assert (f'--work-dir {root}/mask_rcnn_r50_s0 --resume' in proc.stdout)
    assert f' @{root}/mask_rcnn_r50_gc_s0/last_checkpoint 8 ' in proc.stdout
    assert f'--csv {root}/gc_table.csv' in proc.stdout


def test_runs_the_demo_pair_and_tabulates_it(tmp_path):
    """A real run, the demo pair on CPU (one process per job, a few
    images, one epoch): both runs trained, tested from their own last
    checkpoint, and counted in the table. Run from outside the repository
    with a relative --work-root (the jobs run in the repository)."""
    from test_tools import DEMO_SMALL
    root = tmp_path / 'runs'
    proc = run_tool(
        [osp.join(REPO, 'tools/reproduce_paper.py'), '--config-dir',
         'configs/demo', '--gpus', '1', '--seeds', '7', '--work-root', 'runs',
         '--cfg-options', *DEMO_SMALL,
         f'train_dataloader.dataset.data_root={tmp_path}/shapes/',
         f'val_dataloader.dataset.data_root={tmp_path}/shapes/',
         f'test_dataloader.dataset.data_root={tmp_path}/shapes/',
         f'val_evaluator.ann_file={tmp_path}/shapes/val/annotation_coco.json',
         f'test_evaluator.ann_file={tmp_path}/shapes/val/annotation_coco.json'
         ],
        cwd=tmp_path, env=dict(PORT='29611'))
    for config in ('mask_rcnn_r18_fpn_shapes', 'mask_rcnn_r18_fpn_gc_shapes'):
        work_dir = root / f'{config}_s7'
        checkpoint = (work_dir / 'last_checkpoint').read_text().strip()
        assert osp.basename(checkpoint) == 'epoch_1.pth'
        assert (f'bash tools/dist_test.sh configs/demo/{config}.py '
                f'@{work_dir}/last_checkpoint 1') in proc.stdout
        assert list(root.glob(f'{config}_s7_test/*/*.json'))  # metrics
    assert (root / 'gc_table.csv').is_file()
    assert 'mask_rcnn_r18_fpn_gc_shapes' in proc.stdout
    assert 'run(s) not counted' not in proc.stdout
    table = [line for line in proc.stdout.splitlines()
             if line.startswith('| mask_rcnn_r18_fpn_shapes | '
                                'mask_rcnn_r18_fpn_gc_shapes | box AP |')]
    assert len(table) == 1 and '| 1/1 |' in table[0]
