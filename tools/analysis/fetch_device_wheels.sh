#!/usr/bin/env bash
# Downloads, here, the pure-Python wheels that tools/analysis/device_check.sh
# installs on a GPU machine without a package index: mmengine and those of
# its dependencies that such a machine's image lacks (it has torch, numpy,
# matplotlib, pyyaml, rich, opencv-python-headless and pytest). Python 3.12,
# wheels only, no dependency resolution: the list below is the whole set.
#
#   bash tools/analysis/fetch_device_wheels.sh [DIR]     # default: device_wheels/
#
# DIR (git-ignored) then travels with the working tree (under 1 MiB).
set -euo pipefail
cd "$(dirname "$0")/../.."
dir=${1:-device_wheels}
python=${PYTHON:-python3}
# The versions tools/install.sh's venv has, so the GPU runs the same mmengine.
wheels=(mmengine==0.10.7 addict==2.4.0 yapf==0.43.0 platformdirs==4.14.9
        termcolor==3.3.0)
mkdir -p "$dir"
"$python" -m pip download -q --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation py --abi none --platform any \
    -d "$dir" "${wheels[@]}"
# One version of each: two stop the install there.
for name in "${wheels[@]%%==*}"; do
    count=$(ls "$dir" | grep -ci "^${name}-" || true)
    [ "$count" = 1 ] || { echo "$dir: $count wheels of $name (want 1)" >&2; exit 1; }
done
ls "$dir"
