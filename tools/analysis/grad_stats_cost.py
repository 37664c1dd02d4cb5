"""What GradStatsHook costs on a config: the time of one record (measuring
the gradients and logging the scalars) against the time of a training
iteration, and the share of the run it takes at a given interval.

It trains one short epoch (``--iters`` iterations, validation off) with
the hook recording at every iteration, times the hook's work and every
iteration in the same process, and prints the mean record time, the mean
iteration time without it, and the projected share at ``--interval``.

    python tools/analysis/grad_stats_cost.py \\
        configs/demo/mask_rcnn_r18_fpn_gc_shapes.py --iters 40
"""
import argparse
import statistics
import sys
import time

from mmengine.config import Config, DictAction
from mmengine.hooks import Hook
from mmengine.runner import Runner

import gc_mm  # noqa: F401  (registers gc_mm)
from gc_mm.compat import silence_pkg_resources_warning
from gc_mm.hooks import GradStatsHook

silence_pkg_resources_warning()


class TimedGradStatsHook(GradStatsHook):
    """GradStatsHook recording at every iteration, timing its own work."""

    def __init__(self, layers=None):
        super().__init__(interval=1, layers=layers)
        self.record_times = []
        self._record_time = 0.0

    def _measure(self):
        start = time.perf_counter()
        super()._measure()
        self._record_time += time.perf_counter() - start

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        start = time.perf_counter()
        super().after_train_iter(runner, batch_idx, data_batch, outputs)
        self.record_times.append(self._record_time +
                                 time.perf_counter() - start)
        self._record_time = 0.0


class IterTimer(Hook):
    # Last after the iteration, so the time includes every other hook's
    # after_train_iter (the GradStatsHook's logging among them).
    priority = 'LOWEST'

    def __init__(self):
        self.times = []

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        self._start = time.perf_counter()

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        self.times.append(time.perf_counter() - self._start)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="GradStatsHook's cost against a training iteration")
    parser.add_argument('config')
    parser.add_argument('--iters', type=int, default=40,
                        help='iterations to time (default 40)')
    parser.add_argument('--warmup', type=int, default=5,
                        help='first iterations left out (default 5)')
    parser.add_argument('--interval', type=int, default=50,
                        help='the interval to project the share for')
    parser.add_argument('--work-dir', default='work_dirs/grad_stats_cost')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    args = parser.parse_args(argv)
    if args.iters <= args.warmup:
        parser.error('--iters must be larger than --warmup')
    return args


def main(argv=None):
    args = parse_args(argv)
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    batch = cfg.train_dataloader.batch_size
    cfg.train_dataloader.dataset.indices = args.iters * batch
    cfg.train_cfg = dict(by_epoch=True, max_epochs=1, val_interval=10**9)
    cfg.custom_hooks = [
        h for h in cfg.get('custom_hooks', [])
        if h.get('type') not in ('GradStatsHook', GradStatsHook)
    ]
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook',
                                        interval=10**9)
    cfg.work_dir = args.work_dir
    cfg.load_from, cfg.resume = None, False
    runner = Runner.from_cfg(cfg)
    stats_hook, timer = TimedGradStatsHook(), IterTimer()
    runner.register_hook(stats_hook)
    runner.register_hook(timer)
    runner.train()

    records = stats_hook.record_times[args.warmup:]
    iters = timer.times[args.warmup:]
    if len(records) != len(iters):
        sys.exit(f'error: {len(records)} records for {len(iters)} '
                 'iterations (gradient accumulation?)')
    record = statistics.median(records)
    without = statistics.median(t - r for t, r in zip(iters, records))
    share = record / (args.interval * without)
    print(f'GradStatsHook on {args.config}: {len(iters)} iterations timed '
          f'(medians): one record {1000 * record:.1f} ms, one iteration '
          f'without it {1000 * without:.1f} ms; every iteration: '
          f'{100 * record / without:.2f}% of the iteration time, at '
          f'interval {args.interval}: {100 * share:.3f}%')


if __name__ == '__main__':
    main()
