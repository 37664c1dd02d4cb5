"""C++ kernels of the opt-in fused optimizer paths (``fused=True``).

They are compiled with torch's own extension builder the first time a fused
step runs (about a minute on 2 cores) and cached in torch's extension
directory (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``),
so later runs load them in a second. Processes that start together (the
ranks of a distributed run) wait on torch's build lock and build once.
"""
import os.path as osp
import time

from mmengine.logging import print_log

_loaded = {}


def load(name: str):
    """The compiled module of ``gc_mm/kernels/<name>.cpp``."""
    if name not in _loaded:
        from torch.utils.cpp_extension import load as build
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
