#!/usr/bin/env bash
# gc_mm's GPU check, in one command: on a machine with Python 3.12, torch
# and pytest but no package index and no mmengine/mmdet/mmcv, it installs
# the pure-Python wheels carried in WHEELS (tools/analysis/
# fetch_device_wheels.sh downloads them), runs gc_mm's CUDA tests
# (pytest -m cuda) and times every GC step against torch's on the parameter
# shapes of Mask R-CNN R50-FPN and X101-64x4d-FPN (benchmark_gc.py
# --shapes), and writes into OUT:
#   check.log       everything printed
#   env.json        python, torch, CUDA, GPU, triton, nvcc
#   tests.xml       the tests' JUnit report
#   bench_r50.json, bench_x101.json, benchmark.md   the timings, and their
#                   tables for docs/benchmark.md
# Under 8 minutes on an H100 (each stage has its own time limit). It exits
# non-zero if a stage failed, after running the others.
#
#   bash tools/analysis/device_check.sh [--device cuda|cpu] [--out DIR]
#       [--wheels DIR] [--repeats N] [--warmup N] [--families F...]
#       [--only REGEX]
#
# --device cpu rehearses it here (the tests then run their CPU cases of
# tests/test_devices.py; every CUDA one skips). --families and --only go to
# benchmark_gc.py (default: every family, every variant). OUT defaults to
# $OUT, else device_check_out/.
set -uo pipefail
cd "$(dirname "$0")/../.."
device=cuda out=${OUT:-device_check_out} wheels=device_wheels
repeats=21 warmup=5 families=() select=()
while [ $# -gt 0 ]; do
    case "$1" in
    --families) shift
        while [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; do
            families+=("$1"); shift; done ;;
    --only) select+=(--only "$2"); shift 2 ;;
    --device) device=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --wheels) wheels=$2; shift 2 ;;
    --repeats) repeats=$2; shift 2 ;;
    --warmup) warmup=$2; shift 2 ;;
    *) echo "device_check.sh: unknown argument '$1'" >&2; exit 2 ;;
    esac
done
case "$device" in cuda | cpu) ;; *)
    echo "device_check.sh: --device must be cuda or cpu, got '$device'" >&2
    exit 2 ;;
esac
[ ${#families[@]} -gt 0 ] && select+=(--families "${families[@]}")
python=${PYTHON:-python3}
started=$SECONDS
stage() { echo; echo "== $1 ($((SECONDS - started)) s)"; }

check() {
failed=()
stage "install the carried wheels (no index)"
ls "$wheels"/*.whl >/dev/null 2>&1 || {
    echo "no wheels in $wheels/: run tools/analysis/fetch_device_wheels.sh here first"
    return 1; }
site=$(mktemp -d)/site
"$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target "$site" "$wheels"/*.whl || return 1
# gc_mm from this checkout, uninstalled (its C++ kernels are for CPU
# tensors, built on first use; the CUDA paths need none).
export PYTHONPATH=$site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# On CPU the benchmark builds the C++ kernels where they are not installed:
# in a cache of this run's own, apart from other builds on the machine.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$(dirname "$site")/torch_extensions}
"$python" - "$out/env.json" "$device" <<'EOF' || return 1
import json, platform, shutil, subprocess, sys
import torch
import gc_mm, mmengine
device = sys.argv[2]
if device == 'cuda' and not torch.cuda.is_available():
    sys.exit('device_check.sh: --device cuda, but torch sees no CUDA device')
env = dict(python=platform.python_version(), torch=torch.__version__,
           cuda=torch.version.cuda, mmengine=mmengine.__version__,
           gc_mm=gc_mm.__version__, device=device,
           cpu=platform.processor() or platform.machine())
if device == 'cuda':
    props = torch.cuda.get_device_properties(0)
    env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
               multiprocessors=props.multi_processor_count,
               capability='%d.%d' % (props.major, props.minor))
try:
    import triton
    env['triton'] = triton.__version__
except ImportError:
    env['triton'] = None
if shutil.which('nvcc'):
    env['nvcc'] = subprocess.run(['nvcc', '--version'], capture_output=True,
                                 text=True).stdout.strip().splitlines()[-1]
if shutil.which('nvidia-smi'):
    env['driver'] = subprocess.run(
        ['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader'],
        capture_output=True, text=True).stdout.strip()
print(json.dumps(env, indent=2))
json.dump(env, open(sys.argv[1], 'w'), indent=2)
EOF

stage "gc_mm's CUDA tests"
# -m cuda: every test marked for CUDA (tests/conftest.py), collected from
# the whole suite, so a module that cannot be collected without mmdet
# fails here. On CPU, the same tests' CPU cases.
if [ "$device" = cuda ]; then
    selection=(tests -m cuda) limit=240
else
    # The CPU rehearsal also builds the C++ kernels (minutes): no limits.
    selection=(tests/test_devices.py -k 'cpu and not fused') limit=0
fi
# A module that fails to collect fails this stage, and the others still run.
timeout $limit "$python" -m pytest "${selection[@]}" -q -rfEs -p no:cacheprovider \
    --continue-on-collection-errors --junitxml="$out/tests.xml" \
    || failed+=(tests)

stage "step timings on real shapes"
for model in r50 x101; do
    shapes=tools/analysis/shapes/mask_rcnn_${model}_fpn.json
    [ $model = x101 ] && shapes=tools/analysis/shapes/mask_rcnn_x101_64x4d_fpn.json
    timeout $((limit ? 150 : 0)) "$python" tools/analysis/benchmark_gc.py --shapes "$shapes" \
        --device "$device" --repeats "$repeats" --warmup "$warmup" \
        ${select[@]+"${select[@]}"} \
        --json "$out/bench_$model.json" --markdown "$out/bench_$model.md" \
        || failed+=("benchmark $model")
done
for table in "$out"/bench_*.md; do
    [ -f "$table" ] && { cat "$table"; echo; rm "$table"; }
done > "$out/benchmark.md"

stage "done"
if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]}"
    return 1
fi
echo "all stages passed; results in $out/"
}

mkdir -p "$out"
check 2>&1 | tee "$out/check.log"
exit "${PIPESTATUS[0]}"
