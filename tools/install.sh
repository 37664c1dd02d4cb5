#!/usr/bin/env bash
# Sets up .venv/ with gc_mm and its stack (torch 2.13 CPU, mmengine, mmcv
# 2.1.0 built with its ops, mmdet 3.3, pycocotools, tensorboard, pytest).
# The first run builds mmcv (about 20 minutes on 2 cores; pip caches the
# wheel) and gc_mm's kernel (about 90 s); later runs take seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }

# tensorboard: for MMEngine's TensorboardVisBackend (and its test).
pip install -q "setuptools>=77,<82" wheel ninja torch==2.13.0 numpy mmengine \
    tensorboard
if ! .venv/bin/python -c 'import mmcv.ops' 2>/dev/null; then
    echo "Installing mmcv 2.1.0 with its ops (a fresh machine builds it once, ~20 min)..."
    # Without --no-build-isolation the build silently yields no ops.
    MMCV_WITH_OPS=1 pip install --no-build-isolation mmcv==2.1.0
fi
# gc_mm, editable. setup.py compiles its C++ kernel for this CPU against
# the torch above (about 90 s; --use-pep517 makes pip 23 run setup.py's
# build, whose legacy `develop` would skip it), so this is skipped while
# the kernel is installed and newer than everything it is built from.
kernel=$(ls gc_mm/kernels/_sgd_*.so 2>/dev/null | head -n1 || true)
if [ -z "$kernel" ] \
    || [ -n "$(find setup.py gc_mm/kernels -newer "$kernel" \( -name '*.py' -o -name '*.cpp' \))" ] \
    || ! .venv/bin/python -c 'import sys, gc_mm.kernels as k; sys.exit(k.installed("sgd") is None)' 2>/dev/null; then
    echo "Installing gc_mm and compiling its kernel (about 90 s)..."
    pip install -q --no-build-isolation --use-pep517 -e ".[tests]"
fi
# The kernel is optional: without a working C++ compiler gc_mm installs
# without it (SGD_GC then takes its eager path on CPU; each run of this
# script tries the build again), and says so here.
.venv/bin/python - <<'EOF'
import gc_mm, gc_mm.kernels, mmcv, mmcv.ops, mmdet
kernel = ('installed' if gc_mm.kernels.installed('sgd') else
          'not installed (it did not compile; see pip install -v)')
print('gc_mm', gc_mm.__version__, '| mmdet', mmdet.__version__, '| mmcv',
      mmcv.__version__, '| SGD kernel:', kernel)
EOF
