#!/usr/bin/env bash
# A short demo on a tiny random-weight model (no download): attach GRIFFIN + Caprese,
# generate, compare with the teacher, save and reload the adapter.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
HF_HUB_OFFLINE=1 python examples/demo_tiny.py "$@"
