"""Figures of runs from their MMEngine work_dirs: a baseline beside its GC
twin, several seeds each.

Runs are grouped by config (the name of the config dump in each work_dir);
each curve is the mean over a group's runs (its seeds) with a band of ± one
sample std where there are two or more. Written to ``--out``:

- ``loss.png``: the total training loss and each loss term per iteration;
- ``val_ap.png``: validation box and mask AP (COCO, points) per epoch (or
  iteration, for iteration-based loops);
- ``grad_stats.png`` (where a run logged GradStatsHook's
  ``grad_stats/<layer>/<stat>`` scalars): each statistic of each layer per
  iteration, on a log scale (the removed share on a linear one).

    python tools/analysis/plot_runs.py work_dirs/ --out figures/
    python tools/analysis/plot_runs.py work_dirs/r50_s* work_dirs/r50_gc_s* \\
        --out figures/
"""
import argparse
import os
import os.path as osp
import sys
from collections import defaultdict
from typing import Dict, List

import numpy as np

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from gc_table import Run, baseline_of, find_run_dirs, read_run  # noqa: E402

import matplotlib  # noqa: E402

matplotlib.use('Agg')  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import (FuncFormatter, MaxNLocator,  # noqa: E402
                               NullFormatter)

AP_KEYS = [('coco/bbox_mAP', 'box AP'), ('coco/segm_mAP', 'mask AP')]
# Statistics whose natural scale is linear (a share in [0, 1]).
LINEAR_STATS = ('removed', 'removed_share')


def group_runs(runs: List[Run]) -> Dict[str, List[Run]]:
    """config -> its runs, a baseline just before its GC twin."""
    groups = defaultdict(list)
    for run in runs:
        groups[run.config or osp.basename(run.work_dir)].append(run)

    def order(config):
        return (baseline_of(config) or config, baseline_of(config) is not None)

    return {config: groups[config] for config in sorted(groups, key=order)}


def mean_band(series: List[Dict[int, float]]):
    """x, mean and sample std over the series at every x any of them has
    (std is NaN where only one has it)."""
    xs = sorted({x for s in series for x in s})
    mean, std = [], []
    for x in xs:
        values = [s[x] for s in series if x in s and np.isfinite(s[x])]
        mean.append(np.mean(values) if values else np.nan)
        std.append(np.std(values, ddof=1) if len(values) > 1 else np.nan)
    return np.array(xs), np.array(mean), np.array(std)


def styles(groups) -> Dict[str, dict]:
    """A colour per config; GC twins dashed, so a twin drawn over its
    baseline still shows both."""
    colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
    return {
        config: dict(color=colors[index % len(colors)],
                     linestyle='--' if baseline_of(config) else '-')
        for index, config in enumerate(groups)
    }


def plot_group(ax, xs, mean, std, label, style, marker=None):
    color = style['color']
    ax.plot(xs, mean, label=label, marker=marker, markersize=4, **style)
    if np.isfinite(std).any():
        if len(xs) == 1:  # a band of one point would not show: a bar
            ax.errorbar(xs, mean, yerr=std, color=color, capsize=4)
        else:
            ax.fill_between(xs, mean - std, mean + std, color=color,
                            alpha=0.2, linewidth=0)


def _label(config, runs):
    seeds = sorted(run.seed for run in runs if run.seed is not None)
    return (f'{config} (n={len(runs)}' +
            (f', seeds {",".join(map(str, seeds))})' if seeds else ')'))


def _format_axes(ax, xlabel, ylabel=None, log=False):
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if log:
        ax.set_yscale('log', nonpositive='mask')
        # Label the minor ticks too where the axis spans about a decade or
        # less: there may be no power of ten in it.
        low, high = ax.get_ylim()
        number = FuncFormatter(lambda value, _: f'{value:.3g}')
        ax.yaxis.set_major_formatter(number)
        ax.yaxis.set_minor_formatter(
            number if high < 15 * low else NullFormatter())
    ax.grid(alpha=0.3, which='both' if log else 'major')


def _grid(count, width=4.8, height=3.4):
    cols = min(3, count)
    rows = -(-count // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols,
                                                  height * rows + 0.8),
                             squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:count])


