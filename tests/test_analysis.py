"""tools/analysis/gc_table.py and plot_runs.py on real work_dirs: the demo
and its GC twin, two seeds each, trained for two short epochs by
tools/train.py with GradStatsHook and validation on."""
import csv
import glob
import json
import math
import os
import os.path as osp
import re
import shutil
import statistics
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest

from conftest import REPO, run_tool
from test_tools import DEMO_SMALL

TRAIN = osp.join(REPO, 'tools/train.py')
TABLE = osp.join(REPO, 'tools/analysis/gc_table.py')
PLOT = osp.join(REPO, 'tools/analysis/plot_runs.py')
BASE, TWIN = 'mask_rcnn_r18_fpn_shapes', 'mask_rcnn_r18_fpn_gc_shapes'
SEEDS = (0, 1)
# Four train images at batch 4: one iteration per epoch, validated after
# each of the two epochs.
SMALL = [o.replace('max_epochs=1', 'max_epochs=2').replace(
    'indices=8', 'indices=4') for o in DEMO_SMALL if 'seed' not in o]
KEYS = [f'coco/{task}_mAP{suffix}' for task in ('bbox', 'segm')
        for suffix in ('', '_50', '_75')]
LABELS = ['box AP', 'box AP50', 'box AP75', 'mask AP', 'mask AP50',
          'mask AP75']


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """work/<config>_s<seed>: each a real run of tools/train.py. The
    configs are the demo twins (same names, so the dumps pair them) plus
    GradStatsHook at every iteration."""
    root = tmp_path_factory.mktemp('analysis')
    for name in (BASE, TWIN):
        (root / f'{name}.py').write_text(
            f"_base_ = '{REPO}/configs/demo/{name}.py'\n"
            "custom_hooks = [dict(type='GradStatsHook', interval=1)]\n")
    # The shapes data is generated on first use: once, before the runs.
    jobs = [(name, seed) for seed in SEEDS for name in (BASE, TWIN)]
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')
    work = {}
    for batch in (jobs[:1], jobs[1:]):
        procs = []
        for name, seed in batch:
            work[name, seed] = str(root / 'work' / f'{name}_s{seed}')
            procs.append(subprocess.Popen(
                [sys.executable, TRAIN, str(root / f'{name}.py'),
                 '--work-dir', work[name, seed], '--cfg-options', *SMALL,
                 f'randomness.seed={seed}'],
                cwd=root, env=env, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True))
        for proc in procs:
            out, _ = proc.communicate(timeout=600)
            assert proc.returncode == 0, out[-4000:]
    return root, work


def scalars(work_dir):
    [path] = glob.glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json'))
    with open(path) as f:
        return path, [json.loads(line) for line in f]


def copy_run(source, dest):
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns('*.pth'))
    return str(dest)


def rewrite(work_dir, keep=lambda record: True, change=lambda record: None):
    path, records = scalars(work_dir)
    with open(path, 'w') as f:
        for record in records:
            if keep(record):
                change(record)
                f.write(json.dumps(record) + '\n')


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def final_metrics(work_dir, best=False):
    """AP (points) of the validation after epoch 2, or of the one with the
    highest box AP (the first such), read straight from scalars.json."""
    vals = [r for r in scalars(work_dir)[1] if 'coco/bbox_mAP' in r]
    if best:
        record = max(vals, key=lambda r: r['coco/bbox_mAP'])
    else:
        [record] = [r for r in vals if r['step'] == 2]
    return [100 * record[key] for key in KEYS]


def table(work_dirs, tmp_path, *options):
    out = str(tmp_path / 'table.csv')
    proc = run_tool([TABLE, *work_dirs, '--csv', out, *options],
                    cwd=tmp_path)
    return proc.stdout, read_csv(out), read_csv(out[:-4] + '_runs.csv')


def check_rows(rows, base_values, twin_values):
    """The table's rows are the mean, sample std and difference of the
    given per-run values (one list of six metrics per run)."""
    assert [row['metric'] for row in rows] == LABELS
    for index, row in enumerate(rows):
        a = [values[index] for values in base_values]
        b = [values[index] for values in twin_values]
        assert (int(row['n_baseline']), int(row['n_twin'])) == (len(a),
                                                                len(b))
        assert float(row['baseline_mean']) == pytest.approx(
            statistics.fmean(a), abs=1e-9)
        assert float(row['twin_mean']) == pytest.approx(
            statistics.fmean(b), abs=1e-9)
        assert float(row['delta']) == pytest.approx(
            statistics.fmean(b) - statistics.fmean(a), abs=1e-9)
        if len(a) > 1:
            assert float(row['baseline_std']) == pytest.approx(
                statistics.stdev(a), abs=1e-9)
            assert float(row['twin_std']) == pytest.approx(
                statistics.stdev(b), abs=1e-9)


