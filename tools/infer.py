# Draw a detector's predictions on images: MMDetection's DetInferencer and
# visualizer on a config and checkpoint, published (tools/publish_model.py)
# or straight from training. Writes OUT_DIR/vis/<image>.png (boxes, masks,
# class names and scores) and OUT_DIR/preds/<image>.json.
import argparse
import json
import os
import os.path as osp
import sys
import warnings

import mmcv
from mmengine.config import Config, DictAction

import gc_mm  # noqa: F401  (allow-lists the types of gc_mm's checkpoints)
from gc_mm.atomic import atomic_write, write_error
from gc_mm.checks import (ConfigError, check_checkpoint_file,
                          is_local_checkpoint)
from gc_mm.compat import silence_pkg_resources_warning

# tools/ is on sys.path when this file runs as a script.
from publish_model import config_dataset_meta, inference_config

silence_pkg_resources_warning()

# What mmdet's DetInferencer warns when a checkpoint has no class names.
NO_CLASSES_WARNING = 'class names are not saved in the checkpoint'
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
        if is_local_checkpoint(args.checkpoint):  # else mmengine's to read
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
    try:
        write_outputs(args, cfg, images)
    except OSError as error:
        # A full disk or a read-only --out-dir: one line. Each file is
        # written atomically, so what is there is complete.
        failure = write_error(error)
        if failure is None:
            raise
        sys.exit(f'error: {failure}')


def build_inferencer(cfg: Config, checkpoint: str, device=None):
    """MMDetection's DetInferencer, which loads the checkpoint with
    torch.load's default, weights_only=True; a checkpoint without class
    names in its meta is labelled with the classes of ``cfg``'s test
    dataset (as tools/publish_model.py publishes it), not with COCO's."""
    from mmdet.apis import DetInferencer

    class Inferencer(DetInferencer):

        def _init_model(self, cfg, weights=None, device='cpu'):
            classes = config_dataset_meta(
                cfg.test_dataloader.dataset).get('classes')
            with warnings.catch_warnings(record=True) as caught:
                warnings.filterwarnings('always',
                                        message=f'.*{NO_CLASSES_WARNING}')
                model = super()._init_model(cfg, weights, device)
            for warning in caught:
                # mmdet's word for a checkpoint without class names: it
                # then labels with COCO's.
                if classes and weights and NO_CLASSES_WARNING in str(
                        warning.message):
                    model.dataset_meta['classes'] = classes
                else:
                    warnings.showwarning(warning.message, warning.category,
                                         warning.filename, warning.lineno)
            return model

    return Inferencer(model=cfg, weights=checkpoint, device=device,
                      show_progress=False)


def write_outputs(args, cfg, images) -> None:
    """Draw and save the predictions of the model of ``cfg`` on ``images``."""
    # Before the model loads: a folder that cannot be made fails at once.
    try:
        for folder in ('vis', 'preds'):
            os.makedirs(osp.join(args.out_dir, folder), exist_ok=True)
    except OSError as error:
        raise write_error(error, writing=True) or error
    inferencer = build_inferencer(cfg, args.checkpoint, args.device)
    results = inferencer(images, batch_size=args.batch_size,
                         return_vis=True, no_save_vis=True,
                         no_save_pred=True, pred_score_thr=args.score_thr)
    classes = inferencer.model.dataset_meta['classes']
    drawn = 0
    for path, result, image in zip(images, results['predictions'],
                                   results['visualization']):
        stem = osp.splitext(osp.basename(path))[0]
        kept = predictions(result, classes, args.score_thr)
        kept['img_path'] = path
        mmcv.imwrite(image[..., ::-1], osp.join(args.out_dir, 'vis',
                                               f'{stem}.png'))
        atomic_write(osp.join(args.out_dir, 'preds', f'{stem}.json'),
                     lambda f: json.dump(kept, f), binary=False)
        drawn += len(kept['scores'])
    print(f'{len(images)} images, {drawn} predictions above score '
          f'{args.score_thr}: {osp.join(args.out_dir, "vis")} (drawn), '
          f'{osp.join(args.out_dir, "preds")} (JSON)')


if __name__ == '__main__':
    main()
