#!/usr/bin/env bash
# The one command for a fresh CUDA machine with no internet:
#
#   bash bench/gpu_run.sh [bench/gpu.py options]      # from the checkout, with .whl/ carried along
#
# 1. Installs the Python packages bench/gpu.py needs and the machine lacks (diffusers, pydantic, torchao: the
#    lent GPU machines ship CUDA torch and transformers only) from the wheelhouse $WHEELHOUSE (default .whl/,
#    made here by bench/gpu_wheels.sh), offline, into $SITE (default /tmp/klein-site), put first on PYTHONPATH.
# 2. Runs `bench/gpu.py --compare` (each variant in its own process, under a 450 s budget on CUDA): the real 4B
#    architecture built on the GPU in bf16, baseline vs each switch vs everything vs FP8, over t2i-1024, t2i-512,
#    edit-1024 and batch4-512, then the image checker and the prompt enhancer (Qwen3-4B: 130 prompt + 120 new
#    tokens, the text encoder per image with all its layers kept); the table on stdout, everything in
#    $OUT/gpu.json (default gpu-out/).
#
# Options are passed to bench/gpu.py after the defaults, so they win: `--cut-depth` runs the same on CPU at the
# real widths (the test suite does), `--scenarios …`, `--budget …`. `--install-only` stops after step 1.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELHOUSE=${WHEELHOUSE:-.whl}
SITE=${SITE:-/tmp/klein-site}
OUT=${OUT:-gpu-out}
# Modules bench/gpu.py cannot run without; if one is missing, every wheel is installed (torchao too: FP8's).
NEEDS=${NEEDS:-diffusers pydantic pydantic_settings}
install_only=0
args=()
for arg in "$@"; do
  if [[ $arg == --install-only ]]; then install_only=1; else args+=("$arg"); fi
done

missing=$("$PYTHON" -c 'import importlib.util, sys; print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))' $NEEDS)
if [[ -n $missing ]]; then
  shopt -s nullglob
  wheels=("$WHEELHOUSE"/*.whl)
  if (( ${#wheels[@]} == 0 )); then
    echo "missing: $missing; no wheels in $WHEELHOUSE/ (make them where PyPI is reachable: bash bench/gpu_wheels.sh)" >&2
    exit 2
  fi
  echo "installing for $missing from ${#wheels[@]} wheels in $WHEELHOUSE/ into $SITE"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}"
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  still=$("$PYTHON" -c 'import importlib.util, sys; print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))' $NEEDS)
  [[ -z $still ]] || { echo "still missing after the install: $still" >&2; exit 2; }
else
  echo "nothing to install: $NEEDS all importable"
fi
(( install_only )) && exit 0

mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
exec "$PYTHON" bench/gpu.py --compare --json "$OUT/gpu.json" "${args[@]}"
