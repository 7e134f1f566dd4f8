#!/usr/bin/env bash
# One-time, idempotent set-up for a fresh machine: Debian's Fashion-MNIST and chromium packages and a
# virtualenv with the pinned torch/torchvision pair (the only pair that imports on this machine image), Ray,
# MLflow and this package (with its dev extra: pytest, Playwright). Re-running it is cheap: each step is
# skipped when already done (pip reruns when pyproject.toml is newer than the venv's stamp file).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${BYOL_VENV:-.venv}
PY=${PYTHON:-python3}

# Debian packages: the dataset, and the browser that the MLflow UI test drives (tests/test_ui.py, through
# Playwright's executable_path: Playwright's own browser downloads are never used).
missing=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || missing+=(dataset-fashion-mnist)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  echo "[setup] installing Debian package(s) ${missing[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtualenv $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.byol_ray_installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[setup] installing torch, torchvision, ray, mlflow, playwright and byol_ray (about 2 minutes the first time)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
  "$VENV/bin/python" -m pip install -q -e ".[dev]"
  touch "$stamp"
fi
