"""Table of twin runs: each baseline config beside its GC twin, over seeds.

Reads MMEngine work_dirs (one per run: ``<work_dir>/<timestamp>/vis_data/
scalars.json`` and the config dump ``<work_dir>/<config name>.py``), takes
each run's final (or best) COCO bbox/segm AP, AP50 and AP75, groups the
runs by config and seed, and prints Markdown: mean ± sample std over seeds
of a baseline and its GC twin, the GC delta (twin mean minus baseline
mean, ± its standard error) with a 95% bootstrap interval and the p-value
of an exact permutation test (is the difference of the means larger than
splitting the same runs at random into two arms gives?), and for the
paper's configs the paper's
Tables 8/9 and MMDetection 3.3's model-zoo baseline beside them. Runs that
cannot be counted (unfinished: fewer epochs than the config's max_epochs;
no final validation metrics; no config dump) are listed with the reason,
never dropped silently. A run whose training loss became NaN or infinite
is counted (with the AP it ended with) and marked.

Twins are paired by name: a config whose name has a ``gc`` token is the
twin of the name without it (``mask_rcnn_r50_gc`` of ``mask_rcnn_r50``,
``mask_rcnn_r18_fpn_gc_shapes`` of ``mask_rcnn_r18_fpn_shapes``).
AP values are in points (MMDetection logs 0.374 for 37.4 AP, rounded to
three decimals, so to 0.1 point).

    python tools/analysis/gc_table.py work_dirs/           # every run below
    python tools/analysis/gc_table.py work_dirs/r50_s0 work_dirs/r50_gc_s0 \\
        --metric best --csv table.csv
"""
import argparse
import csv
import glob
import itertools
import json
import math
import os
import os.path as osp
import random
import re
import statistics
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional

# (task, suffix, label): the metrics of the table, in its row order.
METRICS = [('bbox', '', 'box AP'), ('bbox', '_50', 'box AP50'),
           ('bbox', '_75', 'box AP75'), ('segm', '', 'mask AP'),
           ('segm', '_50', 'mask AP50'), ('segm', '_75', 'mask AP75')]

# Yong et al., ECCV 2020, Tables 8 and 9 (COCO val, MMDetection v1.1, 1x),
# keyed by the baseline config of configs/: task -> (w/o GC, w/ GC), each
# (AP, AP50, AP75).
PAPER = {
    'faster_rcnn_r50': dict(bbox=((36.4, 58.4, 39.1), (37.0, 59.0, 40.2))),
    'faster_rcnn_r101': dict(bbox=((38.5, 60.3, 41.6), (38.9, 60.8, 42.2))),
    'faster_rcnn_x101_32x4d': dict(
        bbox=((40.1, 62.0, 43.8), (40.7, 62.7, 43.9))),
    'faster_rcnn_x101_64x4d': dict(
        bbox=((41.3, 63.3, 45.2), (41.6, 63.8, 45.4))),
    'mask_rcnn_r50': dict(bbox=((37.4, 59.0, 40.6), (37.9, 59.6, 41.2)),
                          segm=((34.1, 55.5, 36.1), (34.7, 56.1, 37.0))),
    'mask_rcnn_r101': dict(bbox=((39.4, 60.9, 43.3), (40.0, 61.5, 43.7)),
                           segm=((35.9, 57.7, 38.4), (36.2, 58.1, 38.7))),
    'mask_rcnn_x101_32x4d': dict(
        bbox=((41.1, 62.8, 45.0), (41.6, 63.1, 45.5)),
        segm=((37.1, 59.4, 39.8), (37.4, 59.8, 39.9))),
    'mask_rcnn_x101_64x4d': dict(
        bbox=((42.1, 63.8, 46.3), (42.8, 64.5, 46.8)),
        segm=((38.0, 60.6, 40.9), (38.4, 61.0, 41.1))),
    'mask_rcnn_r50_4conv1fc': dict(
        bbox=((37.5, 58.2, 41.0), (38.4, 59.5, 41.8)),
        segm=((33.9, 55.0, 36.1), (34.6, 55.9, 36.7))),
    'mask_rcnn_r101_gn': dict(bbox=((41.1, 61.7, 44.9), (41.7, 62.3, 45.3)),
                              segm=((36.9, 58.7, 39.3), (37.4, 59.3, 40.3))),
    'mask_rcnn_r50_gn_ws': dict(
        bbox=((40.0, 60.7, 43.6), (40.6, 61.3, 43.9)),
        segm=((36.1, 57.8, 38.6), (36.6, 58.2, 39.1))),
}

