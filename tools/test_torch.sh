#!/usr/bin/env bash
# Runs gc_mm's tests on another torch: builds .venv-torch<VERSION>/ with
# torch==VERSION, mmengine and pytest only (no mmcv, no mmdet) and runs the
# tests that need nothing more, with gc_mm taken from this checkout
# (PYTHONPATH: nothing is installed or compiled into the tree; kernels that
# a test builds go to the venv). Tests that need mmdet or mmcv skip there.
#
#   bash tools/test_torch.sh 2.1.2                   # the default test files
#   bash tools/test_torch.sh 2.15.0 tests/test_sgd.py -k fused
#
# torch comes from PyPI (a CUDA build, about 3 GB, downloaded once into
# pip's cache); the first run takes 3-10 min to build the venv, later runs
# reuse it.
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:?usage: tools/test_torch.sh TORCH_VERSION [pytest arguments]}
shift
venv=.venv-torch$version
python=${PYTHON:-python3}

# torch < 2.3 was built against numpy 1 and fails with numpy 2.
numpy=numpy
case $version in 2.0.* | 2.1.* | 2.2.*) numpy='numpy<2' ;; esac
if ! "$venv/bin/python" -c 'import mmengine, pytest, torch' 2>/dev/null; then
    echo "Building $venv (torch $version, mmengine, pytest)..."
    "$python" -m venv "$venv"
    # A machine's pip configuration may pin torch (a constraint file);
    # this venv asks for another version on purpose: no constraints here.
    PIP_CONSTRAINT=/dev/null "$venv/bin/python" -m pip install -q \
        "torch==$version" "$numpy" mmengine pytest "setuptools<82"
fi

# The files that need torch and mmengine only.
tests=(tests/test_centralize.py tests/test_optimizers.py tests/test_sgd.py
       tests/test_radam.py tests/test_lookahead.py tests/test_optim_wrapper.py
       tests/test_msgd.py tests/test_compat.py)
[ $# -gt 0 ] && tests=("$@")
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" \
    TORCH_EXTENSIONS_DIR="$PWD/$venv/torch_extensions" \
    "$venv/bin/python" -c 'import torch, gc_mm; print("torch", torch.__version__, "| gc_mm", gc_mm.__version__)'
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" \
    TORCH_EXTENSIONS_DIR="$PWD/$venv/torch_extensions" \
    "$venv/bin/python" -m pytest -q -p no:cacheprovider "${tests[@]}"
