"""This stack's fixes, in one place (torch 2.13, mmengine 0.10.7, mmdet 3.3).

- torch >= 2.6 loads checkpoints with ``weights_only=True``; mmengine's
  checkpoints carry a few non-tensor types (the message hub's HistoryBuffer,
  numpy scalars and arrays). They are allow-listed here; the safety itself
  stays on. A HistoryBuffer also pickled its statistics functions (min,
  max, current, mean) by reference, through ``getattr``, which no safe
  loader may allow; it is pickled without them now (unpickling re-adds
  them), so checkpoints written with gc_mm imported load safely.
- ``torchvision://NAME`` init_cfg URLs are resolved from mmengine's own
  table when torchvision is not installed (there is no CPU torchvision here).
- mmengine writes checkpoints straight into their final path, so a run
  killed mid-write leaves a truncated file that looks like a checkpoint;
  local writes go to a temporary file that is renamed into place
  (:mod:`gc_mm.atomic`). Its CheckpointHook writes ``last_checkpoint``
  with a plain ``open('w')`` and removes the checkpoints past
  ``max_keep_ckpts`` before saving the new one; both are done here in an
  order a kill cannot break (:func:`_save_checkpoint_with_step`).
- mmcv's CPU kernels of NMS and RoIAlign take float32 only; under CPU
  autocast (bfloat16 AMP) they get float32 inputs
  (:func:`enable_cpu_autocast_for_mmcv_ops`).
- setuptools < 82 (which this stack needs for pkg_resources) warns on
  every import of pkg_resources, and mmengine imports it twice per run:
  the tools silence exactly that warning
  (:func:`silence_pkg_resources_warning`).
- mmdet's visualizer jitters mask colours with numpy's global generator,
  so drawing during a validation would change the later random
  augmentation; it gets a generator of its own
  (:func:`keep_numpy_random_state_when_drawing`).
- mmengine's distributed init calls ``torch.cuda.set_device`` and its DDP
  wrapper passes CUDA ``device_ids``; on a machine without CUDA,
  :func:`setup_distributed` starts the process group with gloo itself and
  builds DDP for CPU modules.
"""
import codecs
import importlib.abc
import importlib.util
import json
import logging
import os
import os.path as osp
import sys
import warnings

import numpy as np
import torch
from mmengine.logging import print_log

from .atomic import atomic_write


def checkpoint_safe_globals() -> list:
    """The non-tensor types found in mmengine checkpoints.

    numpy's arrays and scalars unpickle through the functions their
    ``__reduce__`` names (private to numpy, so they are taken from the
    public pickling protocol rather than by module path). numpy 1 named
    them ``numpy.core.multiarray``, numpy 2 ``numpy._core.multiarray``;
    checkpoints written with either load. A numpy array's bytes pickle
    through ``_codecs.encode`` (torch >= 2.5 allows it itself).
    """
    from mmengine.logging import HistoryBuffer
    dtypes = [type(np.dtype(name)) for name in (
        'float64', 'float32', 'float16', 'int64', 'int32', 'int16', 'int8',
        'uint64', 'uint32', 'uint16', 'uint8', 'bool')]
    reconstruct = np.empty(0).__reduce__()[0]
    scalar = np.float64(0).__reduce__()[0]
    return [
        HistoryBuffer, np.ndarray, np.dtype, reconstruct, scalar, *dtypes,
        codecs.encode, *_numpy_1_names(reconstruct, scalar)
    ]


def _numpy_1_names(*functions) -> list:
    """``functions`` under numpy 1's module name, where numpy 2 moved them.

    torch's allow-list matches an entry by its ``__module__`` and name.
    torch >= 2.5 also takes ``(function, name)`` pairs, which torch 2.4's
    loader fails on for every checkpoint (``'tuple' object has no attribute
    '__module__'``); a function named as numpy 1 named it, calling
    numpy's, is an entry every torch with an allow-list takes.
    """
    aliases = []
    for function in functions:
        if function.__module__ == 'numpy.core.multiarray':
            continue  # numpy 1: its own name

        def alias(*args, _function=function):
            return _function(*args)

        alias.__module__ = 'numpy.core.multiarray'
        alias.__name__ = alias.__qualname__ = function.__name__
        aliases.append(alias)
    return aliases