# MMDetection 3.3.0 model zoo (COCO val2017): task -> AP, and the schedule
# (the GN and GN+WS models exist only as 2x).
ZOO = {
    'faster_rcnn_r50': (dict(bbox=37.4), '1x'),
    'faster_rcnn_r101': (dict(bbox=39.4), '1x'),
    'faster_rcnn_x101_32x4d': (dict(bbox=41.2), '1x'),
    'faster_rcnn_x101_64x4d': (dict(bbox=42.1), '1x'),
    'mask_rcnn_r50': (dict(bbox=38.2, segm=34.7), '1x'),
    'mask_rcnn_r101': (dict(bbox=40.0, segm=36.1), '1x'),
    'mask_rcnn_x101_32x4d': (dict(bbox=41.9, segm=37.5), '1x'),
    'mask_rcnn_x101_64x4d': (dict(bbox=42.8, segm=38.4), '1x'),
    'mask_rcnn_r101_gn': (dict(bbox=41.9, segm=37.6), '2x'),
    'mask_rcnn_r50_gn_ws': (dict(bbox=40.6, segm=36.6), '2x'),
    'mask_rcnn_r101_gn_ws': (dict(bbox=42.0, segm=37.7), '2x'),
}

TIMESTAMP = re.compile(r'^\d{8}_\d{6}$')

# Seeded, so that a table is the same each time it is printed.
BOOTSTRAP_SAMPLES = 10000
PERMUTATION_SAMPLES = 20000  # all splits when there are fewer


@dataclass
class Run:
    """One MMEngine work_dir: what its logs and config dump say."""
    work_dir: str
    config: Optional[str] = None  # the config's name (its dump's stem)
    seed: Optional[int] = None
    by_epoch: bool = True
    max_length: Optional[int] = None  # max_epochs or max_iters
    reached: int = 0  # the last epoch (or iteration) logged in training
    train: List[dict] = field(default_factory=list)  # by iteration
    val: Dict[int, dict] = field(default_factory=dict)  # epoch -> metrics
    # iteration -> the GradStatsHook scalars logged then
    grad: Dict[int, dict] = field(default_factory=dict)
    problems: List[str] = field(default_factory=list)
    # What was skipped without costing the run its count.
    notes: List[str] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return (self.max_length is not None
                and self.reached >= self.max_length)

    @property
    def diverged_at(self) -> Optional[int]:
        """The first iteration whose logged loss is NaN or infinite."""
        for record in self.train:
            if not math.isfinite(record['loss']):
                return record['iter']
        return None

    @property
    def name(self) -> str:
        seed = '?' if self.seed is None else self.seed
        return f'{self.config or "?"} seed {seed}'


def is_run_dir(path: str) -> bool:
    return any(
        TIMESTAMP.match(entry) and osp.isdir(osp.join(path, entry))
        for entry in os.listdir(path))


def is_test_dir(path: str) -> bool:
    """Whether ``path`` is the work_dir of tools/test.py (reproduce_paper's
    ``<run>_test``), told by what it holds: a launch dumped test metrics
    (``<timestamp>/<timestamp>.json``) and none logged training
    (``<timestamp>/vis_data/scalars.json``)."""
    stamps = [entry for entry in os.listdir(path) if TIMESTAMP.match(entry)]
    return (any(osp.isfile(osp.join(path, stamp, f'{stamp}.json'))
                for stamp in stamps)
            and not any(osp.isfile(osp.join(path, stamp, 'vis_data',
                                            'scalars.json'))
                        for stamp in stamps))


