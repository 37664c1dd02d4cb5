"""A deterministic, download-free COCO instance-segmentation dataset.

Each image shows a few filled shapes (circle, square, triangle, hexagon) on a
random background (a colour gradient with noise and stripes). Every instance
has a polygon mask, written as COCO json next to the PNG images::

    ROOT/train/*.png  ROOT/train/annotation_coco.json
    ROOT/val/*.png    ROOT/val/annotation_coco.json

the same layout as ../shared/data/balloon. The same arguments always give
the same bytes. ``python -m gc_mm.datasets.shapes ROOT`` writes it; the demo
configs' :class:`ShapesDataset` writes it on first use.
"""
import argparse
import json
import os
import os.path as osp
import shutil

import cv2
import numpy as np

from ..atomic import temporary_folder

CLASSES = ('circle', 'square', 'triangle', 'hexagon')
SPLITS = {'train': 0, 'val': 1}  # split -> seed offset
ANNOTATION = 'annotation_coco.json'
NUM_TRAIN, NUM_VAL = 128, 32  # default split sizes


def _polygon(cls: str, center, size: float, angle: float) -> np.ndarray:
    """Vertices (N, 2) of a shape; a circle is a 32-gon."""
    sides = {'circle': 32, 'square': 4, 'triangle': 3, 'hexagon': 6}[cls]
    theta = angle + np.arange(sides) * 2 * np.pi / sides
    radius = size / 2 * (np.sqrt(2) if cls == 'square' else 1.0)
    return np.stack([center[0] + radius * np.cos(theta),
                     center[1] + radius * np.sin(theta)], axis=1)


def _background(rng: np.random.Generator, height: int,
                width: int) -> np.ndarray:
    corners = rng.uniform(0, 255, size=(2, 2, 3)).astype(np.float32)
    image = cv2.resize(corners, (width, height),
                       interpolation=cv2.INTER_LINEAR)
    if rng.random() < 0.5:  # stripes
        period = rng.uniform(6, 24)
        stripes = np.sin(np.arange(width) * 2 * np.pi / period)[None, :, None]
        image += 25 * stripes
    image += rng.normal(0, 12, size=image.shape)
    return np.clip(image, 0, 255)


def _draw_image(rng, height, width, max_instances):
    image = _background(rng, height, width)
    instances = []
    for _ in range(int(rng.integers(1, max_instances + 1))):
        label = int(rng.integers(len(CLASSES)))
        size = rng.uniform(0.18, 0.45) * min(height, width)
        center = rng.uniform(size / 2, [width - size / 2, height - size / 2])
        points = _polygon(CLASSES[label], center, size, rng.uniform(0, np.pi))
        color = rng.uniform(0, 255, size=3)
        cv2.fillPoly(image, [np.round(points).astype(np.int32)],
                     color.tolist())
        instances.append((label, points))
    image = np.clip(image + rng.normal(0, 4, size=image.shape), 0, 255)
    return image.astype(np.uint8), instances


def _coco_annotation(points: np.ndarray, label: int, image_id: int,
                     annotation_id: int, height: int, width: int) -> dict:
    points = np.clip(points, 0, [width, height])
    x, y = points[:, 0], points[:, 1]
    area = 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))
    return dict(
        id=annotation_id,
        image_id=image_id,
        category_id=label + 1,
        segmentation=[np.round(points, 2).flatten().tolist()],
        area=round(float(area), 2),
        bbox=[round(float(v), 2) for v in (x.min(), y.min(), x.max() -
                                           x.min(), y.max() - y.min())],
        iscrowd=0)


def write_split(folder: str, num_images: int, seed: int, height: int,
                width: int, max_instances: int) -> None:
    """Write one split's images and COCO json into an existing folder."""
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for index in range(num_images):
        image, instances = _draw_image(rng, height, width, max_instances)
        file_name = f'{index:05d}.png'
        cv2.imwrite(osp.join(folder, file_name), image)
        image_id = index + 1  # COCO ids start at 1
        images.append(dict(id=image_id, file_name=file_name, height=height,
                           width=width))
        for label, points in instances:
            annotations.append(
                _coco_annotation(points, label, image_id,
                                 len(annotations) + 1, height, width))
    categories = [dict(id=i + 1, name=name) for i, name in enumerate(CLASSES)]
    with open(osp.join(folder, ANNOTATION), 'w') as f:
        json.dump(dict(images=images, annotations=annotations,
                       categories=categories), f)


def make_shapes_dataset(root: str,
                        num_train: int = NUM_TRAIN,
                        num_val: int = NUM_VAL,
                        height: int = 128,
                        width: int = 160,
                        max_instances: int = 4,
                        seed: int = 0) -> str:
    """Write the dataset under ``root`` unless it is already there.

    It is built in a temporary folder beside ``root`` and renamed into place,
    so an interrupted run leaves nothing half-written and concurrent callers
    (dataloaders, distributed ranks) agree on one complete copy.
    """
    settings = dict(num_train=num_train, num_val=num_val, height=height,
                    width=width, max_instances=max_instances, seed=seed)
    stamp = osp.join(root, 'settings.json')
    if osp.exists(stamp):
        with open(stamp) as f:
            existing = json.load(f)
        if existing != settings:
            raise ValueError(
                f'{root} holds a shapes dataset made with {existing}, not '
                f'{settings}: remove it or choose another data_root')
        return root
    # Named after its process: a later call removes those of killed ones.
    tmp = temporary_folder(root, prefix='.shapes-')
    try:
        print(f'Writing the shapes demo dataset to {root} ...', flush=True)
        for split, offset in SPLITS.items():
            os.makedirs(osp.join(tmp, split))
            count = num_train if split == 'train' else num_val
            write_split(osp.join(tmp, split), count, seed * 1000 + offset,
                        height, width, max_instances)
        with open(osp.join(tmp, 'settings.json'), 'w') as f:
            json.dump(settings, f)
        try:
            os.rename(tmp, root)
        except OSError:
            if not osp.exists(stamp):  # not another process's complete copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('root', help='output folder, e.g. data/shapes')
    parser.add_argument('--num-train', type=int, default=NUM_TRAIN)
    parser.add_argument('--num-val', type=int, default=NUM_VAL)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    make_shapes_dataset(args.root, num_train=args.num_train,
                        num_val=args.num_val, seed=args.seed)


if __name__ == '__main__':
    main()
