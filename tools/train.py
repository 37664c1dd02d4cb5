# Train a detector: MMDetection 3.3's tools/train.py with gc_mm imported,
# checks before the run, CPU (gloo) distributed training, --amp that keeps
# GC, and checkpoints that resume exactly (RandomStateHook).
import argparse
import glob
import os
import os.path as osp
import sys

from mmengine.config import Config, DictAction
from mmengine.registry import OPTIMIZERS, RUNNERS
from mmengine.runner import Runner

import gc_mm  # noqa: F401  (registers gc_mm, applies the compat fixes)
from gc_mm.atomic import atomic_write, write_error
from gc_mm.checks import (ConfigError, check_before_run, checkpoint_path,
                          resume_checkpoint)
from gc_mm.compat import setup_distributed, silence_pkg_resources_warning
from gc_mm.optimizers import Lookahead

# Before Config.fromfile, whose mmengine imports pkg_resources.
silence_pkg_resources_warning()


def parse_args():
    parser = argparse.ArgumentParser(description='Train a detector')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument(
        '--amp',
        action='store_true',
        default=False,
        help='enable automatic-mixed-precision training (keeps GC)')
    parser.add_argument(
        '--auto-scale-lr',
        action='store_true',
        help='enable automatically scaling LR.')
    parser.add_argument(
        '--resume',
        nargs='?',
        type=str,
        const='auto',
        help='If specify checkpoint path, resume from it, while if not '
        'specify, try to auto resume from the latest checkpoint '
        'in the work directory.')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override some settings in the used config, the key-value pair '
        'in xxx=yyy format will be merged into config file. If the value to '
        'be overwritten is a list, it should be like key="[a,b]" or key=a,b '
        'It also allows nested list/tuple values, e.g. key="[(a,b),(c,d)]" '
        'Note that the quotation marks are necessary and that no white space '
        'is allowed.')
    parser.add_argument(
        '--launcher',
        choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none',
        help='job launcher')
    # When using PyTorch version >= 2.0.0, the `torch.distributed.launch`
    # will pass the `--local-rank` parameter to `tools/train.py` instead
    # of `--local_rank`.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args()
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def enable_amp(cfg: Config) -> None:
    """--amp: switch to an AMP wrapper without losing GC.

    mmdet's train.py replaces the wrapper type with AmpOptimWrapper, which
    would drop a GCOptimWrapper's GC and does not run on CPU.
    AmpGCOptimWrapper keeps the wrapper's GC (gc_mode=None when the GC is in
    the optimizer, which then sees unscaled gradients) and runs on CPU too.
    """
    wrapper = cfg.optim_wrapper
    wrapper_type = wrapper.get('type', 'OptimWrapper')
    if wrapper_type in ('AmpOptimWrapper', 'AmpGCOptimWrapper'):
        print('AMP training is already enabled in your config.')
    elif wrapper_type == 'GCOptimWrapper':
        wrapper.type = 'AmpGCOptimWrapper'
    elif wrapper_type == 'OptimWrapper':
        wrapper.type = 'AmpGCOptimWrapper'
        wrapper.gc_mode = None
    else:
        raise ConfigError(f'--amp supports OptimWrapper and GCOptimWrapper, '
                          f'not optim_wrapper.type={wrapper_type!r}')
    wrapper.setdefault('loss_scale', 'dynamic')


