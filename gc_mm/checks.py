"""Checks run by tools/train.py and tools/test.py before anything starts, so
bad input fails in seconds with one message naming the culprit."""
import difflib
import io
import json
import os
import os.path as osp
import pickletools
import re
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
# A global torch's weights_only unpickler refused, in its error: 'Unsupported
# global: GLOBAL argparse.Namespace was not ...' (torch >= 2.4), 'Unsupported
# class argparse.Namespace' (earlier).
_REFUSED_GLOBAL = re.compile(r'(?:GLOBAL|Unsupported class) ([\w.]+)')


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
    _check_multipliers_reach(wrapper, optimizer)


def _check_multipliers_reach(wrapper, optimizer) -> None:
    """MMEngine's default constructor multiplies the lr and weight_decay of
    the outer optimizer config: Lookahead's are in its inner config,
    Ranger's may be its defaults. There it fails (lr) or drops the decay
    multipliers; GCOptimWrapperConstructor finds them."""
    from mmdet.registry import OPTIM_WRAPPER_CONSTRUCTORS

    from .constructor import (GCOptimWrapperConstructor, multiplied_options,
                              updating_option)
    constructor = wrapper.get('constructor', 'DefaultOptimWrapperConstructor')
    if isinstance(constructor, str):
        constructor = OPTIM_WRAPPER_CONSTRUCTORS.get(constructor)
    if (not isinstance(constructor, type)
            or issubclass(constructor, GCOptimWrapperConstructor)):
        return
    for key in multiplied_options(wrapper.get('paramwise_cfg') or {}):
        if key not in optimizer and updating_option(optimizer,
                                                    key) is not None:
            raise ConfigError(
                f'optim_wrapper.paramwise_cfg multiplies {key}, which '
                f"optim_wrapper.optimizer (type {optimizer.get('type')!r}) "
                f'does not give at its top level, where '
                f'{constructor.__name__} looks for it: set '
                "optim_wrapper.constructor='GCOptimWrapperConstructor', "
                'which uses the inner optimizer\'s (or the default) value')


def _registered(registry, type_name):
    return (type_name if isinstance(type_name, type) else
            registry.get(type_name) if isinstance(type_name, str) else None)


def _applies_gc(wrapper: dict) -> bool:
    """Whether an optim_wrapper config applies GC: a GC wrapper, or a GC
    optimizer (Lookahead's inner one), with its GC on."""
    from mmengine.registry import OPTIM_WRAPPERS, OPTIMIZERS

    from .optim_wrapper import CentralizeGradsMixin
    from .optimizers import GCOptimizer, Lookahead, Ranger
    wrapper_type = _registered(OPTIM_WRAPPERS,
                               wrapper.get('type', 'OptimWrapper'))
    if (isinstance(wrapper_type, type)
            and issubclass(wrapper_type, CentralizeGradsMixin)
            and wrapper.get('gc_mode', 'conv_fc') is not None):
        return True
    optimizer = wrapper.get('optimizer') or {}
    optimizer_type = _registered(OPTIMIZERS, optimizer.get('type'))
    if optimizer_type is Ranger:
        return optimizer.get('gc_mode', 'conv_fc') is not None
    if (isinstance(optimizer_type, type)
            and issubclass(optimizer_type, Lookahead)):
        return _applies_gc(dict(optimizer=optimizer.get('optimizer') or {}))
    return (isinstance(optimizer_type, type)
            and issubclass(optimizer_type, GCOptimizer)
            and optimizer.get('gc_mode', 'conv_fc') is not None)


def _zero_stage(strategy: dict) -> int:
    """The ZeRO stage a DeepSpeedStrategy config asks for (DeepSpeed's
    default 0): its zero_optimization, else its config (a dict or a JSON
    file)."""
    config = strategy.get('config') or {}
    if isinstance(config, str):
        with open(config) as f:
            config = json.load(f)
    zero = strategy.get('zero_optimization') or config.get(
        'zero_optimization') or {}
    return int(zero.get('stage', 0))