def allow_checkpoint_globals() -> bool:
    """Put mmengine's checkpoint types on torch's ``weights_only``
    allow-list, where torch has one (``add_safe_globals``, torch >= 2.4);
    return whether it has.

    Without one (torch < 2.4) ``weights_only=True`` loads tensors and plain
    containers only, as torch made it, and mmengine's loader, which passes
    no ``weights_only``, gets torch's default (a full unpickling before
    torch 2.6), as it does without gc_mm.
    """
    add_safe_globals = getattr(torch.serialization, 'add_safe_globals', None)
    if add_safe_globals is None:
        return False
    add_safe_globals(checkpoint_safe_globals())
    return True


def _history_buffer_getstate(self) -> dict:
    """HistoryBuffer.__getstate__ without the built-in statistics methods."""
    from mmengine.logging import HistoryBuffer
    state = dict(self.__dict__)
    state['statistics_methods'] = {
        name: method
        for name, method in self._statistics_methods.items()
        if getattr(HistoryBuffer, name, None) is not method
    }
    return state


def torchvision_url(name: str) -> str:
    """The ImageNet checkpoint URL of a torchvision model, from mmengine's
    own table (mmengine/hub/torchvision_0.12.json)."""
    import mmengine
    with open(osp.join(mmengine.__path__[0], 'hub',
                       'torchvision_0.12.json')) as f:
        urls = json.load(f)
    if name not in urls:
        raise KeyError(
            f'torchvision://{name}: unknown torchvision model {name!r} '
            '(torchvision is not installed, so only the ImageNet weights '
            'listed in mmengine/hub/torchvision_0.12.json resolve). Known: '
            f"{', '.join(sorted(urls))}. Or set init_cfg.checkpoint to a "
            'local path or URL.')
    return urls[name]


def _load_from_torchvision(filename, map_location=None):
    from mmengine.runner.checkpoint import load_from_http
    url = torchvision_url(filename.split('://', 1)[1])
    return load_from_http(url, map_location=map_location)


def _atomic_put(self, obj, filepath, encoding: str = 'utf-8') -> None:
    """LocalBackend.put(_text), writing a temporary file renamed into
    place (:func:`gc_mm.atomic.atomic_write`)."""
    atomic_write(filepath, lambda f: f.write(obj),
                 binary=isinstance(obj, bytes), encoding=encoding)


def _remove_checkpoint(file_backend, path: str) -> None:
    if file_backend.isfile(path):
        file_backend.remove(path)
    elif file_backend.isdir(path):  # deepspeed saves folders
        file_backend.rmtree(path)


def _save_checkpoint_with_step(self, runner, step, meta) -> None:
    """CheckpointHook._save_checkpoint_with_step of mmengine 0.10, in an
    order an interruption cannot break: the checkpoint, then
    ``last_checkpoint`` (written atomically; mmengine's ``open('w')`` left
    it empty when killed), then the removal of the checkpoints past
    ``max_keep_ckpts`` (mmengine removed them first, so a save killed with
    ``max_keep_ckpts=1`` left no checkpoint at all)."""
    from mmengine.dist import is_main_process
    outdated = []
    if self.max_keep_ckpts > 0 and not (self.keep_ckpt_ids
                                        and self.keep_ckpt_ids[-1] == step):
        # _save_checkpoint and _save_best_checkpoint may both save a step.
        if len(self.keep_ckpt_ids) == self.max_keep_ckpts:
            outdated.append(self.keep_ckpt_ids.popleft())
        self.keep_ckpt_ids.append(step)
        runner.message_hub.update_info('keep_ckpt_ids',
                                       list(self.keep_ckpt_ids))
    ckpt_filename = self.filename_tmpl.format(step)
    self.last_ckpt = self.file_backend.join_path(self.out_dir, ckpt_filename)
    runner.message_hub.update_info('last_ckpt', self.last_ckpt)
    runner.save_checkpoint(
        self.out_dir,
        ckpt_filename,
        self.file_client_args,
        save_optimizer=self.save_optimizer,
        save_param_scheduler=self.save_param_scheduler,
        meta=meta,
        by_epoch=self.by_epoch,
        backend_args=self.backend_args,
        **self.args)
    if not is_main_process():
        return
    atomic_write(osp.join(runner.work_dir, 'last_checkpoint'),
                 lambda f: f.write(self.last_ckpt), binary=False)
    for old in outdated:
        _remove_checkpoint(
            self.file_backend,
            self.file_backend.join_path(self.out_dir,
                                        self.filename_tmpl.format(old)))