def build_config(args) -> Config:
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(args.config))[0])
    if args.amp:
        enable_amp(cfg)
    if args.auto_scale_lr:
        if ('auto_scale_lr' in cfg and 'enable' in cfg.auto_scale_lr
                and 'base_batch_size' in cfg.auto_scale_lr):
            cfg.auto_scale_lr.enable = True
        else:
            raise ConfigError('Can not find "auto_scale_lr" or '
                              '"auto_scale_lr.enable" or '
                              '"auto_scale_lr.base_batch_size" in your'
                              ' configuration file.')
    # Checkpoints carry the random generators' states, so that --resume
    # continues exactly as the interrupted run would have.
    hooks = list(cfg.get('custom_hooks', []))
    if not any(hook.get('type') == 'RandomStateHook' for hook in hooks):
        cfg.custom_hooks = hooks + [dict(type='RandomStateHook')]
    # Slurm's signal before preemption or the time limit (SIGUSR1, SIGTERM)
    # stops the run with an iteration checkpoint to resume from.
    if not any(hook.get('type') == 'PreemptionHook'
               for hook in cfg.custom_hooks):
        cfg.custom_hooks.append(dict(type='PreemptionHook'))
    # Lookahead (Ranger) is validated, tested and saved with its slow weights
    # unless the config has its own SlowWeightsHook (e.g. val=False).
    if (uses_lookahead(cfg.get('optim_wrapper', {}).get('optimizer'))
            and not any(hook.get('type') == 'SlowWeightsHook'
                        for hook in cfg.custom_hooks)):
        cfg.custom_hooks.append(dict(type='SlowWeightsHook'))
    if args.resume == 'auto':
        cfg.resume = True
        # What work_dir/last_checkpoint names; where a kill left that file
        # empty or naming an incomplete checkpoint (mmengine would resume
        # from '' and fail), the newest complete one, which it then names.
        cfg.load_from, note = resume_checkpoint(cfg.work_dir)
        if note:
            print(f'Note: {note}.')
            if int(os.environ.get('RANK', '0')) == 0:
                atomic_write(osp.join(cfg.work_dir, 'last_checkpoint'),
                             lambda f: f.write(cfg.load_from), binary=False)
    elif args.resume is not None:
        cfg.resume = True
        cfg.load_from = args.resume
    # The file is checked before the run without loading it; what it holds
    # is checked on the runner's one load.
    checkpoint = checkpoint_path(cfg)
    if checkpoint:
        cfg.custom_hooks.append(
            dict(type='CheckpointCheckHook', checkpoint=checkpoint))
    return cfg


def uses_lookahead(optimizer_cfg) -> bool:
    """Whether an optimizer config is a Lookahead (Ranger is one), also
    around another optimizer."""
    if not isinstance(optimizer_cfg, dict):
        return False
    optimizer_type = optimizer_cfg.get('type')
    if isinstance(optimizer_type, str):
        optimizer_type = OPTIMIZERS.get(optimizer_type)
    return isinstance(optimizer_type, type) and issubclass(
        optimizer_type, Lookahead)


def main():
    args = parse_args()
    try:
        cfg = build_config(args)
        check_before_run(cfg, loaders=('train_dataloader', 'val_dataloader'))
        setup_distributed(cfg, args.launcher)
        if 'runner_type' not in cfg:
            runner = Runner.from_cfg(cfg)
        else:
            runner = RUNNERS.build(cfg)
        runner.train()
    except ConfigError as error:
        sys.exit(f'error: {error}')
    except OSError as error:
        # A full disk or a read-only work_dir: one line (checkpoints are
        # written atomically, so the previous one stays usable).
        failure = write_error(error)
        if failure is None:
            raise
        sys.exit(f'error: {failure}')

    if runner.rank == 0:
        last = osp.join(cfg.work_dir, 'last_checkpoint')
        checkpoint = open(last).read().strip() if osp.isfile(last) else None
        print(f'Done. Checkpoint: {checkpoint or "none saved"}\n'
              f'Logs and config: {runner.log_dir}')
        # What MMDetection's DetVisualizationHook drew during validation.
        drawn = osp.join(runner.log_dir, 'vis_data', 'vis_image')
        images = glob.glob(osp.join(drawn, '*.png'))
        if images:
            print(f'Drawn predictions ({len(images)} validation images, '
                  f'ground truth left, predictions right): {drawn}')


if __name__ == '__main__':
    main()
