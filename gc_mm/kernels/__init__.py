"""C++ kernels of the fused optimizer paths.

A kernel comes from one of two builds, both for this CPU's instruction set
(see :mod:`gc_mm.kernels.flags`):

- at install: ``pip install --no-build-isolation --use-pep517 -e .`` with
  torch present (what tools/install.sh runs) compiles
  ``gc_mm/kernels/_<name>_<isa>``.
  :func:`installed` returns it, and SGD uses it by default on CPU.
- on first use: ``fused=True`` without an installed kernel compiles it with
  torch's extension builder (about a minute) into torch's extension
  directory (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``),
  where later runs load it in a tenth of a second. Processes that start
  together (the ranks of a distributed run) wait on torch's build lock and
  build once.
"""
import functools
import hashlib
import importlib
import importlib.util
import logging
import os
import os.path as osp
import shutil
import time
from typing import Optional

import torch
from mmengine.logging import print_log

from .flags import KERNELS  # noqa: F401 (re-exported: the kernels' names)
from .flags import cxx_flags, module_name


@functools.cache
def installed(name: str) -> Optional[object]:
    """The kernel ``name`` built at install for this CPU and this torch, or
    None if there is none (installed without torch, or built for another
    CPU or another torch)."""
    try:
        module = importlib.import_module(f'{__name__}._{module_name(name)}')
    except ImportError as error:  # not built, or its symbols are not this
        # torch's (said: an install that does not load)
        if not isinstance(error, ModuleNotFoundError):
            print_log(f'gc_mm: the {name} kernel installed does not load '
                      f'with torch {torch.__version__} ({error}); it takes '
                      'its plain path. Reinstall gc_mm to rebuild it',
                      logger='current', level=logging.WARNING)
        return None
    built_for = module.torch_version
    if built_for != torch.__version__.split('+')[0]:
        print_log(f'gc_mm: the {name} kernel installed with torch '
                  f'{built_for} is not used with torch {torch.__version__}; '
                  'reinstall gc_mm to rebuild it', logger='current',
                  level=logging.WARNING)
        return None
    return module


def _put_ninja_on_path() -> None:
    """torch runs ``ninja`` from PATH; pip's ninja lives in the environment's
    bin directory, which is not on PATH when that environment's python is
    run without activating it (``.venv/bin/python tools/train.py``)."""
    if shutil.which('ninja') is not None:
        return
    try:
        import ninja
    except ImportError:
        return  # torch's build then says that ninja is missing
    os.environ['PATH'] = ninja.BIN_DIR + os.pathsep + os.environ['PATH']


def build(name: str):
    """Compile ``gc_mm/kernels/<name>.cpp`` for this CPU (or load the
    build cached by an earlier run)."""
    from torch.utils.cpp_extension import load as load_extension
    _put_ninja_on_path()
    source = osp.join(osp.dirname(__file__), f'{name}.cpp')
    # torch's cache rebuilds when a source or a flag changed, not a header
    # it includes: the header's hash goes into the flags.
    with open(osp.join(osp.dirname(__file__), 'rows.h'), 'rb') as header:
        header_hash = hashlib.sha256(header.read()).hexdigest()[:16]
    start = time.perf_counter()
    try:
        module = load_extension(
            f'gc_mm_{module_name(name)}', [source],
            extra_cflags=cxx_flags() + [f'-DGC_MM_ROWS_H={header_hash}'])
    except Exception as error:
        raise RuntimeError(
            f'fused=True needs gc_mm/kernels/{name}.cpp compiled, which '
            'needs a C++ compiler (g++) and ninja; building it failed: '
            f'{error}. Use the default path (fused=None) instead.'
        ) from error
    print_log(f'gc_mm: fused {name} kernel ready in '
              f'{time.perf_counter() - start:.1f} s', logger='current')
    return module


@functools.cache
def load(name: str):
    """The kernel ``name``: the installed one, else built on first use."""
    return installed(name) or build(name)



@functools.cache
def triton_available() -> bool:
    """Whether triton is installed: SGD_GC's kernel for CUDA tensors
    (:mod:`gc_mm.kernels.triton_sgd`, imported when first used) needs it."""
    return importlib.util.find_spec('triton') is not None
