# Publish a trained detector for stock MMDetection: MMDetection's
# tools/model_converters/publish_model.py, plus an inference config that
# needs no gc_mm. Writes OUT_DIR/<name>-<sha256[:8]>.pth (the weights and
# plain metadata, loadable with torch's weights_only=True without gc_mm)
# and OUT_DIR/<name>.py. A pruned model (tools/prune.py) is the exception:
# its config keeps gc_mm.pruning in custom_imports, whose PrunedModel
# rebuilds the pruned architecture (the checkpoint alone needs no gc_mm).
import argparse
import copy
import hashlib
import inspect
import io
import os
import os.path as osp
import sys

import torch
from mmengine.config import Config

import gc_mm  # noqa: F401  (registers gc_mm, allow-lists its checkpoints)
import gc_mm.pruning  # noqa: F401  (registers PrunedModel)
from gc_mm.atomic import WriteError, atomic_write
from gc_mm.checks import ConfigError, check_checkpoint_file
from gc_mm.compat import silence_pkg_resources_warning

# Before Config.fromfile, whose mmengine imports pkg_resources.
silence_pkg_resources_warning()

# What only training (or only a run of gc_mm's tools) reads.
TRAINING_KEYS = ('optimizer', 'optim_wrapper', 'param_scheduler',
                 'train_cfg', 'train_dataloader', 'auto_scale_lr', 'work_dir',
                 'launcher')
HOOK_KEYS = ('custom_hooks', 'default_hooks')
# The one gc_mm type a published config keeps (model.type of a pruned
# model), and the import that registers it.
PRUNED_MODEL, PRUNED_IMPORT = 'PrunedModel', 'gc_mm.pruning'


def parse_args():
    parser = argparse.ArgumentParser(
        description='Publish a checkpoint and an inference config that '
        'stock MMDetection loads without gc_mm')
    parser.add_argument('config', help='the config the model was trained with')
    parser.add_argument('checkpoint',
                        help='checkpoint file (e.g. epoch_20.pth)')
    parser.add_argument('out_dir', help='folder for <name>-<sha8>.pth and '
                        '<name>.py (created if missing)')
    return parser.parse_args()


def gc_mm_types() -> dict:
    """{type name: class} of everything gc_mm registered, in MMEngine's and
    MMDetection's registries."""
    import mmdet.registry
    import mmengine.registry
    from mmengine.registry import Registry
    registries = [r for module in (mmengine.registry, mmdet.registry)
                  for r in vars(module).values() if isinstance(r, Registry)]
    return {name: cls for registry in registries
            for name, cls in registry.module_dict.items()
            if cls.__module__.split('.')[0] == 'gc_mm'}


def _stock_dataset(cls):
    """The first MMDetection dataset class a gc_mm dataset derives from."""
    from mmdet.registry import DATASETS
    for base in cls.__mro__[1:]:
        if (base.__module__.split('.')[0] != 'gc_mm'
                and DATASETS.get(base.__name__) is base):
            return base
    return None


def _replace_dataset(dataset: dict, cls, where: str, notes: list) -> None:
    """Turn ``dataset`` (a gc_mm dataset class derived from an MMDetection
    one) into that MMDetection class, with the same classes and palette."""
    base = _stock_dataset(cls)
    if base is None:
        raise ConfigError(
            f'{where}.type={dataset["type"]!r} is a gc_mm dataset that '
            'derives from no MMDetection dataset; the published config '
            'cannot name it without gc_mm.')
    # Arguments only the gc_mm class takes (e.g. ShapesDataset's generator).
    own = set()
    for klass in cls.__mro__:
        if klass is base:
            break
        own |= {name for name, p in inspect.signature(
            klass.__init__).parameters.items() if p.kind == p.KEYWORD_ONLY
            or (p.kind == p.POSITIONAL_OR_KEYWORD and name != 'self')}
    for name in own:
        dataset.pop(name, None)
    metainfo = dict(getattr(cls, 'METAINFO', {}))
    metainfo.update(dataset.get('metainfo') or {})
    dataset['metainfo'] = {
        key: list(metainfo[key]) for key in ('classes', 'palette')
        if key in metainfo}
    note = (f'config used {dataset["type"]} from gc_mm; the published '
            f'config uses {base.__name__} with the same classes')
    if note not in notes:
        notes.append(note)
    dataset['type'] = base.__name__