def find_run_dirs(paths: List[str]) -> List[str]:
    """The run work_dirs given or found below the given folders (test
    work_dirs below them left out); raises ValueError naming a path that is
    no folder, a test's work_dir or holds no MMEngine logs."""
    found = []
    for path in paths:
        if not osp.isdir(path):
            raise ValueError(f'WORK_DIR {path!r}: no such folder')
        if is_run_dir(path) and is_test_dir(path):
            raise ValueError(
                f'WORK_DIR {path!r} is the work_dir of a test '
                '(tools/test.py), not of a training run')
        runs = sorted(root for root, dirs, _ in os.walk(path)
                      if not TIMESTAMP.match(osp.basename(root))
                      and is_run_dir(root) and not is_test_dir(root))
        if not runs:
            raise ValueError(
                f'WORK_DIR {path!r} holds no MMEngine logs (expected '
                '<work_dir>/<timestamp>/vis_data/scalars.json, as '
                'tools/train.py writes)')
        found += [run for run in runs if run not in found]
    return found


def read_scalars(path: str):
    """(records, bad, partial) of a scalars.json: its records, the numbers
    of its lines that are not JSON, and the number of its last line if that
    one is cut short (no newline, not JSON: the launch was killed while
    logging it; the records before it stand), else None."""
    records, bad, partial = [], [], None
    with open(path) as f:
        lines = f.readlines()
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if number == len(lines) and not line.endswith('\n'):
                    partial = number
                else:
                    bad.append(number)
    return records, bad, partial


def _config_fields(run: Run, dump: str) -> None:
    from mmengine.config import Config
    try:
        cfg = Config.fromfile(dump, import_custom_modules=False)
    except Exception as error:  # listed with the run, not fatal to the table
        run.problems.append(f'cannot read config dump {dump}: {error}')
        return
    seed = cfg.get('randomness', {}).get('seed')
    if seed is not None:
        run.seed = int(seed)
    train_cfg = cfg.get('train_cfg') or {}
    if 'max_epochs' in train_cfg:
        run.by_epoch, run.max_length = True, int(train_cfg['max_epochs'])
    elif 'max_iters' in train_cfg:
        run.by_epoch, run.max_length = False, int(train_cfg['max_iters'])
    else:
        run.problems.append(
            f'config dump {dump} has no train_cfg.max_epochs or max_iters')


def read_run(work_dir: str) -> Run:
    """Merge every launch of a work_dir (a resumed run has several
    timestamp folders; the later record of an iteration or epoch wins)."""
    run = Run(work_dir)
    stamps = sorted(entry for entry in os.listdir(work_dir)
                    if TIMESTAMP.match(entry))
    train, val, grad = {}, {}, {}
    for stamp in stamps:
        path = osp.join(work_dir, stamp, 'vis_data', 'scalars.json')
        if osp.isfile(path):
            records, bad, partial = read_scalars(path)
            if bad:
                run.problems.append(f'{path}: lines {bad} are not JSON')
            if partial:
                run.notes.append(f'{path}: line {partial} skipped (cut short '
                                 'by an interrupted launch)')
            for record in records:
                if 'loss' in record and 'iter' in record:
                    train[record['iter']] = record
                elif any(key.startswith('coco/') for key in record):
                    val[record['step']] = record
                elif any(key.startswith('grad_stats/') for key in record):
                    grad.setdefault(record['step'], {}).update(record)
        log = osp.join(work_dir, stamp, f'{stamp}.log')
        if run.seed is None and osp.isfile(log):
            with open(log) as f:
                match = re.search(r'^\s+seed: (\d+)$', f.read(20000), re.M)
            if match:  # what the runner used when the config said None
                run.seed = int(match.group(1))
    run.train = [train[key] for key in sorted(train)]
    run.val = {key: val[key] for key in sorted(val)}
    run.grad = {key: grad[key] for key in sorted(grad)}

    dumps = sorted(glob.glob(osp.join(work_dir, '*.py')))
    if len(dumps) == 1:
        run.config = osp.splitext(osp.basename(dumps[0]))[0]
        log_seed, run.seed = run.seed, None
        _config_fields(run, dumps[0])
        if run.seed is None:
            run.seed = log_seed
    else:
        run.problems.append(
            f'{len(dumps)} config dumps (<work_dir>/*.py): cannot tell the '
            'config' + (f' ({", ".join(map(osp.basename, dumps))})'
                        if dumps else ''))
    if not run.train:
        run.problems.append('no training logged')
    else:
        last = run.train[-1]
        run.reached = last.get('epoch', 0) if run.by_epoch else last['iter']
    if run.max_length is not None and run.reached < run.max_length:
        unit = 'epochs' if run.by_epoch else 'iterations'
        run.problems.append(
            f'unfinished: {run.reached} of {run.max_length} {unit}')
    return run


