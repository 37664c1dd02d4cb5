# Prune the filters of a trained detector (Faster/Mask R-CNN, ResNet or
# ResNeXt with FPN): the filters that matter least (L1, L2 or FPGM) go, with
# every layer coupled to them (Torch-Pruning's dependency graph;
# gc_mm/pruning).
# Writes OUT/<name>.py, a config that rebuilds the pruned model
# (gc_mm.pruning's PrunedModel) and trains, tests, resumes, publishes and
# infers with the usual tools, and OUT/<name>.pth, its weights (strict keys,
# weights_only=True). With --rounds N: prune, fine-tune (tools/train.py with
# --finetune-config's recipe) and evaluate (tools/test.py), N times, to the
# target ratio.
import argparse
import glob
import io
import json
import os
import os.path as osp
import subprocess
import sys

import torch
from mmengine.config import Config

import gc_mm  # noqa: F401  (registers gc_mm, allow-lists its checkpoints)
from gc_mm.atomic import WriteError, atomic_write
from gc_mm.checks import ConfigError
from gc_mm.compat import silence_pkg_resources_warning
from gc_mm.pruning.model import (build_detector, load_weights, model_widths,
                                 pruned_config, unpruned_config)
from gc_mm.pruning.prune import METHODS, PARTS, prune_detector

# Before Config.fromfile, whose mmengine imports pkg_resources.
silence_pkg_resources_warning()

TOOLS = osp.dirname(osp.abspath(__file__))


def parse_args():
    parser = argparse.ArgumentParser(
        description='Prune the filters of a trained detector; write a config '
        'that rebuilds it and its weights')
    parser.add_argument('config', help='the config the model was trained '
                        'with (or a pruned model\'s config)')
    parser.add_argument('checkpoint', help='its checkpoint')
    parser.add_argument('--ratio', type=float, required=True,
                        help='share of the prunable filters removed, in '
                        '(0, 1); with --rounds, after the last round')
    parser.add_argument('--method', choices=METHODS, default='l1',
                        help='filter importance (default l1)')
    parser.add_argument('--global', dest='global_pruning',
                        action='store_true', help='rank filters across '
                        'layers (default: the ratio in every layer)')
    parser.add_argument('--keep', nargs='+', default=[], metavar='PATTERN',
                        help='layers whose filters are all kept: module '
                        "names or globs, e.g. 'backbone.conv1' "
                        "'backbone.layer4*'")
    parser.add_argument('--scope', nargs='+', default=list(PARTS),
                        choices=PARTS, help='the parts pruned (default: all)')
    parser.add_argument('--out', required=True, help='output folder')
    parser.add_argument('--name', help='output name (default: '
                        '<config name>_pruned<percent>)')
    parser.add_argument('--finetune-config',
                        help='the recipe of the written config (optimizer, '
                        'schedule, data): everything but the model')
    parser.add_argument('--rounds', type=int,
                        help='prune, fine-tune and evaluate this many times '
                        '(needs --finetune-config)')
    return parser.parse_args()


