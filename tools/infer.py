# Draw a detector's predictions on images: MMDetection's DetInferencer and
# visualizer on a config and checkpoint, published (tools/publish_model.py)
# or straight from training. Writes OUT_DIR/vis/<image>.png (boxes, masks,
# class names and scores) and OUT_DIR/preds/<image>.json.
import argparse
import json
import os
import os.path as osp
import sys

import mmcv
from mmengine.config import Config, DictAction

import gc_mm  # noqa: F401  (allow-lists the types of gc_mm's checkpoints)
from gc_mm.checks import ConfigError, check_checkpoint_file
from gc_mm.compat import silence_pkg_resources_warning

# tools/ is on sys.path when this file runs as a script.
from publish_model import inference_config

silence_pkg_resources_warning()

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff',
                    '.webp')


def parse_args():
    parser = argparse.ArgumentParser(
        description='Draw the predictions of a detector on images')
    parser.add_argument('config', help='config file (published or training)')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('inputs', nargs='+',
                        help='image files and/or folders of images')
    parser.add_argument('--out-dir', default='outputs',
                        help='where vis/*.png and preds/*.json go')
    parser.add_argument(
        '--score-thr', type=float, default=0.3,
        help='draw and save only predictions scoring above this')
    parser.add_argument('--device', default=None,
                        help='e.g. cpu or cuda:0 (default: cuda if any)')
    parser.add_argument('--batch-size', type=int, default=1)
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override config settings, e.g. '
        'model.test_cfg.rcnn.score_thr=0.01')
    return parser.parse_args()


def collect_images(inputs) -> list:
    """The image files of ``inputs`` (files, and each folder's images in
    name order); refuses a missing input, an empty folder and two images
    that would write the same output file."""
    images = []
    for path in inputs:
        if osp.isdir(path):
            found = sorted(osp.join(path, name) for name in os.listdir(path)
                           if name.lower().endswith(IMAGE_EXTENSIONS))
            if not found:
                raise ConfigError(f'input folder {path!r} holds no images '
                                  f'({", ".join(IMAGE_EXTENSIONS)}).')
            images += found
        elif osp.isfile(path):
            images.append(path)
        else:
            raise ConfigError(f'input {path!r} does not exist.')
    stems = {}
    for path in images:
        stem = osp.splitext(osp.basename(path))[0]
        if stem in stems:
            raise ConfigError(f'inputs {stems[stem]!r} and {path!r} would '
                              f'both write {stem}.png and {stem}.json.')
        stems[stem] = path
    return images


def predictions(result: dict, classes, score_thr: float) -> dict:
    """DetInferencer's prediction dict of one image, with only the
    instances the visualizer drew (score above ``score_thr``) and their
    class names."""
    keep = [i for i, score in enumerate(result['scores'])
            if score > score_thr]
    kept = {key: [values[i] for i in keep] for key, values in result.items()
            if isinstance(values, list) and len(values) == len(
                result['scores'])}
    kept['label_names'] = [classes[label] for label in kept['labels']]
    return kept


def main():
    args = parse_args()
    try:
        if not osp.isfile(args.config):
            raise ConfigError(f'config {args.config!r} does not exist.')
        check_checkpoint_file(args.checkpoint, 'checkpoint')
        if not args.score_thr >= 0:
            raise ConfigError(f'--score-thr={args.score_thr} must be >= 0.')
        images = collect_images(args.inputs)
        cfg = Config.fromfile(args.config)
        if args.cfg_options:
            cfg.merge_from_dict(args.cfg_options)
        # A gc_mm dataset is replaced by the MMDetection one it derives from
        # (the demo's would write its data into the working directory).
        cfg, _ = inference_config(cfg)
    except ConfigError as error:
        sys.exit(f'error: {error}')

    from mmdet.apis import DetInferencer

    # DetInferencer loads the checkpoint with torch.load's default,
    # weights_only=True.
    inferencer = DetInferencer(model=cfg, weights=args.checkpoint,
                               device=args.device, show_progress=False)
    results = inferencer(images, batch_size=args.batch_size,
                         return_vis=True, no_save_vis=True,
                         no_save_pred=True, pred_score_thr=args.score_thr)
    classes = inferencer.model.dataset_meta['classes']
    for folder in ('vis', 'preds'):
        os.makedirs(osp.join(args.out_dir, folder), exist_ok=True)
    drawn = 0
    for path, result, image in zip(images, results['predictions'],
                                   results['visualization']):
        stem = osp.splitext(osp.basename(path))[0]
        kept = predictions(result, classes, args.score_thr)
        kept['img_path'] = path
        mmcv.imwrite(image[..., ::-1], osp.join(args.out_dir, 'vis',
                                               f'{stem}.png'))
        with open(osp.join(args.out_dir, 'preds', f'{stem}.json'), 'w') as f:
            json.dump(kept, f)
        drawn += len(kept['scores'])
    print(f'{len(images)} images, {drawn} predictions above score '
          f'{args.score_thr}: {osp.join(args.out_dir, "vis")} (drawn), '
          f'{osp.join(args.out_dir, "preds")} (JSON)')


if __name__ == '__main__':
    main()