def coco_metrics(record: dict) -> Dict[str, float]:
    """'bbox' / 'bbox_50' / ... -> AP in points."""
    out = {}
    for task, suffix, _ in METRICS:
        value = record.get(f'coco/{task}_mAP{suffix}')
        if value is not None and value >= 0:  # -1: no such objects
            out[task + suffix] = 100.0 * value
    return out


def run_metrics(run: Run, metric: str) -> Optional[Dict[str, float]]:
    """The run's final (validation at the last epoch/iteration) or best
    (the validation with the highest box AP, else mask AP) metrics; None,
    with the reason added to run.problems, if it has none to count."""
    if run.problems:
        return None
    if metric == 'final':
        record = run.val.get(run.max_length)
        if record is None:
            run.problems.append('no validation metrics at the end of '
                                'training')
            return None
        values = coco_metrics(record)
    else:
        candidates = [coco_metrics(record) for record in run.val.values()]
        candidates = [c for c in candidates if c]
        if not candidates:
            run.problems.append('no validation metrics')
            return None
        key = 'bbox' if any('bbox' in c for c in candidates) else 'segm'
        values = max(candidates, key=lambda c: c.get(key, -math.inf))
    if not values:
        run.problems.append('no COCO bbox/segm metrics in the validation')
        return None
    return values


def baseline_of(config: str) -> Optional[str]:
    """The baseline a GC twin is paired with, or None for a baseline."""
    tokens = config.split('_')
    if 'gc' not in tokens:
        return None
    return '_'.join(token for token in tokens if token != 'gc')


def mean_std(values: List[float]):
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return mean, std


def bootstrap_interval(a: List[float], b: List[float],
                       level: float = 0.95):
    """Percentile bootstrap interval of mean(b) - mean(a): each arm
    resampled with replacement on its own."""
    rng = random.Random(0)
    deltas = sorted(
        statistics.fmean(rng.choices(b, k=len(b))) -
        statistics.fmean(rng.choices(a, k=len(a)))
        for _ in range(BOOTSTRAP_SAMPLES))
    tail = (1 - level) / 2
    return (deltas[int(tail * BOOTSTRAP_SAMPLES)],
            deltas[int((1 - tail) * BOOTSTRAP_SAMPLES) - 1])


def permutation_p(a: List[float], b: List[float]) -> float:
    """Two-sided p-value of the difference of the means: the share of
    the splits of a + b into arms of len(a) and len(b) whose difference is
    at least as large in size (every split when there are at most
    PERMUTATION_SAMPLES, else that many drawn at random)."""
    pooled, n = a + b, len(a)
    observed = abs(statistics.fmean(b) - statistics.fmean(a))
    total = sum(pooled)

    def extreme(indices):
        taken = sum(pooled[i] for i in indices)
        delta = (total - taken) / len(b) - taken / n
        return abs(delta) >= observed - 1e-9

    if math.comb(len(pooled), n) <= PERMUTATION_SAMPLES:
        splits = list(itertools.combinations(range(len(pooled)), n))
    else:
        rng = random.Random(0)
        splits = [rng.sample(range(len(pooled)), n)
                  for _ in range(PERMUTATION_SAMPLES)]
    return sum(map(extreme, splits)) / len(splits)


