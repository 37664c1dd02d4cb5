"""Bad data, configs and checkpoints: one clear error naming the culprit."""
import argparse
import json

import pytest
import torch
from mmengine.config import Config

import gc_mm  # noqa: F401
from gc_mm.checks import (ConfigError, check_before_run,
                          check_loaded_checkpoint)
from conftest import REPO

BALLOON_GC = f'{REPO}/configs/finetune/mask_rcnn_r50_gc_balloon.py'


def config(tmp_path, **changes):
    cfg = Config.fromfile(BALLOON_GC)
    root = tmp_path / 'data'
    (root / 'train').mkdir(parents=True, exist_ok=True)
    (root / 'val').mkdir(exist_ok=True)
    coco = dict(images=[], annotations=[], categories=[])
    for split in ('train', 'val'):
        (root / split / 'annotation_coco.json').write_text(json.dumps(coco))
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[loader].dataset.data_root = f'{root}/'
    cfg.load_from = None
    cfg.merge_from_dict(changes)
    return cfg, root


def test_a_good_config_passes(tmp_path):
    cfg, _ = config(tmp_path)
    check_before_run(cfg)


def test_missing_annotation_file(tmp_path):
    cfg, root = config(tmp_path)
    (root / 'val' / 'annotation_coco.json').unlink()
    with pytest.raises(ConfigError, match='val_dataloader.dataset.ann_file.*'
                       'does not exist'):
        check_before_run(cfg)


def test_malformed_annotation_json(tmp_path):
    cfg, root = config(tmp_path)
    (root / 'train' / 'annotation_coco.json').write_text('{"images": [')
    with pytest.raises(ConfigError, match='train_dataloader.*not valid JSON'):
        check_before_run(cfg)
    (root / 'train' / 'annotation_coco.json').write_text('{"images": []}')
    with pytest.raises(ConfigError, match='not a COCO annotation file'):
        check_before_run(cfg)


def test_unknown_wrapper_type(tmp_path):
    cfg, _ = config(tmp_path, **{'optim_wrapper.type': 'GCOptimWraper'})
    with pytest.raises(ConfigError, match="Did you mean 'GCOptimWrapper'"):
        check_before_run(cfg)


@pytest.mark.parametrize('content,message', [
    (b'', 'is empty'),
    (b'not a checkpoint at all', 'not a PyTorch checkpoint'),
])
def test_bad_checkpoint_files(tmp_path, content, message):
    path = tmp_path / 'bad.pth'
    path.write_bytes(content)
    cfg, _ = config(tmp_path, load_from=str(path))
    with pytest.raises(ConfigError, match=message):
        check_before_run(cfg)


def test_truncated_checkpoint(tmp_path):
    good = tmp_path / 'good.pth'
    torch.save({'state_dict': {'w': torch.zeros(1000)}}, good)
    data = good.read_bytes()
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(data[:len(data) // 2])
    cfg, _ = config(tmp_path, load_from=str(truncated))
    with pytest.raises(ConfigError, match='truncated'):
        check_before_run(cfg)


def test_foreign_checkpoints(tmp_path):
    path = tmp_path / 'pickle.pth'
    torch.save({'model': argparse.Namespace(depth=50)}, path)
    cfg, _ = config(tmp_path, load_from=str(path))
    with pytest.raises(ConfigError, match='weights_only=True: it pickles '
                       'argparse.Namespace'):
        check_before_run(cfg)
    # What mmengine pickles without gc_mm's fix of HistoryBuffer.
    torch.save({'meta': {'statistics': getattr}}, path)
    with pytest.raises(ConfigError, match='pickles builtins.getattr .*'
                       'without gc_mm imported'):
        check_before_run(cfg)


def test_checkpoint_content_is_checked_once_loaded(tmp_path):
    """What a checkpoint holds is checked on the runner's load
    (CheckpointCheckHook), not by loading it once more before the run."""
    weights = tmp_path / 'weights.pth'
    torch.save({'state_dict': {'w': torch.zeros(2)}}, weights)
    cfg, _ = config(tmp_path, load_from=str(weights), resume=True)
    check_before_run(cfg)
    loaded = torch.load(weights, weights_only=True)
    with pytest.raises(ConfigError, match='--resume: .*weights.pth.* is not '
                       'a training checkpoint'):
        check_loaded_checkpoint(loaded, str(weights), resume=True)
    check_loaded_checkpoint(loaded, str(weights), resume=False)
    with pytest.raises(ConfigError, match='load_from: .* holds no model '
                       'weights'):
        check_loaded_checkpoint({'meta': {}}, str(weights), resume=False)


def test_each_tool_checks_the_data_it_uses(tmp_path):
    cfg, root = config(tmp_path)
    (root / 'train' / 'annotation_coco.json').unlink()
    check_before_run(cfg, loaders=('test_dataloader', ))
    with pytest.raises(ConfigError, match='train_dataloader.dataset.ann_file'):
        check_before_run(cfg, loaders=('train_dataloader', 'val_dataloader'))
