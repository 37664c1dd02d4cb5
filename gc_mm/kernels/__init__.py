"""C++ kernels of the opt-in fused optimizer paths (``fused=True``).

They are compiled with torch's own extension builder the first time a fused
step runs (45-50 s on 2 cores) and cached in torch's extension
directory (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``),
so later runs load them in a tenth of a second. Processes that start together (the
ranks of a distributed run) wait on torch's build lock and build once.
"""
import os
import os.path as osp
import shutil
import time

from mmengine.logging import print_log

_loaded = {}


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


def load(name: str):
    """The compiled module of ``gc_mm/kernels/<name>.cpp``."""
    if name not in _loaded:
        from torch.utils.cpp_extension import load as build
        _put_ninja_on_path()
        source = osp.join(osp.dirname(__file__), f'{name}.cpp')
        start = time.perf_counter()
        try:
            _loaded[name] = build(f'gc_mm_{name}', [source],
                                  extra_cflags=['-O3'])
        except Exception as error:
            raise RuntimeError(
                f'fused=True needs gc_mm/kernels/{name}.cpp compiled, which '
                'needs a C++ compiler (g++) and ninja; building it failed: '
                f'{error}. Use the default path (fused=False) instead.'
            ) from error
        print_log(f'gc_mm: fused {name} kernel ready in '
                  f'{time.perf_counter() - start:.1f} s', logger='current')
    return _loaded[name]