def _finish(fig, axes, title, path):
    handles, labels = axes[0].get_legend_handles_labels()
    fig.suptitle(title, fontsize=13)
    fig.legend(handles, labels, loc='lower center', ncol=min(2, len(labels)),
               fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.04 + 0.03 * ((len(labels) + 1) // 2), 1,
                           0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_loss(groups, out_dir):
    terms = []
    for runs in groups.values():
        for run in runs:
            for record in run.train:
                terms += [key for key in record
                          if key.startswith('loss') and key not in terms]
    terms.sort(key=lambda key: (key != 'loss', key))
    fig, axes = _grid(len(terms))
    style = styles(groups)
    for config, runs in groups.items():
        for ax, term in zip(axes, terms):
            series = [{r['iter']: r[term] for r in run.train if term in r}
                      for run in runs]
            if any(series):
                plot_group(ax, *mean_band(series), _label(config, runs),
                           style[config])
    for ax, term in zip(axes, terms):
        ax.set_title('total loss' if term == 'loss' else term)
        _format_axes(ax, 'iteration', 'loss')
    return _finish(fig, axes, 'Training loss: mean ± std over seeds',
                   osp.join(out_dir, 'loss.png'))


def plot_val(groups, out_dir):
    present = [(key, name) for key, name in AP_KEYS if any(
        key in record for runs in groups.values() for run in runs
        for record in run.val.values())]
    if not present:
        return None
    by_epoch = all(run.by_epoch for runs in groups.values() for run in runs)
    fig, axes = _grid(len(present), width=5.5)
    style = styles(groups)
    for config, runs in groups.items():
        for ax, (key, _) in zip(axes, present):
            series = [{step: 100.0 * record[key]
                       for step, record in run.val.items() if key in record}
                      for run in runs]
            if any(series):
                plot_group(ax, *mean_band(series), _label(config, runs),
                           style[config], marker='o')
    for ax, (_, name) in zip(axes, present):
        ax.set_title(f'validation {name}')
        _format_axes(ax, 'epoch' if by_epoch else 'iteration',
               f'{name} (COCO, points)')
    return _finish(fig, axes, 'Validation AP: mean ± std over seeds',
                   osp.join(out_dir, 'val_ap.png'))


def plot_grad_stats(groups, out_dir):
    panels = []  # (layer, stat), in the order logged
    for runs in groups.values():
        for run in runs:
            for record in run.grad.values():
                for key in record:
                    if key.startswith('grad_stats/'):
                        layer, _, stat = key[len('grad_stats/'):].rpartition(
                            '/')
                        if (layer, stat) not in panels:
                            panels.append((layer, stat))
    if not panels:
        return None
    layers = list(dict.fromkeys(layer for layer, _ in panels))
    stats = list(dict.fromkeys(stat for _, stat in panels))
    fig, grid = plt.subplots(len(layers), len(stats),
                             figsize=(3.6 * len(stats),
                                      2.6 * len(layers) + 1.0),
                             squeeze=False)
    style = styles(groups)
    for row, layer in enumerate(layers):
        for col, stat in enumerate(stats):
            ax = grid[row][col]
            key = f'grad_stats/{layer}/{stat}'
            for config, runs in groups.items():
                series = [{step: record[key]
                           for step, record in run.grad.items()
                           if key in record} for run in runs]
                if any(series):
                    plot_group(ax, *mean_band(series), _label(config, runs),
                               style[config])
            ax.set_title(f'{layer}\n{stat}', fontsize=8)
            _format_axes(ax, 'iteration' if row == len(layers) - 1 else '',
                   log=stat not in LINEAR_STATS)
            ax.tick_params(which='both', labelsize=7)
    axes = [ax for ax in grid.flat if ax.lines]
    for ax in grid.flat:
        if not ax.lines:
            ax.set_visible(False)
    return _finish(
        fig, axes or [grid[0][0]],
        'Gradient statistics (GradStatsHook): mean ± std over seeds, '
        'log scale',
        osp.join(out_dir, 'grad_stats.png'))


def plot_runs(work_dirs: List[str], out_dir: str) -> List[str]:
    """Write the figures; return their paths. Raises ValueError naming a
    work_dir that has no logs or no training logged."""
    runs = [read_run(path) for path in find_run_dirs(work_dirs)]
    for run in runs:
        if not run.train:
            raise ValueError(
                f'{run.work_dir}: no training logged (no loss in '
                f'{run.work_dir}/<timestamp>/vis_data/scalars.json)')
    groups = group_runs(runs)
    os.makedirs(out_dir, exist_ok=True)
    paths = [plot_loss(groups, out_dir), plot_val(groups, out_dir),
             plot_grad_stats(groups, out_dir)]
    return [path for path in paths if path]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='PNG figures of training loss, validation AP and '
        'gradient statistics, mean ± std over the seeds of each config.')
    parser.add_argument(
        'work_dirs', nargs='+', metavar='WORK_DIR',
        help="a run's work_dir, or a folder with work_dirs below it")
    parser.add_argument('--out', required=True, metavar='DIR',
                        help='folder for the PNG files')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        paths = plot_runs(args.work_dirs, args.out)
    except ValueError as error:
        sys.exit(f'error: {error}')
    for path in paths:
        print(path)


if __name__ == '__main__':
    main()
