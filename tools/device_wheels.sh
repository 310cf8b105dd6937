#!/usr/bin/env bash
# Prepare what the lent GPU machine (device tool: Python 3.12, torch 2.11, no network) lacks to run
# fiber-det's tests there: wheels in .whl/ and the golden fixture in .fixtures/ (both git-ignored).
#
#   bash tools/device_wheels.sh
# then, on the device (carry [".whl", ".fixtures"]):
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && PYTHONPATH=/tmp/site:. FIBER_FIXTURES=.fixtures HF_HUB_OFFLINE=1 \
#        python3 -m pytest -q -p no:cacheprovider tests/modeling/test_cuda.py
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
OUT="$ROOT/.whl"
mkdir -p "$OUT" "$ROOT/.fixtures"
D2="$ROOT/.cache/setup/detectron2-0.6-py3-none-any.whl"
[[ -f "$D2" ]] || "$PY" "$ROOT/tools/build_detectron2_wheel.py" "$ROOT/.cache/setup"
cp "$D2" "$OUT/"
# sdist-only or pure-Python packages: build wheels here
"$PY" -m pip wheel -q --no-deps -w "$OUT" yacs==0.1.8 iopath==0.1.9 fvcore==0.1.5.post20221221 \
  antlr4-python3-runtime==4.9.3 termcolor==3.1.0 omegaconf==2.3.0 hydra-core==1.3.2 lvis==0.5.3
# compiled: the cp312 manylinux wheel
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$OUT" pycocotools==2.0.11
cp "$ROOT/../shared/fixtures/fiber_ref_v2_single.pt" "$ROOT/.fixtures/"
du -sh "$OUT" "$ROOT/.fixtures"
