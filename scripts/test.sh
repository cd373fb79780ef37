#!/usr/bin/env bash
# The test command: sets up .venv, then runs ruff and the whole test suite (slow tests too).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1
ruff check .
python -m pytest -q --durations=10 "$@"