def _walk(node, where: str, types: dict, notes: list):
    """Check every ``type`` under ``node``; gc_mm datasets are replaced, any
    other gc_mm type is refused."""
    from mmengine.dataset import BaseDataset
    if isinstance(node, (list, tuple)):
        for index, item in enumerate(node):
            _walk(item, f'{where}.{index}', types, notes)
        return
    if not isinstance(node, dict):
        return
    cls = types.get(node.get('type')) if isinstance(node.get('type'),
                                                    str) else None
    if where == 'model' and node.get('type') == PRUNED_MODEL:
        pass  # kept, with its import (inference_config)
    elif cls is not None:
        if isinstance(cls, type) and issubclass(cls, BaseDataset):
            _replace_dataset(node, cls, where, notes)
        else:
            raise ConfigError(
                f'{where}.type={node["type"]!r} is a gc_mm class: the model '
                'needs gc_mm, so it cannot be published for stock '
                'MMDetection.')
    for key, value in node.items():
        _walk(value, f'{where}.{key}' if where else key, types, notes)


def _own_imports(cfg: Config, notes: list) -> list:
    """Leave gc_mm out of ``cfg.custom_imports``; return the modules kept
    (the user's own: the model may need what they register)."""
    custom = cfg.pop('custom_imports', None)
    if not custom:
        return []
    imports = custom.get('imports') or []
    imports = [imports] if isinstance(imports, str) else list(imports)
    kept = [name for name in imports if name.split('.')[0] != 'gc_mm']
    if kept:
        cfg.custom_imports = dict(custom, imports=kept)
        notes.append(f'custom_imports: {", ".join(kept)} kept (not gc_mm): '
                     'the published pair needs '
                     f'{"it" if len(kept) == 1 else "them"} importable')
    return kept


def config_dataset_meta(dataset: dict) -> dict:
    """The classes (and palette) a test dataset config gives its model, as
    MMEngine's BaseDataset sets them: its class's METAINFO updated by the
    config's metainfo."""
    from mmdet.registry import DATASETS
    while isinstance(dataset.get('dataset'), dict):  # RepeatDataset & co.
        dataset = dataset['dataset']
    kind = dataset.get('type')
    cls = DATASETS.get(kind) if isinstance(kind, str) else kind
    meta = dict(getattr(cls, 'METAINFO', None) or {})
    meta.update(dataset.get('metainfo') or {})
    return {key: meta[key] for key in ('classes', 'palette') if key in meta}


def inference_config(cfg: Config):
    """The inference config of ``cfg``: without what training and gc_mm's
    tools read, gc_mm's hooks and imports left out and gc_mm datasets
    replaced by the MMDetection dataset they derive from. Returns (config,
    notes): one sentence per change a user should know of."""
    cfg = copy.deepcopy(cfg)
    types, notes = gc_mm_types(), []
    for key in TRAINING_KEYS:
        cfg.pop(key, None)
    kept = _own_imports(cfg, notes)
    if (cfg.get('model') or {}).get('type') == PRUNED_MODEL:
        cfg.custom_imports = dict(imports=kept + [PRUNED_IMPORT],
                                  allow_failed_imports=False)
        notes.append(f'the model is pruned (tools/prune.py): custom_imports '
                     f'keeps {PRUNED_IMPORT}, whose {PRUNED_MODEL} rebuilds '
                     'it, so loading the config needs gc_mm installed')
    cfg.load_from, cfg.resume = None, False
    for key in HOOK_KEYS:
        hooks = cfg.get(key)
        if not hooks:
            continue
        named = hooks.items() if isinstance(hooks, dict) else enumerate(hooks)
        dropped = [(name, hook) for name, hook in named
                   if isinstance(hook, dict) and hook.get('type') in types]
        for name, hook in reversed(dropped):
            notes.append(f'{key}: {hook["type"]} (a gc_mm hook) left out')
            hooks.pop(name)
    if cfg.get('dataset_type') in types:
        # A variable of the source config, no longer read: keep it truthful.
        base = _stock_dataset(types[cfg.dataset_type])
        if base is not None:
            cfg.dataset_type = base.__name__
    for key in list(cfg.keys()):
        value = cfg[key]
        plain = value.to_dict() if hasattr(value, 'to_dict') else value
        _walk(plain, key, types, notes)
        cfg[key] = plain
    return cfg, notes


