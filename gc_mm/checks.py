"""Checks run by tools/train.py and tools/test.py before anything starts, so
bad input fails in seconds with one message naming the culprit."""
import difflib
import json
import os
import os.path as osp
import zipfile
from typing import Optional

import torch
from mmengine.config import Config

REMOTE_PREFIXES = ('http://', 'https://', 'torchvision://', 'modelzoo://',
                   'open-mmlab://', 'openmmlab://', 'mmcls://', 's3://',
                   'pavi://')
# Larger annotation files are left to the dataset itself (COCO train2017 is
# 450 MB); a demo or fine-tuning set is far smaller.
MAX_JSON_CHECK_BYTES = 64 * 2**20


class ConfigError(ValueError):
    """A config, data or checkpoint problem found before training starts."""


def _check_registered(registry, type_name, where: str) -> None:
    if not isinstance(type_name, str) or registry.get(type_name) is not None:
        return
    known = sorted(registry.module_dict) + sorted(
        registry.parent.module_dict if registry.parent else [])
    close = difflib.get_close_matches(type_name, known, n=3)
    hint = f' Did you mean {", ".join(map(repr, close))}?' if close else ''
    raise ConfigError(f'{where}={type_name!r} is not a registered type '
                      f'(is gc_mm imported by custom_imports?).{hint}')


def check_optim_wrapper(cfg: Config) -> None:
    from mmdet.registry import OPTIM_WRAPPERS, OPTIMIZERS
    wrapper = cfg.get('optim_wrapper')
    if not wrapper:
        return
    _check_registered(OPTIM_WRAPPERS, wrapper.get('type', 'OptimWrapper'),
                      'optim_wrapper.type')
    optimizer = wrapper.get('optimizer') or {}
    _check_registered(OPTIMIZERS, optimizer.get('type'),
                      'optim_wrapper.optimizer.type')


def _datasets(cfg: Config):
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        dataset = (cfg.get(loader) or {}).get('dataset')
        # Unwrap RepeatDataset / ClassBalancedDataset style wrappers.
        while isinstance(dataset, dict) and 'dataset' in dataset:
            dataset = dataset['dataset']
        if isinstance(dataset, dict):
            yield loader, dataset


def check_data(cfg: Config) -> None:
    for loader, dataset in _datasets(cfg):
        if dataset.get('type') == 'ShapesDataset':
            continue  # generated on first use
        data_root = dataset.get('data_root') or ''
        if data_root and not osp.isdir(data_root):
            raise ConfigError(
                f'{loader}.dataset.data_root={data_root!r} does not exist '
                f'(working directory {os.getcwd()!r}).')
        ann_file = dataset.get('ann_file')
        if not ann_file:
            continue
        path = ann_file if osp.isabs(ann_file) else osp.join(data_root,
                                                            ann_file)
        if not osp.isfile(path):
            raise ConfigError(f'{loader}.dataset.ann_file: {path!r} does not '
                              'exist.')
        if path.endswith('.json') and osp.getsize(
                path) <= MAX_JSON_CHECK_BYTES:
            try:
                with open(path) as f:
                    content = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise ConfigError(f'{loader}.dataset.ann_file: {path!r} is '
                                  f'not valid JSON: {error}') from None
            missing = {'images', 'annotations', 'categories'} - set(
                content if isinstance(content, dict) else {})
            if missing:
                raise ConfigError(
                    f'{loader}.dataset.ann_file: {path!r} is not a COCO '
                    f'annotation file (no {sorted(missing)}).')


def load_checkpoint_file(path: str, what: str) -> dict:
    """Load a local checkpoint with weights_only=True, or raise ConfigError
    naming the file and what is wrong with it."""
    if not osp.isfile(path):
        raise ConfigError(f'{what}: checkpoint {path!r} does not exist.')
    if osp.getsize(path) == 0:
        raise ConfigError(f'{what}: checkpoint {path!r} is empty.')
    if not zipfile.is_zipfile(path):
        raise ConfigError(
            f'{what}: {path!r} is not a PyTorch checkpoint (truncated, or '
            'another kind of file).')
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as error:  # torch raises several types here
        raise ConfigError(
            f'{what}: {path!r} could not be loaded with weights_only=True '
            f'(truncated, or foreign content): {error}') from None
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise ConfigError(f'{what}: {path!r} holds no state dict.')
    return checkpoint


def _latest_checkpoint(work_dir: str) -> Optional[str]:
    marker = osp.join(work_dir, 'last_checkpoint')
    if not osp.isfile(marker):
        return None
    with open(marker) as f:
        return f.read().strip() or None


def check_checkpoint(cfg: Config) -> None:
    path = cfg.get('load_from')
    resume = cfg.get('resume', False)
    if resume and not path and cfg.get('work_dir'):
        path = _latest_checkpoint(cfg.work_dir)
    if not path or path.startswith(REMOTE_PREFIXES):
        return
    what = '--resume' if resume else 'load_from'
    checkpoint = load_checkpoint_file(path, what)
    if resume:
        missing = {'state_dict', 'optimizer', 'meta'} - set(checkpoint)
        if missing:
            raise ConfigError(
                f'--resume: {path!r} is not a training checkpoint of '
                f'MMEngine (missing {sorted(missing)}); use load_from to '
                'start from its weights.')
    else:
        state = checkpoint.get('state_dict', checkpoint)
        if not isinstance(state, dict) or not any(
                torch.is_tensor(v) for v in state.values()):
            raise ConfigError(f'load_from: {path!r} holds no model weights.')


def check_before_run(cfg: Config) -> None:
    """All checks, in the order a run would hit the problems."""
    check_optim_wrapper(cfg)
    check_data(cfg)
    check_checkpoint(cfg)