@pytest.mark.parametrize('metric', ['final', 'best'])
def test_table_means_and_delta_are_those_of_the_logged_metrics(
        runs, tmp_path, metric):
    root, work = runs
    stdout, rows, per_run = table([str(root / 'work')], tmp_path,
                                  '--metric', metric)
    best = metric == 'best'
    check_rows(rows, [final_metrics(work[BASE, s], best) for s in SEEDS],
               [final_metrics(work[TWIN, s], best) for s in SEEDS])
    assert {(row['baseline'], row['twin']) for row in rows} == {(BASE, TWIN)}
    assert sorted((r['config'], r['seed'], r['not_counted'])
                  for r in per_run) == sorted(
                      (name, str(seed), '') for name, seed in work)
    assert f'| {BASE} | {TWIN} | box AP | 2/2 |' in stdout
    assert 'not counted' not in stdout


def test_table_lists_unfinished_and_metricless_runs(runs, tmp_path):
    """A run killed after epoch 1 and a run whose validation metrics are
    gone are listed with the reason, and the means are of the others."""
    _, work = runs
    cut = copy_run(work[BASE, 1], tmp_path / 'cut')
    # Iteration 2 is epoch 2, validated at step 2: all of it goes, but for
    # the start of a line cut short when the run was killed.
    rewrite(cut, keep=lambda r: r['step'] != 2)
    path, records = scalars(cut)
    with open(path, 'a') as f:
        f.write('{"lr": 0.0004, "loss": 3.8')
    bare = copy_run(work[TWIN, 1], tmp_path / 'bare')
    rewrite(bare, keep=lambda r: 'coco/bbox_mAP' not in r)
    stdout, rows, per_run = table(
        [work[BASE, 0], work[TWIN, 0], cut, bare], tmp_path)
    check_rows(rows, [final_metrics(work[BASE, 0])],
               [final_metrics(work[TWIN, 0])])
    reasons = {r['work_dir']: r['not_counted'] for r in per_run}
    assert reasons[cut] == 'unfinished: 1 of 2 epochs'
    assert reasons[bare] == ('no validation metrics at the end of '
                             'training')
    assert '2 run(s) not counted:' in stdout
    assert f'- {cut} ({BASE} seed 1): {reasons[cut]}' in stdout
    assert (f'- {cut} ({BASE} seed 1): {path}: line {len(records) + 1} '
            'skipped (cut short by an interrupted launch)') in stdout
    assert f'- {bare} ({TWIN} seed 1): no validation metrics' in stdout


def test_table_counts_a_resumed_run_whose_first_launch_was_cut_short(
        runs, tmp_path):
    """A launch killed while logging leaves a partial last line in its
    scalars.json; resumed, the run finished: the line is skipped with a
    note and the run is counted with its final metrics (issue 26)."""
    _, work = runs
    resumed = copy_run(work[BASE, 1], tmp_path / 'resumed')
    path, records = scalars(resumed)
    # Launch 1 logged epoch 1 and was killed writing a line of epoch 2;
    # launch 2 (a later timestamp) logged epoch 2.
    rewrite(resumed, keep=lambda r: r['step'] == 1)
    with open(path, 'a') as f:
        f.write('{"lr": 0.0004, "loss": 3.8')
    later = osp.join(resumed, '29991231_235959', 'vis_data')
    os.makedirs(later)
    with open(osp.join(later, 'scalars.json'), 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in records
                     if r['step'] != 1)
    stdout, rows, per_run = table(
        [work[BASE, 0], work[TWIN, 0], work[TWIN, 1], resumed], tmp_path)
    check_rows(rows, [final_metrics(work[BASE, 0]),
                      final_metrics(work[BASE, 1])],
               [final_metrics(work[TWIN, s]) for s in SEEDS])
    assert {r['work_dir']: r['not_counted'] for r in per_run}[resumed] == ''
    assert 'not counted' not in stdout
    lines = sum(1 for _ in open(path))
    assert (f'- {resumed} ({BASE} seed 1): {path}: line {lines} skipped '
            '(cut short by an interrupted launch)') in stdout