def build_table(runs: List[Run], metric: str = 'final') -> List[dict]:
    """One row per (baseline, twin, metric) with what the table shows."""
    values = {}  # config -> seed -> metrics (the newest run of a seed)
    for run in runs:
        metrics = run_metrics(run, metric)
        if metrics is None:
            continue
        seeds = values.setdefault(run.config, {})
        if run.seed in seeds:
            older = seeds[run.seed][0]
            older.problems.append(
                f'same config and seed as {run.work_dir}, which is counted')
        seeds[run.seed] = (run, metrics)
    pairs = {}  # baseline -> twin (None where there is no twin)
    for config in values:
        base = baseline_of(config)
        if base is None:
            pairs.setdefault(config, None)
        else:
            pairs[base] = config
    rows = []
    for base in sorted(pairs):
        twin = pairs[base]
        base_runs = [m for _, m in values.get(base, {}).values()]
        twin_runs = [m for _, m in values.get(twin, {}).values()]
        paper = PAPER.get(base, {})
        zoo, schedule = ZOO.get(base, ({}, None))
        for task, suffix, label in METRICS:
            key = task + suffix
            a = [m[key] for m in base_runs if key in m]
            b = [m[key] for m in twin_runs if key in m]
            if not a and not b:
                continue
            row = dict(baseline=base, twin=twin or '', metric=label,
                       n_baseline=len(a), n_twin=len(b))
            row['baseline_mean'], row['baseline_std'] = (
                mean_std(a) if a else (math.nan, math.nan))
            row['twin_mean'], row['twin_std'] = (
                mean_std(b) if b else (math.nan, math.nan))
            row['delta'] = row['twin_mean'] - row['baseline_mean']
            row['delta_se'] = (math.sqrt(
                row['baseline_std']**2 / len(a) + row['twin_std']**2 / len(b))
                if len(a) > 1 and len(b) > 1 else math.nan)
            row['delta_ci_low'], row['delta_ci_high'] = (
                bootstrap_interval(a, b) if len(a) > 1 and len(b) > 1 else
                (math.nan, math.nan))
            row['p_permutation'] = (permutation_p(a, b) if a and b
                                    and len(a) + len(b) > 2 else math.nan)
            column = ('', '_50', '_75').index(suffix)
            if task in paper:
                without, with_gc = paper[task]
                row['paper_baseline'] = without[column]
                row['paper_twin'] = with_gc[column]
                row['paper_delta'] = round(with_gc[column] - without[column],
                                           1)
            row['zoo_baseline'] = zoo.get(task) if suffix == '' else None
            row['zoo_schedule'] = schedule if row['zoo_baseline'] else None
            rows.append(row)
    return rows


def _number(value, digits=1):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return '-'
    return f'{value:.{digits}f}'


def _mean_std(mean, std):
    if math.isnan(mean):
        return '-'
    return _number(mean) + ('' if math.isnan(std) else f' ± {_number(std)}')


def markdown(rows: List[dict], runs: List[Run], metric: str) -> str:
    lines = [
        f'AP in points, {metric} validation of each run; mean ± sample std '
        'over seeds (n = seeds); Δ = GC twin mean - baseline mean '
        '(± standard error), its 95% bootstrap interval and the p-value '
        'of an exact permutation test. Paper: Yong et al. 2020, Tables 8/9 '
        '(COCO, MMDetection v1.1); zoo: MMDetection 3.3 baseline.', '',
        '| Baseline | GC twin | Metric | n | Baseline | GC twin | Δ GC '
        '| 95% CI of Δ | p | Paper w/o GC | Paper w/ GC | Paper Δ '
        '| Zoo baseline |',
        '|---|---|---|---|---|---|---|---|---|---|---|---|---|'
    ]
    for row in rows:
        delta = _number(row['delta'])
        if not math.isnan(row['delta_se']):
            delta += f' ± {_number(row["delta_se"])}'
        if delta != '-' and row['delta'] > 0:
            delta = '+' + delta
        zoo = _number(row.get('zoo_baseline'))
        if row.get('zoo_schedule'):
            zoo += f' ({row["zoo_schedule"]})'
        paper_delta = row.get('paper_delta')
        interval = ('-' if math.isnan(row['delta_ci_low']) else
                    f'[{row["delta_ci_low"]:+.1f}, '
                    f'{row["delta_ci_high"]:+.1f}]')
        lines.append(' | '.join([
            '', row['baseline'], row['twin'] or '(no twin run)',
            row['metric'], f'{row["n_baseline"]}/{row["n_twin"]}',
            _mean_std(row['baseline_mean'], row['baseline_std']),
            _mean_std(row['twin_mean'], row['twin_std']), delta, interval,
            _number(row['p_permutation'], 3),
            _number(row.get('paper_baseline')),
            _number(row.get('paper_twin')),
            '-' if paper_delta is None else f'{paper_delta:+.1f}', zoo, ''
        ]).strip())
    if not rows:
        lines.append('| (no run with validation metrics to count) |' +
                     ' |' * 12)
    lines += ['', 'Runs:', '',
              '| Config | Seed | Trained | Box AP | Mask AP | Loss | Work dir '
              '| Not counted because |', '|---|---|---|---|---|---|---|---|']
    for run in sorted(runs, key=lambda r: (r.config or '', r.seed or 0,
                                           r.work_dir)):
        unit = 'ep' if run.by_epoch else 'it'
        trained = (f'{run.reached}/{run.max_length} {unit}'
                   if run.max_length else f'{run.reached} {unit}')
        metrics = {} if run.problems else (run_metrics(run, metric) or {})
        lines.append(' | '.join([
            '', run.config or '?', '?' if run.seed is None else str(run.seed),
            trained, _number(metrics.get('bbox')),
            _number(metrics.get('segm')),
            'finite' if run.diverged_at is None else
            f'not finite from iteration {run.diverged_at}', run.work_dir,
            '; '.join(run.problems), ''
        ]).strip())
    skipped = [run for run in runs if run.problems]
    if skipped:
        lines += ['', f'{len(skipped)} run(s) not counted:']
        lines += [f'- {run.work_dir} ({run.name}): {"; ".join(run.problems)}'
                  for run in skipped]
    noted = [run for run in runs if run.notes]
    if noted:
        lines += ['', 'Notes:']
        lines += [f'- {run.work_dir} ({run.name}): {"; ".join(run.notes)}'
                  for run in noted]
    return '\n'.join(lines) + '\n'