def check_strategy(cfg: Config) -> None:
    """FlexibleRunner's strategies with GC: refuse, in one line, those that
    hand the optimizer flat shards, where GC would silently do nothing
    (gc_mm/sharding.py refuses them at the first step too, later)."""
    strategy = cfg.get('strategy')
    wrapper = cfg.get('optim_wrapper') or {}
    if not isinstance(strategy, dict) or not _applies_gc(wrapper):
        return
    name = strategy.get('type')
    name = getattr(name, '__name__', name)
    if name == 'FSDPStrategy':
        raise ConfigError(
            'strategy=FSDPStrategy wraps the model with FSDP1 '
            '(FullyShardedDataParallel, use_orig_params=True), which hands '
            'the optimizer flat 1-D shards: GC would silently do nothing. '
            'Train with the default Runner and DDP (tools/dist_train.sh), '
            'or DeepSpeedStrategy with zero_optimization.stage=0; FSDP2 '
            '(torch.distributed.fsdp.fully_shard) keeps GC exact outside '
            "MMEngine's strategies.")
    if name == 'DeepSpeedStrategy':
        wrapper_type = wrapper.get('type', 'OptimWrapper')
        if getattr(wrapper_type, '__name__',
                   wrapper_type) != 'DeepSpeedOptimWrapper':
            raise ConfigError(
                f'strategy=DeepSpeedStrategy steps through optim_wrapper '
                f"type 'DeepSpeedOptimWrapper', not {wrapper_type!r}: for "
                'GC under DeepSpeed, put a GC optimizer (e.g. SGD_GC) in a '
                'DeepSpeedOptimWrapper, with zero_optimization.stage=0.')
        stage = _zero_stage(strategy)
        if stage:
            raise ConfigError(
                f'strategy=DeepSpeedStrategy with ZeRO stage {stage} hands '
                'the optimizer one flat partition per param group: GC would '
                'silently do nothing. Set zero_optimization.stage=0 '
                '(gradients all-reduced as DDP, GC exact), or train with '
                'the default Runner and DDP.')


LOADERS = ('train_dataloader', 'val_dataloader', 'test_dataloader')


def _datasets(cfg: Config, loaders):
    for loader in loaders:
        dataset = (cfg.get(loader) or {}).get('dataset')
        # Unwrap RepeatDataset / ClassBalancedDataset style wrappers.
        while isinstance(dataset, dict) and 'dataset' in dataset:
            dataset = dataset['dataset']
        if isinstance(dataset, dict):
            yield loader, dataset


def _is_local(path: str, backend_args: Optional[dict], where: str) -> bool:
    """Whether mmengine reads ``path`` with ``backend_args`` from this
    machine's files, the only ones a check can look at: other storage
    (``s3://`` through petrel, ``http://``, a ``path_mapping`` of
    ``backend_args``) is read by its backend during the run. A backend that
    cannot be built (petrel_client not installed) is named here."""
    from mmengine.fileio import LocalBackend, get_file_backend
    try:
        backend = get_file_backend(path, backend_args=backend_args)
    except Exception as error:  # ImportError, KeyError: unknown prefix
        raise ConfigError(
            f'{where}={path!r}: no storage backend for it (backend_args='
            f'{backend_args!r}): {type(error).__name__}: {error}') from None
    return isinstance(backend, LocalBackend)


def check_data(cfg: Config, loaders=LOADERS) -> None:
    """Check the data of ``loaders`` (the dataloaders a tool will use), where
    it is local."""
    from mmengine.utils import is_abs
    for loader, dataset in _datasets(cfg, loaders):
        if dataset.get('type') == 'ShapesDataset':
            continue  # generated on first use
        backend_args = dataset.get('backend_args')
        data_root = dataset.get('data_root') or ''
        where = f'{loader}.dataset.data_root'
        if (data_root and _is_local(data_root, backend_args, where)
                and not osp.isdir(data_root)):
            raise ConfigError(
                f'{where}={data_root!r} does not exist (working directory '
                f'{os.getcwd()!r}).')
        ann_file = dataset.get('ann_file')
        if not ann_file:
            continue
        # Joined as mmengine's BaseDataset joins them.
        path = ann_file if is_abs(ann_file) else osp.join(data_root,
                                                          ann_file)
        if not _is_local(path, backend_args, f'{loader}.dataset.ann_file'):
            continue
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