def test_table_leaves_out_the_work_dirs_of_tests(runs, tmp_path):
    """tools/test.py's work_dir beside a run (reproduce_paper's
    ``<run>_test``) is no run: told by what it holds (test metrics, no
    training log), under any name; named if given as a run."""
    root, work = runs
    tree = tmp_path / 'paper'
    for (name, seed), work_dir in work.items():
        copy_run(work_dir, tree / f'{name}_s{seed}')
    for name in (f'{BASE}_s0_test', 'evaluated'):
        run_tool([osp.join(REPO, 'tools/test.py'),
                  osp.join(work[BASE, 0], f'{BASE}.py'),
                  osp.join(work[BASE, 0], 'epoch_2.pth'),
                  '--work-dir', str(tree / name), '--cfg-options',
                  'test_dataloader.dataset.indices=4'], cwd=root)
        assert glob.glob(str(tree / name / '*' / '*.json'))  # its metrics
    stdout, rows, per_run = table([str(tree)], tmp_path)
    check_rows(rows, [final_metrics(work[BASE, s]) for s in SEEDS],
               [final_metrics(work[TWIN, s]) for s in SEEDS])
    assert sorted(r['work_dir'] for r in per_run) == sorted(
        str(tree / f'{name}_s{seed}') for name, seed in work)
    assert 'not counted' not in stdout
    proc = run_tool([TABLE, str(tree / 'evaluated')], cwd=tmp_path,
                    check=False)
    assert proc.returncode != 0
    assert (f"error: WORK_DIR '{tree / 'evaluated'}' is the work_dir of a "
            'test (tools/test.py), not of a training run') in proc.stderr


def test_table_puts_the_paper_and_the_zoo_beside_a_paper_config(
        runs, tmp_path):
    """The runs renamed to the paper's Mask R-CNN R50 twins (the config
    dump's name tells the config), with known final metrics."""
    _, work = runs
    values = {(BASE, 0): 0.301, (BASE, 1): 0.305, (TWIN, 0): 0.310,
              (TWIN, 1): 0.322}
    dirs, expect = [], {BASE: [], TWIN: []}
    for (name, seed), value in values.items():
        new = 'mask_rcnn_r50' + ('_gc' if name == TWIN else '')
        dest = copy_run(work[name, seed], tmp_path / f'{new}_s{seed}')
        os.rename(osp.join(dest, f'{name}.py'), osp.join(dest, f'{new}.py'))
        offsets = [0.0, 0.2, 0.05, -0.03, 0.17, 0.01]

        def change(record, value=value):
            if record.get('step') == 2 and 'coco/bbox_mAP' in record:
                for key, offset in zip(KEYS, offsets):
                    record[key] = round(value + offset, 3)

        rewrite(dest, change=change)
        expect[name].append([100 * round(value + o, 3) for o in offsets])
        dirs.append(dest)
    stdout, rows, _ = table(dirs, tmp_path)
    check_rows(rows, expect[BASE], expect[TWIN])
    box = rows[0]
    assert (box['baseline'], box['twin']) == ('mask_rcnn_r50',
                                              'mask_rcnn_r50_gc')
    assert float(box['baseline_mean']) == pytest.approx(30.3)
    assert float(box['delta']) == pytest.approx(1.3)
    assert float(box['delta_se']) == pytest.approx(
        math.hypot(statistics.stdev([30.1, 30.5]) / math.sqrt(2),
                   statistics.stdev([31.0, 32.2]) / math.sqrt(2)))
    paper = [(r['paper_baseline'], r['paper_twin'], r['zoo_baseline'])
             for r in rows]
    assert paper == [('37.4', '37.9', '38.2'), ('59.0', '59.6', ''),
                     ('40.6', '41.2', ''), ('34.1', '34.7', '34.7'),
                     ('55.5', '56.1', ''), ('36.1', '37.0', '')]
    # Of the 6 splits of the four runs into two pairs, the observed one
    # and its mirror are as extreme: p = 2/6. With two runs per arm the
    # bootstrap's smallest and largest differences, 31.0 - 30.5 and
    # 32.2 - 30.1, each have probability 1/16 > 2.5%: they are the bounds.
    assert float(box['p_permutation']) == pytest.approx(2 / 6)
    assert (float(box['delta_ci_low']),
            float(box['delta_ci_high'])) == pytest.approx((0.5, 2.1))
    assert ('| mask_rcnn_r50 | mask_rcnn_r50_gc | box AP | 2/2 | 30.3 ± 0.3 '
            '| 31.6 ± 0.8 | +1.3 ± 0.6 | [+0.5, +2.1] | 0.333 | 37.4 | 37.9 '
            '| +0.5 | 38.2 (1x) |' in stdout)