def plain(value, where: str):
    """``value`` as the plain Python types torch's weights_only unpickler
    takes without an allow-list (numpy scalars become Python numbers)."""
    # Exact types: subclasses (torch's TorchVersion, numpy.float64) pickle
    # by their class, which the unpickler would refuse.
    if value is None:
        return value
    for kind in (bool, int, float, str):
        if isinstance(value, kind):
            return kind(value)
    if hasattr(value, 'item') and getattr(value, 'ndim', None) == 0:
        return value.item()
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v, f'{where}[{i}]')
                           for i, v in enumerate(value))
    if isinstance(value, dict):
        return {str(k): plain(v, f'{where}.{k}') for k, v in value.items()}
    raise ConfigError(f'{where}: {type(value).__name__} is not a plain type; '
                      'a published checkpoint holds plain types only.')


def published_meta(cfg: Config, checkpoint: dict, config_name: str,
                   test_dataset: dict) -> dict:
    import mmdet
    import mmengine
    old = checkpoint.get('meta') or {}
    dataset_meta = dict(old.get('dataset_meta') or {})
    if 'classes' not in dataset_meta:
        dataset_meta.update(config_dataset_meta(test_dataset))
    if 'classes' not in dataset_meta:
        raise ConfigError('the checkpoint has no meta.dataset_meta.classes '
                          'and the test dataset no classes: a published '
                          'model needs its class names.')
    wrapper = cfg.get('optim_wrapper') or {}
    meta = dict(
        dataset_meta={k: dataset_meta[k] for k in ('classes', 'palette')
                      if k in dataset_meta},
        config=config_name,
        optimizer=(wrapper.get('optimizer') or cfg.get('optimizer')
                   or {}).get('type'),
        optim_wrapper=wrapper.get('type', 'OptimWrapper') if wrapper else None,
        gc_mm_version=gc_mm.__version__,
        mmdet_version=mmdet.__version__,
        mmengine_version=mmengine.__version__,
        torch_version=torch.__version__)
    for key in ('epoch', 'iter'):
        if key in old:
            meta[key] = old[key]
    return plain(meta, 'meta')


def load_state_dict(path: str) -> tuple:
    check_checkpoint_file(path, 'CHECKPOINT')
    checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    state = checkpoint.get('state_dict') if isinstance(checkpoint,
                                                       dict) else None
    if not isinstance(state, dict) or not state or not all(
            torch.is_tensor(v) for v in state.values()):
        raise ConfigError(f'CHECKPOINT: {path!r} has no state_dict of '
                          'tensors (not a checkpoint of MMEngine?).')
    return checkpoint, state


def check_model_loads(cfg: Config, state: dict, path: str) -> None:
    """The published config's model takes the weights exactly (strict)."""
    from mmengine.registry import init_default_scope
    from mmdet.registry import MODELS
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    model_cfg = cfg.model.copy()
    if 'init_cfg' in model_cfg.get('backbone', {}):
        model_cfg.backbone.init_cfg = None  # no download, as init_detector
    model = MODELS.build(model_cfg)
    own = model.state_dict()
    # load_state_dict raises at a shape that differs (another num_classes),
    # with a traceback: those are named first, as the keys are.
    shapes = [f'{key} {list(value.shape)} (model {list(own[key].shape)})'
              for key, value in state.items()
              if key in own and value.shape != own[key].shape]
    if shapes:
        missing = [key for key in own if key not in state]
        unexpected = [key for key in state if key not in own]
    else:
        result = model.load_state_dict(state, strict=False)
        missing, unexpected = result.missing_keys, result.unexpected_keys
    problems = [f'{what}: {", ".join(keys[:5])}' +
                (f' and {len(keys) - 5} more' if len(keys) > 5 else '')
                for what, keys in (('shapes', shapes), ('missing', missing),
                                   ('unexpected', unexpected))
                if keys]
    if problems:
        raise ConfigError(f'CHECKPOINT: {path!r} does not fit the model of '
                          f'CONFIG ({"; ".join(problems)}).')


