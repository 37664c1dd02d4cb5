"""Every config loads and its model builds; each twin differs only in the
optimizer."""
import glob
import os.path as osp

import pytest
from mmengine.config import Config

from conftest import REPO

CONFIGS = sorted(
    osp.relpath(p, REPO)
    for p in glob.glob(osp.join(REPO, 'configs', '**', '*.py'),
                       recursive=True))
PAPER_TWINS = [
    'faster_rcnn_r50', 'faster_rcnn_r101', 'faster_rcnn_x101_32x4d',
    'faster_rcnn_x101_64x4d', 'mask_rcnn_r50', 'mask_rcnn_r101',
    'mask_rcnn_x101_32x4d', 'mask_rcnn_x101_64x4d', 'mask_rcnn_r50_4conv1fc',
    'mask_rcnn_r101_gn', 'mask_rcnn_r50_gn_ws', 'mask_rcnn_r101_gn_ws'
]
TWINS = [(f'configs/{n}.py', f'configs/{n}_gc.py') for n in PAPER_TWINS] + [
    ('configs/demo/mask_rcnn_r18_fpn_shapes.py',
     'configs/demo/mask_rcnn_r18_fpn_gc_shapes.py'),
    ('configs/finetune/mask_rcnn_r50_balloon.py',
     'configs/finetune/mask_rcnn_r50_gc_balloon.py'),
    ('configs/prune/mask_rcnn_r18_fpn_shapes_rebirth.py',
     'configs/prune/mask_rcnn_r18_fpn_gc_shapes_rebirth.py'),
]


def load(path):
    return Config.fromfile(osp.join(REPO, path))


def test_every_twin_exists():
    for pair in TWINS:
        for path in pair:
            assert path in CONFIGS, path


@pytest.mark.parametrize('path', CONFIGS)
def test_config_loads_and_model_builds(path):
    from mmdet.models.detectors import BaseDetector
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules()
    cfg = load(path)
    cfg.model.backbone.init_cfg = None  # no pretrained download in tests
    model = MODELS.build(cfg.model)
    assert isinstance(model, BaseDetector)
    assert 'gc_mm' in cfg.custom_imports.imports
    assert cfg.optim_wrapper.optimizer.type in ('SGD', 'SGD_GC')


def differences(a, b, path=()):
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            yield from differences(a.get(key), b.get(key), path + (key, ))
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and \
            len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            yield from differences(x, y, path + (i, ))
    elif a != b:
        yield path, a, b


@pytest.mark.parametrize('baseline,twin', TWINS)
def test_twins_differ_only_in_the_optimizer(baseline, twin):
    diff = list(differences(load(baseline).to_dict(), load(twin).to_dict()))
    assert diff == [(('optim_wrapper', 'optimizer', 'type'), 'SGD', 'SGD_GC')]
    optimizer = load(twin).optim_wrapper.optimizer
    assert optimizer.lr > 0 and optimizer.momentum == 0.9


@pytest.mark.parametrize('path', [p for p in CONFIGS if 'demo' not in p])
def test_header_comment_cites_paper_and_baseline(path):
    with open(osp.join(REPO, path)) as f:
        header = f.read().split('_base_')[0]
    assert header.startswith('#')
    if not path.endswith('_gc.py') and 'finetune' not in path:
        assert 'Paper' in header and 'MMDetection' in header