def test_table_marks_a_run_whose_loss_diverged(runs, tmp_path):
    """A run whose loss became NaN at its second iteration is still
    counted (with its metrics) and marked."""
    _, work = runs
    nan = copy_run(work[TWIN, 0], tmp_path / 'nan')

    def change(record):
        if record.get('iter') == 2 and 'loss' in record:
            record['loss'] = math.nan

    rewrite(nan, change=change)
    stdout, rows, per_run = table([work[BASE, 0], nan], tmp_path)
    check_rows(rows, [final_metrics(work[BASE, 0])], [final_metrics(nan)])
    diverged = {r['work_dir']: r['diverged_at'] for r in per_run}
    assert diverged == {work[BASE, 0]: '', nan: '2'}
    assert f'| not finite from iteration 2 | {nan} |' in stdout
    assert f'| finite | {work[BASE, 0]} |' in stdout


def grad_panels(work_dirs):
    """(layers, stats) of the grad_stats/<layer>/<stat> scalars logged."""
    layers, stats = {}, {}
    for work_dir in work_dirs:
        for record in scalars(work_dir)[1]:
            for key in record:
                if key.startswith('grad_stats/'):
                    layer, stat = key[11:].rsplit('/', 1)
                    layers[layer] = stats[stat] = None
    return list(layers), list(stats)


def test_plot_runs_writes_readable_figures(runs, tmp_path):
    root, work = runs
    out = tmp_path / 'figures'
    proc = run_tool([PLOT, str(root / 'work'), '--out', str(out)],
                    cwd=tmp_path)
    assert proc.stdout.split() == [str(out / f) for f in (
        'loss.png', 'val_ap.png', 'grad_stats.png')]
    layers, stats = grad_panels(work.values())
    assert 'model' in layers and {'norm_before', 'norm_after'} <= set(stats)
    terms = {key for _, records in map(scalars, work.values())
             for r in records for key in r if key.startswith('loss')}
    assert len(terms) == 6  # loss and five terms: a 2 x 3 grid
    # figsize (inches) x 110 dpi: (rows, columns) of the panel grid.
    shapes = {'loss.png': (int(110 * (3.4 * 2 + 0.8)), int(110 * 4.8 * 3)),
              'val_ap.png': (int(110 * (3.4 + 0.8)), int(110 * 5.5 * 2)),
              'grad_stats.png': (round(110 * (2.6 * len(layers) + 1.0)),
                                 round(110 * 3.6 * len(stats)))}
    for name, (height, width) in shapes.items():
        path = out / name
        assert path.stat().st_size > 20000, name
        image = matplotlib.image.imread(path)
        assert image.shape == (height, width, 4), name
        # Curves in the two configs' colours, not a blank canvas.
        rgb = image[..., :3].reshape(-1, 3)
        assert np.isclose(rgb, [0.122, 0.467, 0.706], atol=0.01).all(
            1).sum() > 40, name
        assert np.isclose(rgb, [1.0, 0.498, 0.055], atol=0.01).all(
            1).sum() > 40, name


def test_plot_runs_refuses_a_work_dir_without_logs(runs, tmp_path):
    _, work = runs
    (tmp_path / 'empty').mkdir()
    proc = run_tool([PLOT, work[BASE, 0], str(tmp_path / 'empty'), '--out',
                     str(tmp_path / 'out')], cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert (f"error: WORK_DIR '{tmp_path}/empty' holds no MMEngine logs"
            in proc.stderr)
    crashed = tmp_path / 'crashed'
    (crashed / '20261130_101010').mkdir(parents=True)
    proc = run_tool([PLOT, str(crashed), '--out', str(tmp_path / 'out')],
                    cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert f'error: {crashed}: no training logged' in proc.stderr
    assert not (tmp_path / 'out').exists()


def test_grad_stats_cost_prints_consistent_shares(tmp_path):
    """tools/analysis/grad_stats_cost.py on the demo: a record costs
    something, and the shares it prints are those of its two medians."""
    proc = run_tool([
        osp.join(REPO, 'tools/analysis/grad_stats_cost.py'),
        osp.join(REPO, 'configs/demo', f'{TWIN}.py'), '--iters', '4',
        '--warmup', '1', '--interval', '50', '--work-dir',
        str(tmp_path / 'work'), '--cfg-options', 'randomness.seed=0'
    ], cwd=tmp_path)
    match = re.search(
        r'3 iterations timed \(medians\): one record ([\d.]+) ms, one '
        r'iteration without it ([\d.]+) ms; every iteration: ([\d.]+)% of '
        r'the iteration time, at interval 50: ([\d.]+)%', proc.stdout)
    assert match, proc.stdout[-3000:]
    record, iteration, every, at_50 = map(float, match.groups())
    assert 0 < record < iteration
    assert every == pytest.approx(100 * record / iteration, abs=0.02)
    assert at_50 == pytest.approx(100 * record / (50 * iteration), abs=1e-3)
