"""What pruning bought, measured: an original detector and its pruned
version (tools/prune.py) side by side, in one run.

For each: parameters, FLOPs of one image (MMEngine's
``get_model_complexity_info`` on the model's tensor forward, as
MMDetection's tools/analysis_tools/get_flops.py), the checkpoint file's
size and the size of its weights alone (``torch.save`` of the state dict:
a training checkpoint also holds the optimizer's state), and CPU inference
latency: ``test_step`` (preprocessing, forward, post-processing) of one
image of the config's test set, the two models timed interleaved after
warm-up, medians over ``--repeats``, with ``--threads`` intra-op threads.

    python tools/analysis/benchmark_pruned.py \
        configs/demo/mask_rcnn_r18_fpn_shapes.py \
        work_dirs/mask_rcnn_r18_fpn_shapes/epoch_20.pth \
        pruned/mask_rcnn_r18_fpn_shapes_pruned50.py \
        pruned/mask_rcnn_r18_fpn_shapes_pruned50.pth \
        --repeats 50 --json bench.json
"""
import argparse
import io
import json
import os.path as osp
import statistics
import time

import torch
from mmengine.config import Config

import gc_mm  # noqa: F401  (registers gc_mm, allow-lists its checkpoints)
import gc_mm.pruning  # noqa: F401  (registers PrunedModel)
from gc_mm.atomic import atomic_write
from gc_mm.compat import silence_pkg_resources_warning
from gc_mm.pruning.model import build_detector, load_weights

# Before Config.fromfile, whose mmengine imports pkg_resources.
silence_pkg_resources_warning()


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('config', help='the original config')
    parser.add_argument('checkpoint', help='the original checkpoint')
    parser.add_argument('pruned_config', help='the pruned config')
    parser.add_argument('pruned_checkpoint', help='the pruned checkpoint')
    parser.add_argument('--repeats', type=int, default=30)
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--threads', type=int, default=1,
                        help='torch intra-op threads (default 1)')
    parser.add_argument('--image-index', type=int, default=0,
                        help='which test image (default the first)')
    parser.add_argument('--json', help='also write the results here')
    return parser.parse_args()


def first_batch(cfg: Config, index: int) -> dict:
    """One image of the config's test set, through its test pipeline."""
    from mmengine.dataset import pseudo_collate
    from mmdet.registry import DATASETS
    dataset = DATASETS.build(cfg.test_dataloader.dataset)
    return pseudo_collate([dataset[index]])


def flops(model, batch: dict) -> int:
    """FLOPs of one tensor forward (MMDetection's get_flops.py way)."""
    from mmengine.analysis import get_model_complexity_info
    data = model.data_preprocessor(batch)
    forward = model.forward
    model.forward = lambda inputs: forward(inputs, data['data_samples'],
                                           mode='tensor')
    try:
        info = get_model_complexity_info(model, inputs=data['inputs'],
                                         show_table=False, show_arch=False)
    finally:
        del model.forward  # the bound method again
    return int(info['flops'])


def weights_size(model) -> int:
    with io.BytesIO() as buffer:
        torch.save({'state_dict': model.state_dict()}, buffer)
        return buffer.tell()


def time_interleaved(models: dict, batch: dict, repeats: int,
                     warmup: int) -> dict:
    """Median seconds of one test_step per model, the models alternating
    (so that load from other processes falls on both alike)."""
    times = {name: [] for name in models}
    with torch.no_grad():
        for step in range(warmup + repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model.test_step(batch)
                seconds = time.perf_counter() - start
                if step >= warmup:
                    times[name].append(seconds)
    return {name: statistics.median(values)
            for name, values in times.items()}


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    pairs = dict(original=(args.config, args.checkpoint),
                 pruned=(args.pruned_config, args.pruned_checkpoint))
    models, rows = {}, {}
    batch = None
    for name, (config, checkpoint) in pairs.items():
        cfg = Config.fromfile(config)
        model = build_detector(cfg)
        load_weights(model, checkpoint)
        if batch is None:
            batch = first_batch(cfg, args.image_index)
        models[name] = model
        rows[name] = dict(
            params=sum(p.numel() for p in model.parameters()),
            flops=flops(model, batch),
            checkpoint_bytes=osp.getsize(checkpoint),
            weights_bytes=weights_size(model))
    latency = time_interleaved(models, batch, args.repeats, args.warmup)
    for name in rows:
        rows[name]['latency_ms'] = latency[name] * 1e3
    shape = tuple(batch['inputs'][0].shape[-2:])
    print(f'One {shape[0]}x{shape[1]} test image, {args.threads} thread(s), '
          f'median of {args.repeats} interleaved test_step runs:')
    print(f'{"":<10}{"params":>12}{"GFLOPs":>9}{"checkpoint":>12}'
          f'{"weights":>10}{"latency":>11}')
    for name, row in rows.items():
        print(f'{name:<10}{row["params"]:>12,}{row["flops"] / 1e9:>9.2f}'
              f'{row["checkpoint_bytes"] / 2**20:>9.1f}MiB'
              f'{row["weights_bytes"] / 2**20:>7.1f}MiB'
              f'{row["latency_ms"]:>9.1f}ms')
    ratios = {key: rows['pruned'][key] / rows['original'][key]
              for key in rows['original']}
    print('pruned/original: ' + ', '.join(
        f'{key} {value:.2f}' for key, value in ratios.items()))
    if args.json:
        report = dict(rows, ratios=ratios, repeats=args.repeats,
                      threads=args.threads, image_shape=list(shape),
                      configs={k: v[0] for k, v in pairs.items()})
        atomic_write(args.json, lambda f: json.dump(report, f, indent=1),
                     binary=False)


if __name__ == '__main__':
    main()