CSV_FIELDS = [
    'baseline', 'twin', 'metric', 'n_baseline', 'n_twin', 'baseline_mean',
    'baseline_std', 'twin_mean', 'twin_std', 'delta', 'delta_se',
    'delta_ci_low', 'delta_ci_high', 'p_permutation', 'paper_baseline',
    'paper_twin', 'paper_delta', 'zoo_baseline',
    'zoo_schedule'
]


def write_csv(rows: List[dict], runs: List[Run], path: str,
              metric: str) -> str:
    """The table to ``path`` and one row per run (its seed and metrics, or
    why it is not counted) to ``<path stem>_runs.csv``; returns the
    latter's path."""
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, CSV_FIELDS, restval='')
        writer.writeheader()
        for row in rows:
            writer.writerow({
                key: ('' if isinstance(value, float) and math.isnan(value)
                      or value is None else value)
                for key, value in row.items()
            })
    runs_path = osp.splitext(path)[0] + '_runs.csv'
    keys = [task + suffix for task, suffix, _ in METRICS]
    with open(runs_path, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['config', 'seed', 'work_dir', 'reached',
                         'max_length', 'by_epoch', *keys, 'diverged_at',
                         'not_counted'])
        for run in runs:
            metrics = {} if run.problems else (run_metrics(run, metric)
                                               or {})
            writer.writerow([run.config or '', run.seed, run.work_dir,
                             run.reached, run.max_length, run.by_epoch,
                             *[metrics.get(key, '') for key in keys],
                             run.diverged_at or '', '; '.join(run.problems)])
    return runs_path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Markdown (and CSV) table of baseline vs GC twin runs: '
        'mean ± std over seeds, the GC delta, the paper and the zoo.')
    parser.add_argument(
        'work_dirs', nargs='+', metavar='WORK_DIR',
        help="a run's work_dir, or a folder with work_dirs below it")
    parser.add_argument('--csv', metavar='OUT',
                        help='also write the table to OUT and the runs to '
                        'OUT_runs.csv')
    parser.add_argument('--metric', choices=('final', 'best'),
                        default='final',
                        help='final: the validation at the end of training '
                        '(default); best: the validation with the best box '
                        'AP (all metrics from that validation)')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        runs = [read_run(path) for path in find_run_dirs(args.work_dirs)]
    except ValueError as error:
        sys.exit(f'error: {error}')
    rows = build_table(runs, args.metric)
    print(markdown(rows, runs, args.metric), end='')
    if args.csv:
        runs_path = write_csv(rows, runs, args.csv, args.metric)
        print(f'\nCSV: {args.csv}, {runs_path}')


if __name__ == '__main__':
    main()