def _plain(value):
    """Tuples and numpy scalars as the plain types weights_only loads."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if hasattr(value, 'item'):
        return value.item()
    return value


def pruned_outputs(cfg: Config, model, old_shapes: dict, widths: dict,
                   recipe: str, weights: str, header: str) -> tuple:
    """(config text, config) of the pruned model: ``recipe``'s config with
    the model of ``cfg`` at the pruned widths, loading ``weights``."""
    unpruned, _ = unpruned_config(cfg.model.to_dict())
    if 'init_cfg' in unpruned.get('backbone', {}):
        unpruned['backbone']['init_cfg'] = None  # weights: load_from
    out = Config.fromfile(recipe)
    out.model = pruned_config(unpruned, {**old_shapes, **widths})
    custom = dict(out.get('custom_imports') or {})
    imports = custom.get('imports') or []
    imports = [imports] if isinstance(imports, str) else list(imports)
    if 'gc_mm.pruning' not in imports:
        imports.append('gc_mm.pruning')
    out.custom_imports = dict(custom, imports=imports,
                              allow_failed_imports=False)
    out.load_from = osp.abspath(weights)
    out.resume = False
    text = header + out.pretty_text
    return text, Config.fromstring(text, '.py')


def check_rebuilds(cfg: Config, model, state: dict) -> None:
    """The written config rebuilds ``model``: its model takes ``state``
    with strict keys and predicts exactly as ``model`` on a dummy image."""
    from mmdet.structures import DetDataSample
    rebuilt = build_detector(cfg)
    rebuilt.load_state_dict(state, strict=True)
    image = torch.randn(1, 3, 128, 128,
                        generator=torch.Generator().manual_seed(0))
    meta = dict(img_shape=(128, 128), ori_shape=(128, 128),
                pad_shape=(128, 128), batch_input_shape=(128, 128),
                scale_factor=(1.0, 1.0))
    with torch.no_grad():
        outputs = [m(image, [DetDataSample(metainfo=meta)], mode='tensor')
                   for m in (model.eval(), rebuilt)]
    flat = [[t for t in _flatten(out)] for out in outputs]
    if len(flat[0]) != len(flat[1]) or not all(
            torch.equal(a, b) for a, b in zip(*flat)):
        raise RuntimeError('the written config does not rebuild the pruned '
                           'model (a gc_mm bug: please report it)')


def _flatten(value):
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _flatten(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _flatten(item)


def write_pair(out_dir: str, name: str, text: str, checkpoint: dict):
    """OUT/<name>.pth and OUT/<name>.py, each atomically; on a failure
    neither is left (nor a folder this call made)."""
    with io.BytesIO() as buffer:
        torch.save(checkpoint, buffer)
        data = buffer.getvalue()
    weights = osp.join(out_dir, f'{name}.pth')
    config = osp.join(out_dir, f'{name}.py')
    created = not osp.isdir(out_dir)
    placed = []
    try:
        atomic_write(weights, lambda f: f.write(data))
        placed.append(weights)
        atomic_write(config, lambda f: f.write(text), binary=False)
    except BaseException:
        for path in placed:
            os.unlink(path)
        if created and osp.isdir(out_dir) and not os.listdir(out_dir):
            os.rmdir(out_dir)
        raise
    return config, weights


def prune_once(config: str, checkpoint: str, ratio: float, args,
               out_dir: str, name: str) -> dict:
    """Prune ``checkpoint`` (of ``config``) by ``ratio``; write the pair.
    Everything is checked before anything is written."""
    if not osp.isfile(config):
        raise ConfigError(f'CONFIG: {config!r} does not exist.')
    if osp.exists(out_dir) and not osp.isdir(out_dir):
        raise ConfigError(f'--out: {out_dir!r} is a file.')
    taken = [f for f in (f'{name}.py', f'{name}.pth')
             if osp.exists(osp.join(out_dir, f))]
    if taken:
        raise ConfigError(f'--out: {out_dir!r} already holds '
                          f'{", ".join(taken)}; choose another folder or '
                          'remove them.')
    recipe = args.finetune_config or config
    if not osp.isfile(recipe):
        raise ConfigError(f'--finetune-config: {recipe!r} does not exist.')
    cfg = Config.fromfile(config)
    _, old_shapes = unpruned_config(cfg.model.to_dict())
    model = build_detector(cfg)
    loaded = load_weights(model, checkpoint)
    before = model_widths(model)
    result = prune_detector(model, ratio, method=args.method,
                            global_pruning=args.global_pruning,
                            keep=args.keep, scope=args.scope)
    widths = result['widths']
    removed = sum(before[n]['out_channels'] - w['out_channels']
                  for n, w in widths.items() if 'out_channels' in w)
    total = sum(w['out_channels'] for w in before.values()
                if 'out_channels' in w)
    weights = osp.join(out_dir, f'{name}.pth')
    header = (
        f'# {cfg.model.get("pruned_type", cfg.model.type)} pruned by '
        f'tools/prune.py (gc_mm) from\n# {config} and {checkpoint}:\n'
        f'# {args.method}, ratio {ratio:g}'
        f'{" (global)" if args.global_pruning else " per layer"}, '
        f'{len(widths)} layers narrowed (model.pruned_shapes).\n'
        f'# Its weights: {name}.pth (load_from). The recipe (all but the '
        f'model):\n# {recipe}.\n'
        '# Rebuilding it needs gc_mm: custom_imports keeps gc_mm.pruning, '
        'which\n# registers PrunedModel.\n')
    text, out_cfg = pruned_outputs(cfg, model, old_shapes, widths, recipe,
                                   weights, header)
    state = model.state_dict()
    check_rebuilds(out_cfg, model, state)
    meta = dict((loaded.get('meta') or {}))
    dataset_meta = {k: v for k, v in (meta.get('dataset_meta') or {}).items()
                    if k in ('classes', 'palette')}
    published = dict(
        meta=_plain(dict(
            dataset_meta=dataset_meta,
            pruning=dict(config=config, checkpoint=checkpoint, ratio=ratio,
                         method=args.method,
                         global_pruning=args.global_pruning,
                         keep=list(args.keep), scope=list(args.scope),
                         params=list(result['params']),
                         filters=[total, total - removed]),
            gc_mm_version=gc_mm.__version__)),
        state_dict=state)
    config_path, weights_path = write_pair(out_dir, name, text, published)
    return dict(config=config_path, weights=weights_path,
                params=result['params'], filters=(total, total - removed),
                layers=len(widths), kept=result['kept'],
                size=osp.getsize(weights_path))


def run_tool(args: list, log: str) -> None:
    """Run tools/<script> with this Python; its output goes to ``log``."""
    os.makedirs(osp.dirname(log), exist_ok=True)
    with open(log, 'w') as f:
        proc = subprocess.run([sys.executable] + args, stdout=f,
                              stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        with open(log) as f:
            tail = f.read()[-3000:]
        raise ConfigError(f'{osp.basename(args[0])} failed '
                          f'({proc.returncode}); its log: {log}\n{tail}')


def evaluate(config: str, checkpoint: str, work_dir: str) -> dict:
    """COCO metrics of tools/test.py ({'bbox': mAP, 'segm': mAP})."""
    run_tool([osp.join(TOOLS, 'test.py'), config, checkpoint,
              '--work-dir', work_dir], osp.join(work_dir, 'test.log'))
    logs = sorted(glob.glob(osp.join(work_dir, '*', '*.json')),
                  key=osp.getmtime)
    with open(logs[-1]) as f:
        metrics = json.load(f)
    return {kind: metrics[f'coco/{kind}_mAP'] for kind in ('bbox', 'segm')
            if f'coco/{kind}_mAP' in metrics}


def finetune(config: str, work_dir: str) -> str:
    """tools/train.py on ``config``; the last checkpoint."""
    run_tool([osp.join(TOOLS, 'train.py'), config, '--work-dir', work_dir],
             osp.join(work_dir, 'train.log'))
    with open(osp.join(work_dir, 'last_checkpoint')) as f:
        return f.read().strip()


def _ap(metrics: dict) -> str:
    return ', '.join(f'{kind} AP {100 * value:.1f}'
                     for kind, value in metrics.items()) or 'no AP'


def run_rounds(args, stem: str) -> None:
    """Prune to ``args.ratio`` in ``args.rounds`` rounds, each fine-tuned
    and evaluated; the kept share of filters falls linearly."""
    if not args.finetune_config:
        raise ConfigError('--rounds needs --finetune-config (the recipe '
                          'each round fine-tunes with).')
    if args.rounds < 1:
        raise ConfigError(f'--rounds {args.rounds}: must be at least 1.')
    if not 0 < args.ratio < 1:
        raise ConfigError(f'--ratio {args.ratio}: must be in (0, 1), the '
                          'share of filters removed.')
    config, checkpoint = args.config, args.checkpoint
    print(f'Evaluating {checkpoint}...', flush=True)
    rows = [('original', None, evaluate(config, checkpoint,
                                        osp.join(args.out, 'original')),
             None, osp.getsize(checkpoint))]
    print(f'original: {_ap(rows[0][2])}', flush=True)
    for k in range(1, args.rounds + 1):
        kept_before = 1 - args.ratio * (k - 1) / args.rounds
        kept_after = 1 - args.ratio * k / args.rounds
        ratio = 1 - kept_after / kept_before
        folder = osp.join(args.out, f'round{k}')
        name = f'{stem}_round{k}'
        print(f'Round {k}/{args.rounds}: pruning {100 * ratio:.1f}% of the '
              'remaining filters...', flush=True)
        pruned = prune_once(config, checkpoint, ratio, args, folder, name)
        after_pruning = evaluate(pruned['config'], pruned['weights'],
                                 osp.join(folder, 'test_pruned'))
        print(f'  pruned: {pruned["filters"][1]}/{pruned["filters"][0]} '
              f'filters, {pruned["params"][1]:,} params, '
              f'{_ap(after_pruning)}; fine-tuning...', flush=True)
        checkpoint = finetune(pruned['config'], osp.join(folder, 'finetune'))
        config = pruned['config']
        after_finetuning = evaluate(config, checkpoint,
                                    osp.join(folder, 'test_finetuned'))
        print(f'  fine-tuned: {_ap(after_finetuning)} ({checkpoint})',
              flush=True)
        rows.append((f'round {k}', pruned, after_pruning, after_finetuning,
                     pruned['size']))
    print('\nround      params    checkpoint  AP pruned -> fine-tuned '
          '(box / mask)')
    for label, pruned, after_pruning, after_finetuning, size in rows:
        params = f'{pruned["params"][1]:>10,}' if pruned else ' ' * 10
        ap = ' / '.join(f'{100 * v:.1f}' for v in after_pruning.values())
        if after_finetuning is not None:
            ap += ' -> ' + ' / '.join(f'{100 * v:.1f}'
                                      for v in after_finetuning.values())
        print(f'{label:<10} {params}  {size / 2**20:7.1f} MiB  {ap}')
    print(f'Last: {config} with {checkpoint}')


def main():
    args = parse_args()
    stem = osp.splitext(osp.basename(args.config))[0]
    try:
        if args.rounds is not None:
            run_rounds(args, stem)
            return
        if not 0 < args.ratio < 1:
            raise ConfigError(f'--ratio {args.ratio}: must be in (0, 1), '
                              'the share of filters removed.')
        name = args.name or f'{stem}_pruned{round(100 * args.ratio)}'
        result = prune_once(args.config, args.checkpoint, args.ratio, args,
                            args.out, name)
    except (ConfigError, WriteError) as error:
        sys.exit(f'error: {error}')
    before, after = result['params']
    print(f'Pruned {result["filters"][0] - result["filters"][1]} of '
          f'{result["filters"][0]} filters ({result["layers"]} layers '
          f'narrowed); kept whole as outputs: {", ".join(result["kept"])}.\n'
          f'Parameters: {before:,} -> {after:,} '
          f'({100 * (1 - after / before):.1f}% fewer)\n'
          f'Config: {result["config"]}\n'
          f'Weights: {result["weights"]} ({result["size"] / 2**20:.1f} MiB)\n'
          f'Fine-tune: tools/train.py {result["config"]}  '
          '(it loads the weights: load_from)')


if __name__ == '__main__':
    main()