def _atomic_config_dump(dump):
    """Config.dump, writing a ``.py`` file atomically (mmengine opens it
    with ``open('w')``; the runner's dump into work_dir is what gc_table,
    publish_model and infer read back)."""

    def wrapped(self, file=None):
        if file is None or not str(file).endswith('.py'):
            return dump(self, file)
        atomic_write(str(file), lambda f: f.write(self.pretty_text),
                     binary=False)

    wrapped._gc_mm_atomic = True
    return wrapped


class _OwnNumpyGenerator:
    """Runs a function that draws from numpy's global generator on a
    generator of its own, leaving the global one as it was."""

    def __init__(self, func, seed: int = 0):
        self.func = func
        self.state = np.random.RandomState(seed).get_state()

    def __call__(self, *args, **kwargs):
        outside = np.random.get_state()
        np.random.set_state(self.state)
        try:
            return self.func(*args, **kwargs)
        finally:
            self.state = np.random.get_state()
            np.random.set_state(outside)


def _jitter_colors_on_own_generator(local_visualizer) -> None:
    if not isinstance(local_visualizer.jitter_color, _OwnNumpyGenerator):
        local_visualizer.jitter_color = _OwnNumpyGenerator(
            local_visualizer.jitter_color)


class _PatchOnImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Applies ``patch`` to module ``name`` right after its first import,
    so that gc_mm's import does not import it."""

    def __init__(self, name: str, patch):
        self.name, self.patch, self.loader = name, patch, None

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name or self.loader is not None:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            self.loader, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = self.loader
        self.loader.exec_module(module)
        self.patch(module)


def keep_numpy_random_state_when_drawing() -> None:
    """mmdet's visualizer jitters each mask's colour with numpy's global
    generator (``jitter_color``), so drawing predictions during a
    validation (DetVisualizationHook) would change the random augmentation
    of every later epoch, and what a resumed run draws. The jitter is drawn
    from a generator of its own instead. Idempotent; mmdet's visualizer is
    patched when it is first imported."""
    name = 'mmdet.visualization.local_visualizer'
    if name in sys.modules:
        _jitter_colors_on_own_generator(sys.modules[name])
    elif not any(isinstance(f, _PatchOnImport) and f.name == name
                 for f in sys.meta_path):
        sys.meta_path.insert(
            0, _PatchOnImport(name, _jitter_colors_on_own_generator))


def apply() -> None:
    """Apply the fixes that are safe at import time (idempotent)."""
    keep_numpy_random_state_when_drawing()
    from mmengine.fileio import LocalBackend
    from mmengine.logging import HistoryBuffer
    allow_checkpoint_globals()
    HistoryBuffer.__getstate__ = _history_buffer_getstate
    LocalBackend.put = _atomic_put
    LocalBackend.put_text = _atomic_put
    from mmengine.hooks import CheckpointHook
    CheckpointHook._save_checkpoint_with_step = _save_checkpoint_with_step
    from mmengine.config import Config
    if not getattr(Config.dump, '_gc_mm_atomic', False):
        Config.dump = _atomic_config_dump(Config.dump)
    if importlib.util.find_spec('torchvision') is None:
        from mmengine.runner import CheckpointLoader
        CheckpointLoader.register_scheme(
            prefixes=('torchvision://', 'modelzoo://'),
            loader=_load_from_torchvision,
            force=True)