def _first_line(error: Exception) -> str:
    """The gist of a torch.load error (torch's weights_only errors are
    paragraphs; the unpickler's own words follow 'WeightsUnpickler error')."""
    message = str(error).split('WeightsUnpickler error: ')[-1].strip()
    return message.splitlines()[0] if message else type(error).__name__


def _weights_only_load(path: str, what: str, **kwargs) -> None:
    """torch.load(weights_only=True) as the check: a refused global is named
    (torch < 2.6 has no get_unsafe_globals_in_checkpoint; its unpickler says
    'Unsupported class X', later ones 'GLOBAL X was not an allowed global')."""
    try:
        torch.load(path, map_location='cpu', weights_only=True, **kwargs)
    except Exception as error:  # torch raises several types here
        refused = _REFUSED_GLOBAL.search(str(error))
        if refused:
            # A builtin is named without its module ('getattr'), or with
            # Python 2's (torch < 2.4 on protocol 2 pickles).
            name = refused.group(1).replace('__builtin__.', 'builtins.')
            name = name if '.' in name else f'builtins.{name}'
            raise ConfigError(_unsafe_message(path, what, [name])) from None
        raise ConfigError(f'{what}: {path!r} is not a readable PyTorch '
                          f'checkpoint (truncated?): {_first_line(error)}'
                          ) from None


def _unsafe_message(path: str, what: str, unsafe) -> str:
    return (f'{what}: {path!r} cannot be loaded with weights_only=True: it '
            f'pickles {", ".join(sorted(unsafe))} (foreign content, or a '
            'checkpoint written by mmengine without gc_mm imported).')


def _is_legacy_checkpoint(path: str) -> bool:
    """Whether ``path`` is in torch's legacy (non-zip) format, complete up to
    its tensor data: five pickles (magic number, protocol, system info, the
    object, its storage keys), read as opcodes (pickletools executes
    nothing) and ending in the tensor data torch.load reads after them."""
    try:
        with open(path, 'rb') as f:
            head = io.BytesIO(f.read(32))  # the magic number takes 15
            first = [arg for _, arg, _ in pickletools.genops(head)]
            if first[-2:] != [torch.serialization.MAGIC_NUMBER, None]:
                return False
            f.seek(head.tell())
            for _ in range(4):
                for _ in pickletools.genops(f):
                    pass
    except ValueError:  # not a pickle, or one cut short
        return False
    return True


def check_checkpoint_file(path: str, what: str) -> None:
    """Check a local checkpoint: it exists, is a complete torch.save file,
    and its pickle names only types that ``weights_only=True`` allows. The
    zip format (torch >= 1.6) is checked without reading tensor data (its
    data.pkl read statically, or on torch < 2.6 memory-mapped); the legacy
    format (older model zoos) is loaded once here (such files are small).
    The runner then loads it once. torch < 2.4 has no allow-list, so its
    ``weights_only=True`` refuses every training checkpoint of mmengine
    (the message hub's types); the runner loads with torch's default there,
    a full unpickling (README: Supported torch versions), and only the file
    is checked."""
    judge_globals = hasattr(torch.serialization, 'add_safe_globals')
    if not osp.isfile(path):
        raise ConfigError(f'{what}: checkpoint {path!r} does not exist.')
    if osp.getsize(path) == 0:
        raise ConfigError(f'{what}: checkpoint {path!r} is empty.')
    # A truncated zip file has lost the archive's directory, at its end.
    if not zipfile.is_zipfile(path):
        if not _is_legacy_checkpoint(path):
            raise ConfigError(
                f'{what}: {path!r} is not a PyTorch checkpoint (truncated, '
                'or another kind of file).')
        if judge_globals:
            _weights_only_load(path, what)
        return
    if not judge_globals:
        return
    unsafe_globals = getattr(torch.serialization,
                             'get_unsafe_globals_in_checkpoint', None)
    if unsafe_globals is None:  # torch < 2.6
        _weights_only_load(path, what, mmap=True)
        return
    try:
        unsafe = unsafe_globals(path)
    except Exception as error:  # torch raises several types here
        raise ConfigError(f'{what}: {path!r} is not a readable PyTorch '
                          f'checkpoint (truncated?): {error}') from None
    if unsafe:
        raise ConfigError(_unsafe_message(path, what, unsafe))


