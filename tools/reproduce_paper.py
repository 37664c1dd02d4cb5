"""Train and test every twin pair of configs/ (a baseline and its ``_gc``
twin), with chosen seeds, then tabulate them with gc_table.

Each run gets its own work_dir, ``WORK_ROOT/<config>_s<seed>``, trained by
tools/dist_train.sh (or tools/slurm_train.sh with ``--slurm PARTITION``)
with ``randomness.seed=<seed>``, then evaluated from its last checkpoint by
tools/dist_test.sh (slurm_test.sh) into ``<work_dir>_test``; last,
tools/analysis/gc_table.py tabulates the training work_dirs. Training is started with ``--resume``, so running this
again continues interrupted runs (a finished one ends at once).

    python tools/reproduce_paper.py --gpus 8 --seeds 0 1 2
    python tools/reproduce_paper.py --configs mask_rcnn_r50 --gpus 8 --dry-run
    python tools/reproduce_paper.py --slurm PART --gpus 16 --configs faster_rcnn_r50

``--dry-run`` prints every command, in order, and runs none.
"""
import argparse
import os
import os.path as osp
import shlex
import subprocess
import sys
from typing import Dict, List, Optional

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIGS = osp.join(REPO, 'configs')
sys.path.insert(0, osp.join(REPO, 'tools', 'analysis'))
from gc_table import baseline_of  # noqa: E402  (the table's pairing rule)


def twin_pairs(config_dir: str = CONFIGS) -> Dict[str, str]:
    """{baseline: its GC twin} of the configs in ``config_dir`` (its top
    level), paired as gc_table pairs them (the twin's name has a ``gc``
    token: ``mask_rcnn_r50_gc``, ``mask_rcnn_r18_fpn_gc_shapes``)."""
    names = {osp.splitext(f)[0] for f in os.listdir(config_dir)
             if f.endswith('.py')}
    return dict(sorted((baseline_of(name), name) for name in names
                       if baseline_of(name) in names))


def commands(pairs: Dict[str, str], seeds: List[int], gpus: int,
             work_root: str, slurm: Optional[str] = None,
             config_dir: str = CONFIGS,
             cfg_options: List[str] = ()) -> List[List[str]]:
    """Every command, in the order they run: per config and seed, train
    then test; then the table. A test command names its checkpoint as
    ``@WORK_DIR/last_checkpoint``, read when it runs."""
    runs, work_dirs = [], []
    for baseline, twin in pairs.items():
        for config in (baseline, twin):
            path = osp.join(config_dir, f'{config}.py')
            for seed in seeds:
                work_dir = osp.join(work_root, f'{config}_s{seed}')
                work_dirs.append(work_dir)
                # The seed last: it wins over one in cfg_options.
                options = ['--cfg-options', *cfg_options,
                           f'randomness.seed={seed}']
                if slurm:
                    train = ['bash', 'tools/slurm_train.sh', slurm,
                             f'{config}_s{seed}', path, work_dir]
                    test = ['bash', 'tools/slurm_test.sh', slurm,
                            f'{config}_s{seed}_test', path]
                else:
                    train = ['bash', 'tools/dist_train.sh', path, str(gpus),
                             '--work-dir', work_dir]
                    test = ['bash', 'tools/dist_test.sh', path]
                checkpoint = '@' + osp.join(work_dir, 'last_checkpoint')
                runs.append(train + ['--resume'] + options)
                test_args = [checkpoint] if slurm else [checkpoint, str(gpus)]
                # Beside the run, not in it: gc_table reads the run's.
                runs.append(test + test_args + [
                    '--work-dir', f'{work_dir}_test'] + (
                        ['--cfg-options', *cfg_options] if cfg_options else []))
    table = [sys.executable, 'tools/analysis/gc_table.py', *work_dirs,
             '--csv', osp.join(work_root, 'gc_table.csv')]
    return runs + [table]


def resolve(command: List[str]) -> List[str]:
    """Replace ``@FILE`` arguments by the path FILE holds."""
    resolved = []
    for arg in command:
        if arg.startswith('@'):
            with open(arg[1:]) as f:
                arg = f.read().strip()
        resolved.append(arg)
    return resolved


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Train and test the twin pairs of configs/, then '
        'tabulate them (tools/analysis/gc_table.py).')
    parser.add_argument('--configs', nargs='+', metavar='BASELINE',
                        help='baselines to run (default: every one with a '
                        '_gc twin in --config-dir)')
    parser.add_argument('--config-dir', default='configs',
                        help="where the pairs are, relative to the "
                        "repository (default: configs, the paper's)")
    parser.add_argument('--cfg-options', nargs='+', default=[],
                        metavar='KEY=VALUE',
                        help='passed to every train and test run')
    parser.add_argument('--seeds', nargs='+', type=int, default=[0],
                        help='randomness.seed of each run (default: 0)')
    parser.add_argument('--gpus', type=int, default=8,
                        help='GPUs (processes) per job (default: 8)')
    parser.add_argument('--work-root', default='work_dirs/paper',
                        help='where the work_dirs go (relative to the '
                        'working directory; default: work_dirs/paper)')
    parser.add_argument('--slurm', metavar='PARTITION',
                        help='run on Slurm (tools/slurm_*.sh, GPUS=--gpus)')
    parser.add_argument('--dry-run', action='store_true',
                        help='print every command and run none')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    config_dir = args.config_dir
    if not osp.isdir(osp.join(REPO, config_dir)):
        sys.exit(f'error: --config-dir {config_dir!r} is not a folder of '
                 f'{REPO}')
    known = twin_pairs(osp.join(REPO, config_dir))
    baselines = args.configs or list(known)
    unknown = [name for name in baselines if name not in known]
    if unknown or not baselines:
        sys.exit(f'error: no twin pair for {", ".join(unknown) or "any"} in '
                 f'{config_dir}/ (pairs: {", ".join(known) or "none"})')
    if args.gpus < 1:
        sys.exit(f'error: --gpus must be at least 1, got {args.gpus}')
    # The tools' shell scripts run $PYTHON: this interpreter, not whichever
    # python is first on PATH.
    env = dict(os.environ, PYTHON=sys.executable)
    if args.slurm:
        env['GPUS'] = str(args.gpus)
    pairs = {baseline: known[baseline] for baseline in baselines}
    # The jobs run in the repository; this process reads what they write
    # (each run's last_checkpoint): one absolute path serves both.
    work_root = osp.abspath(args.work_root)
    for command in commands(pairs, args.seeds, args.gpus,
                            work_root, args.slurm, config_dir,
                            args.cfg_options):
        print('+ ' + ' '.join(map(shlex.quote, command)), flush=True)
        if not args.dry_run:
            subprocess.run(resolve(command), cwd=REPO, env=env, check=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
