#!/usr/bin/env bash
# Sets up .venv/ with gc_mm and its stack (torch 2.13 CPU, mmengine, mmcv
# 2.1.0 built with its ops, mmdet 3.3, pycocotools, tensorboard, pytest).
# The first run builds mmcv (about 20 minutes on 2 cores; pip caches the
# wheel) and gc_mm's kernels (about 3 min); later runs take seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
# A .venv whose creation was interrupted (Ctrl-C during `python -m venv`)
# has a python without pip: it is made again.
if ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
    echo "Creating .venv..."
    "$python" -m venv --clear .venv
fi
pip() { .venv/bin/python -m pip "$@"; }

echo "Installing torch, mmengine and tensorboard (skipped where present)..."
# tensorboard: for MMEngine's TensorboardVisBackend (and its test); triton:
# SGD_GC's CUDA kernel, which tests/test_triton.py runs here in Triton's
# interpreter (torch's CUDA wheels bring triton themselves).
pip install -q "setuptools>=77,<82" wheel ninja torch==2.13.0 numpy mmengine \
    tensorboard triton
if ! .venv/bin/python -c 'import mmcv.ops' 2>/dev/null; then
    echo "Installing mmcv 2.1.0 with its ops (a fresh machine builds it once, ~20 min)..."
    # Without --no-build-isolation the build silently yields no ops.
    MMCV_WITH_OPS=1 pip install --no-build-isolation mmcv==2.1.0
fi
# gc_mm, editable. setup.py compiles its C++ kernels for this CPU against
# the torch above (about 3 min; --use-pep517 makes pip 23 run setup.py's
# build, whose legacy `develop` would skip it), so this is skipped while
# gc_mm (this checkout) and its dependencies are installed in .venv and
# every kernel is installed and newer than everything it is built from.
# Checked from outside the repository, where gc_mm imports only if pip
# installed it (the kernels alone are no proof: an install interrupted
# after copying them left mmdet and gc_mm out).
repo=$(pwd)
gc_mm_installed() {
    (cd / && "$repo/.venv/bin/python" - "$repo" <<'EOF'
import os.path as osp, sys
import mmdet, pycocotools, pytest  # noqa: F401
import gc_mm, gc_mm.kernels as k
here = osp.realpath(osp.dirname(osp.dirname(gc_mm.__file__)))
sys.exit(here != osp.realpath(sys.argv[1])
         or not all(k.installed(n) for n in k.KERNELS))
EOF
    ) >/dev/null 2>&1
}
oldest=$(ls -tr gc_mm/kernels/_*.so 2>/dev/null | head -n1 || true)
if [ -z "$oldest" ] \
    || [ -n "$(find setup.py gc_mm/kernels -newer "$oldest" \( -name '*.py' -o -name '*.cpp' -o -name '*.h' \))" ] \
    || ! gc_mm_installed; then
    echo "Installing gc_mm and compiling its kernels (about 3 min)..."
    pip install -q --no-build-isolation --use-pep517 -e ".[tests]"
fi
# The kernels are optional: without a working C++ compiler gc_mm installs
# without them (the optimizers then take their plain paths on CPU; each
# run of this script tries the build again), and says so here.
.venv/bin/python - <<'EOF'
import gc_mm, gc_mm.kernels as k, mmcv, mmcv.ops, mmdet
kernels = ', '.join(f'{name} {"installed" if k.installed(name) else "not installed"}'
                    for name in k.KERNELS)
print('gc_mm', gc_mm.__version__, '| mmdet', mmdet.__version__, '| mmcv',
      mmcv.__version__, '| kernels:', kernels,
      '' if all(map(k.installed, k.KERNELS)) else
      '(did not compile; see pip install -v)')
EOF