def check_loaded_checkpoint(checkpoint, path: str, resume: bool) -> None:
    """Check what a loaded checkpoint holds (the runner's one load, through
    :class:`gc_mm.hooks.CheckpointCheckHook`)."""
    what = '--resume' if resume else 'load_from'
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise ConfigError(f'{what}: {path!r} holds no state dict.')
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


CHECKPOINT_NAME = re.compile(r'^(epoch|iter)_(\d+)\.pth$')


def _complete_checkpoints(folder: str) -> list:
    """The complete ``epoch_N.pth`` / ``iter_N.pth`` of ``folder``, newest
    first (a truncated file has lost its archive's directory, at its
    end)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    paths = [osp.join(folder, name) for name in names
             if CHECKPOINT_NAME.match(name)]
    paths = [path for path in paths if zipfile.is_zipfile(path)]
    return sorted(paths, key=osp.getmtime, reverse=True)


def resume_checkpoint(work_dir: str) -> tuple:
    """(checkpoint, note) of ``--resume`` without a path: the one
    ``work_dir/last_checkpoint`` names; where that file is empty, missing
    beside checkpoints, or names a checkpoint that is gone or incomplete (a
    run killed while writing it), the newest complete checkpoint of the
    folder, with a note saying so. (None, None) for a fresh work_dir."""
    marker = osp.join(work_dir, 'last_checkpoint')
    named = ''
    if osp.isfile(marker):
        with open(marker, errors='replace') as f:
            named = f.read().strip()
    if named.startswith(REMOTE_PREFIXES) or (osp.isfile(named)
                                             and zipfile.is_zipfile(named)):
        return named, None
    if not named:
        problem = (f'{marker} is empty' if osp.isfile(marker) else
                   f'{marker} does not exist')
    else:
        problem = (f'{marker} names {named!r}, which is ' +
                   ('incomplete' if osp.isfile(named) else 'gone'))
    folders = [work_dir] + ([osp.dirname(named)] if named else [])
    found = sorted({path for folder in folders
                    for path in _complete_checkpoints(folder)},
                   key=osp.getmtime, reverse=True)
    if found:
        return found[0], (f'{problem} (an interrupted run?); resuming from '
                          f'the newest complete checkpoint, {found[0]}')
    if named or osp.isfile(marker):
        raise ConfigError(f'--resume: {problem} and {work_dir!r} holds no '
                          f'complete checkpoint; remove {marker} to start '
                          'afresh.')
    return None, None


def _latest_checkpoint(work_dir: str) -> Optional[str]:
    return resume_checkpoint(work_dir)[0]


def checkpoint_path(cfg: Config) -> Optional[str]:
    """The checkpoint a run will load: load_from, or with resume and no
    load_from the work directory's latest."""
    path = cfg.get('load_from')
    if cfg.get('resume', False) and not path and cfg.get('work_dir'):
        path = _latest_checkpoint(cfg.work_dir)
    return path


def is_local_checkpoint(path: str) -> bool:
    """Whether mmengine's CheckpointLoader reads ``path`` from this machine's
    files: it reads every ``scheme://`` path ('https://', 'open-mmlab://',
    's3://', 'cluster:s3://') through another loader, as mmengine's fileio
    does; those are left to it."""
    return '://' not in path


def check_checkpoint(cfg: Config) -> None:
    path = checkpoint_path(cfg)
    if not path or not is_local_checkpoint(path):
        return
    check_checkpoint_file(path, '--resume' if cfg.get('resume') else
                          'load_from')


def check_before_run(cfg: Config, loaders=LOADERS) -> None:
    """All checks, in the order a run would hit the problems; the data of
    ``loaders`` only (tools/test.py needs no training data)."""
    check_optim_wrapper(cfg)
    if 'train_dataloader' in loaders:  # a training run
        check_strategy(cfg)
    check_data(cfg, loaders)
    check_checkpoint(cfg)
