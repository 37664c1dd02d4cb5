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
  together (the ranks of a distributed run) build once: the others wait
  for it on a lock the system releases if the builder dies, so a killed
  build never blocks the next one (:func:`_build_lock`).
"""
import contextlib
import fcntl
import functools
import hashlib
import importlib
import importlib.util
import logging
import os
import os.path as osp
import shutil
import struct
import time
from typing import Optional

import torch
from mmengine.logging import print_log

from .flags import KERNELS  # noqa: F401 (re-exported: the kernels' names)
from .flags import cxx_flags, module_name


def library_complete(path: str) -> bool:
    """Whether the shared library ``path`` holds every byte its ELF headers
    point to. A copy cut short (setup.py killed while copying a kernel)
    loses the end of the file, where the section table lies; loading it
    crashes Python with a bus error instead of raising. Files of other
    formats (macOS) are taken as complete unless empty."""
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
        header = f.read(64)
    if header[:4] != b'\x7fELF':
        return size > 0
    if len(header) < 52:
        return False
    order = '<' if header[5] == 1 else '>'
    if header[4] == 2:  # 64-bit
        ph_offset, sh_offset = struct.unpack_from(order + 'QQ', header, 0x20)
        ph_size, ph_count, sh_size, sh_count = struct.unpack_from(
            order + 'HHHH', header, 0x36)
        segment = order + 'IIQQQQ'  # type, flags, offset, addresses, size
    else:
        ph_offset, sh_offset = struct.unpack_from(order + 'II', header, 0x1C)
        ph_size, ph_count, sh_size, sh_count = struct.unpack_from(
            order + 'HHHH', header, 0x2A)
        segment = order + 'IIIII'  # type, offset, addresses, size
    if (ph_offset + ph_size * ph_count > size
            or sh_offset + sh_size * sh_count > size):
        return False
    with open(path, 'rb') as f:
        f.seek(ph_offset)
        table = f.read(ph_size * ph_count)
    for index in range(ph_count):
        fields = struct.unpack_from(segment, table, index * ph_size)
        offset, file_size = ((fields[2], fields[5]) if header[4] == 2 else
                             (fields[1], fields[4]))
        if offset + file_size > size:
            return False
    return True


@functools.cache
def installed(name: str) -> Optional[object]:
    """The kernel ``name`` built at install for this CPU and this torch, or
    None if there is none (installed without torch, or built for another
    CPU or another torch)."""
    spec = importlib.util.find_spec(f'{__name__}._{module_name(name)}')
    if spec is None:  # not built
        return None
    if spec.origin and not library_complete(spec.origin):
        # Loading it would kill Python with a bus error, no message.
        print_log(f'gc_mm: {spec.origin} is incomplete (an install '
                  'interrupted while copying it?) and is not used; the '
                  f'{name} kernel takes its plain path. Reinstall gc_mm '
                  '(tools/install.sh) to rebuild it', logger='current',
                  level=logging.WARNING)
        return None
    try:
        module = importlib.import_module(f'{__name__}._{module_name(name)}')
    except ImportError as error:  # its symbols are not this torch's
        print_log(f'gc_mm: the {name} kernel installed does not load with '
                  f'torch {torch.__version__} ({error}); it takes its plain '
                  'path. Reinstall gc_mm to rebuild it',
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


# Longer than a kernel build takes on a loaded machine (1-3 min).
BUILD_WAIT_S = 900


@contextlib.contextmanager
def _build_lock(folder: str, name: str):
    """Held while this process builds (or loads) a kernel in torch's build
    folder ``folder``: an flock on ``folder/gc_mm.lock``, which the system
    releases when its process dies, however it dies. torch's own ``lock``
    file there outlives a killed build and makes every later build wait on
    it forever, in silence; once this lock is held no build is running, so
    a torch lock is stale and removed. Waits at most GC_MM_BUILD_WAIT_S
    (default 900) for another process's build."""
    os.makedirs(folder, exist_ok=True)
    path = osp.join(folder, 'gc_mm.lock')
    wait = float(os.environ.get('GC_MM_BUILD_WAIT_S', BUILD_WAIT_S))
    with open(path, 'a+') as f:
        start, told = time.monotonic(), False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                f.seek(0)
                owner = f.read().strip() or 'another process'
            if time.monotonic() - start > wait:
                raise RuntimeError(
                    f'gc_mm: the {name} kernel has been building in {owner} '
                    f'for over {wait:.0f} s; if no build is running, remove '
                    f'{path} (GC_MM_BUILD_WAIT_S sets this wait)')
            if not told:
                print_log(f'gc_mm: waiting for {owner}, which builds the '
                          f'{name} kernel in {folder}', logger='current')
                told = True
            time.sleep(0.5)
        f.seek(0)
        f.truncate()
        f.write(f'pid {os.getpid()}')
        f.flush()
        stale = osp.join(folder, 'lock')
        if osp.exists(stale):
            print_log(f'gc_mm: removed {stale}, left by an interrupted build '
                      f'of the {name} kernel', logger='current',
                      level=logging.WARNING)
            os.unlink(stale)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build(name: str):
    """Compile ``gc_mm/kernels/<name>.cpp`` for this CPU (or load the
    build cached by an earlier run)."""
    from torch.utils.cpp_extension import _get_build_directory
    from torch.utils.cpp_extension import load as load_extension
    _put_ninja_on_path()
    source = osp.join(osp.dirname(__file__), f'{name}.cpp')
    # torch's cache rebuilds when a source or a flag changed, not a header
    # it includes: the header's hash goes into the flags.
    with open(osp.join(osp.dirname(__file__), 'rows.h'), 'rb') as header:
        header_hash = hashlib.sha256(header.read()).hexdigest()[:16]
    extension = f'gc_mm_{module_name(name)}'
    # The folder load() builds in (a private function of torch: the folder
    # depends on TORCH_EXTENSIONS_DIR, python and the accelerator).
    folder = _get_build_directory(extension, verbose=False)
    start = time.perf_counter()
    with _build_lock(folder, name):
        try:
            module = load_extension(
                extension, [source], build_directory=folder,
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
