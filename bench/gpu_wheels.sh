#!/usr/bin/env bash
# Fill .whl/ with the wheels bench/gpu_run.sh installs on an offline CUDA machine (bench/gpu-wheels.txt), for
# Python ${PY_VERSION:-3.12} on x86-64 Linux. Run here, where PyPI is reachable; carry .whl/ with the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -v '^#' bench/gpu-wheels.txt | grep . > .whl/requirements.txt
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PY_VERSION:-3.12}" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_24_x86_64 -d .whl -r .whl/requirements.txt
du -sh .whl