def write_pair(published: dict, cfg: Config, out_dir: str,
               name: str) -> tuple:
    """Write OUT_DIR/<name>-<sha8>.pth and OUT_DIR/<name>.py, each
    atomically (:func:`gc_mm.atomic.atomic_write`); on any failure nothing
    is left (not even a folder this call created). A full disk or a
    read-only OUT_DIR raises :class:`gc_mm.atomic.WriteError`."""
    with io.BytesIO() as buffer:
        torch.save(published, buffer)
        data = buffer.getvalue()
    finals = (osp.join(out_dir, f'{name}-'
                       f'{hashlib.sha256(data).hexdigest()[:8]}.pth'),
              osp.join(out_dir, f'{name}.py'))
    created = not osp.isdir(out_dir)
    placed = []
    try:
        atomic_write(finals[0], lambda f: f.write(data))
        placed.append(finals[0])
        atomic_write(finals[1], lambda f: f.write(cfg.pretty_text),
                     binary=False)
    except BaseException:
        for path in placed:
            os.unlink(path)
        if created and osp.isdir(out_dir):
            os.rmdir(out_dir)
        raise
    return finals


def existing_outputs(out_dir: str, name: str) -> list:
    if not osp.isdir(out_dir):
        return []
    return sorted(f for f in os.listdir(out_dir) if f == f'{name}.py' or (
        f.startswith(f'{name}-') and f.endswith('.pth')
        and len(f) == len(name) + 13))


def publish(config: str, checkpoint_path: str, out_dir: str) -> tuple:
    """Write the published pair; return (checkpoint path, config path,
    notes, the modules the pair needs: the user's own custom_imports).
    Everything is checked before anything is written."""
    if not osp.isfile(config):
        raise ConfigError(f'CONFIG: {config!r} does not exist.')
    name = osp.splitext(osp.basename(config))[0]
    if osp.exists(out_dir) and not osp.isdir(out_dir):
        raise ConfigError(f'OUT_DIR: {out_dir!r} is a file.')
    taken = existing_outputs(out_dir, name)
    if taken:
        raise ConfigError(f'OUT_DIR: {out_dir!r} already holds '
                          f'{", ".join(taken)}; choose another folder or '
                          'remove them.')
    cfg = Config.fromfile(config)
    checkpoint, state = load_state_dict(checkpoint_path)
    published_cfg, notes = inference_config(cfg)
    check_model_loads(published_cfg, state, checkpoint_path)
    meta = published_meta(cfg, checkpoint, f'{name}.py',
                          published_cfg.test_dataloader.dataset)
    # The loaded OrderedDict, with the _metadata (module versions) that
    # load_state_dict reads; map_location put every tensor on the CPU.
    published = {'meta': meta, 'state_dict': state}

    weights_path, config_path = write_pair(published, published_cfg,
                                           out_dir, name)
    needs = (published_cfg.get('custom_imports') or {}).get('imports', [])
    return weights_path, config_path, notes, needs


def main():
    args = parse_args()
    try:
        weights, config, notes, needs = publish(
            args.config, args.checkpoint, args.out_dir)
    except ConfigError as error:
        sys.exit(f'error: {error}')
    except WriteError as error:  # a full disk or a read-only OUT_DIR
        sys.exit(f'error: {error}')
    for note in notes:
        print(f'Note: {note}.')
    # The user's own custom_imports stay: the pair needs them; gc_mm only
    # for a pruned model (gc_mm.pruning).
    own = [name for name in needs if name != PRUNED_IMPORT]
    needing = (f', with {", ".join(own)} importable (the config\'s '
               'custom_imports)' if own else '')
    where = (f'with gc_mm installed (for {PRUNED_IMPORT}; the checkpoint '
             'alone loads without it)' if PRUNED_IMPORT in needs else
             'without gc_mm')
    print(f'Published checkpoint: {weights}\n'
          f'Inference config: {config}\n'
          f'Both load {where}{needing}: mmdet.apis.init_detector('
          'config, checkpoint) or tools/infer.py.')


if __name__ == '__main__':
    main()