def silence_pkg_resources_warning() -> None:
    """Hide setuptools' "pkg_resources is deprecated as an API" UserWarning,
    which mmengine's ``is_installed`` triggers (on import and on reload) in
    every run: the stack needs pkg_resources, the user can do nothing about
    it. Every other warning, of setuptools too, still shows."""
    warnings.filterwarnings(
        'ignore', message='pkg_resources is deprecated as an API',
        category=UserWarning)


def grad_scaler(device: str, **kwargs):
    """AMP's loss scaler for ``device``: ``torch.amp.GradScaler`` (torch >=
    2.3, CUDA and CPU); before it, torch's CUDA scaler, and none for the
    CPU (refused here: a step would go unscaled and unchecked)."""
    if hasattr(torch.amp, 'GradScaler'):
        return torch.amp.GradScaler(device, **kwargs)
    if device == 'cuda':
        return torch.cuda.amp.GradScaler(**kwargs)
    raise RuntimeError(
        f'AMP on {device} needs torch.amp.GradScaler, which torch '
        f'{torch.__version__} does not have (torch >= 2.3 has it): train '
        'without AMP there, or on CUDA.')


def cpu_autocast_enabled() -> bool:
    """Whether autocast is on for the CPU: ``torch.is_autocast_enabled``
    takes a device from torch 2.4 on; before, the CPU had a function of its
    own."""
    try:
        return torch.is_autocast_enabled('cpu')
    except TypeError:  # takes no argument
        return torch.is_autocast_cpu_enabled()


def _float32_on_cpu_autocast(forward):
    """Wrap RoIAlign.forward: float32 inside CPU autocast, output cast back
    to the features' dtype (the casts are autograd ops, so backward too)."""

    def wrapped(self, features, rois):
        if features.device.type != 'cpu' or not cpu_autocast_enabled():
            return forward(self, features, rois)
        with torch.autocast('cpu', enabled=False):
            return forward(self, features.float(),
                           rois.float()).to(features.dtype)

    wrapped._gc_mm_float32_on_cpu = True
    return wrapped


def enable_cpu_autocast_for_mmcv_ops() -> None:
    """Run mmcv's NMS and RoIAlign in float32 inside CPU autocast regions
    (idempotent; CUDA autocast is untouched). Without mmcv's ops (torch
    and mmengine alone) there is nothing to patch."""
    try:
        from mmcv.ops import RoIAlign
        from mmcv.ops.nms import NMSop
    except ModuleNotFoundError as error:  # no mmcv, or built without ops
        if not (error.name or '').startswith('mmcv'):
            raise
        return
    if getattr(RoIAlign.forward, '_gc_mm_float32_on_cpu', False):
        return
    RoIAlign.forward = _float32_on_cpu_autocast(RoIAlign.forward)
    NMSop.forward = staticmethod(_float32_inputs_on_cpu_autocast(
        NMSop.forward))


def _float32_inputs_on_cpu_autocast(forward):
    """Wrap NMSop.forward: float32 inputs inside CPU autocast (NMS returns
    indices only), as ``torch.amp.custom_fwd(device_type='cpu',
    cast_inputs=torch.float32)`` does, which torch < 2.4 does not have."""

    def wrapped(ctx, *args):
        if not cpu_autocast_enabled():
            return forward(ctx, *args)
        with torch.autocast('cpu', enabled=False):
            return forward(ctx, *(
                arg.float() if torch.is_tensor(arg) and arg.is_cpu
                and arg.is_floating_point() else arg for arg in args))

    return wrapped


