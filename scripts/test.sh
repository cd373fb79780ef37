#!/usr/bin/env bash
# The test command: sets up .venv, then runs ruff and the whole test suite (slow tests too).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1
ruff check .
# Two workers of one thread each (pytest-xdist): much of the suite is single-threaded Python
# (compiling, process start-up), so two of them keep both cores busy where one test at a
# time, given both cores, left one idle; one thread each keeps them from taking turns on the
# cores. The kernel tests still run theirs on two threads. `-n 0` runs it in one process.
OMP_NUM_THREADS=1 python -m pytest -q -n 2 --durations=10 "$@"