def setup_distributed(cfg, launcher: str) -> None:
    """Prepare ``cfg`` (and the process group) for a run without CUDA.

    With CUDA, mmengine initializes the process group as usual (for
    launcher='slurm' only MASTER_PORT gets a default here, see below).
    Without it, a 'nccl' backend becomes 'gloo', the process group is
    initialized here (mmengine's init would call torch.cuda.set_device) and
    DDP is built for CPU modules (no device_ids).

    launcher='pytorch' (torchrun) takes RANK, WORLD_SIZE, MASTER_ADDR and
    MASTER_PORT from the environment. launcher='slurm' (srun) sets them from
    SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID and the first host of
    SLURM_NODELIST, as mmengine does; MASTER_ADDR and MASTER_PORT already in
    the environment win. MASTER_PORT defaults to one derived from
    SLURM_JOB_ID, so that two jobs sharing a node do not collide on
    mmengine's fixed 29500.
    """
    if launcher == 'slurm':
        _slurm_environment(cpu=not torch.cuda.is_available())
    if launcher == 'none' or torch.cuda.is_available():
        return
    if launcher not in ('pytorch', 'slurm'):
        raise ValueError(
            f'launcher={launcher!r} without CUDA is not supported; use '
            'launcher=pytorch (tools/dist_train.sh) or slurm '
            '(tools/slurm_train.sh)')
    dist_cfg = cfg.setdefault('env_cfg', {}).setdefault('dist_cfg', {})
    if dist_cfg.get('backend', 'nccl') == 'nccl':
        print_log('No CUDA: distributed training uses the gloo backend.',
                  logger='current', level=logging.INFO)
        dist_cfg['backend'] = 'gloo'
    wrapper_cfg = cfg.get('model_wrapper_cfg') or dict(
        type='MMDistributedDataParallel')
    wrapper_cfg.setdefault('device_ids', None)
    cfg.model_wrapper_cfg = wrapper_cfg
    if not torch.distributed.is_initialized():
        options = {k: v for k, v in dist_cfg.items() if k != 'backend'}
        if 'timeout' in options:
            import datetime
            options['timeout'] = datetime.timedelta(
                seconds=options['timeout'])
        torch.distributed.init_process_group(
            backend=dist_cfg['backend'],
            rank=int(os.environ['RANK']),
            world_size=int(os.environ['WORLD_SIZE']),
            **options)


def _slurm_environment(cpu: bool) -> None:
    """Set MASTER_PORT (and, for a CPU run, RANK, WORLD_SIZE, LOCAL_RANK and
    MASTER_ADDR) from the SLURM_* variables srun gives every task."""
    missing = [name for name in ('SLURM_PROCID', 'SLURM_NTASKS',
                                 'SLURM_NODELIST', 'SLURM_JOB_ID')
               if name not in os.environ]
    if missing:
        raise RuntimeError(
            f'launcher=slurm: {", ".join(missing)} not set; start the '
            'tasks with srun (tools/slurm_train.sh, tools/slurm_test.sh)')
    # Unprivileged and below Linux's ephemeral range (32768+).
    os.environ.setdefault('MASTER_PORT',
                          str(20000 + int(os.environ['SLURM_JOB_ID']) % 10000))
    if not cpu:
        return  # mmengine's _init_dist_slurm sets the rest
    if 'MASTER_ADDR' not in os.environ:
        import subprocess
        nodes = os.environ['SLURM_NODELIST']
        try:
            hosts = subprocess.run(['scontrol', 'show', 'hostnames', nodes],
                                   capture_output=True, text=True,
                                   check=True).stdout.split()
        except (OSError, subprocess.CalledProcessError) as error:
            raise RuntimeError(
                f'launcher=slurm: cannot expand SLURM_NODELIST={nodes!r} '
                f'with scontrol ({error}); set MASTER_ADDR') from error
        os.environ['MASTER_ADDR'] = hosts[0]
    os.environ['RANK'] = os.environ['SLURM_PROCID']
    os.environ['WORLD_SIZE'] = os.environ['SLURM_NTASKS']
    os.environ['LOCAL_RANK'] = os.environ.get('SLURM_LOCALID', '0')
