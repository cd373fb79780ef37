#!/usr/bin/env bash
# The main job: sets up .venv, then prepares a built-in model, distills Caprese for GRIFFIN
# and CATS, evaluates full / method / Caprese, and writes caprese-run/report.md.
# Arguments go to `caprese pipeline` (e.g. --quick, --model HUB_ID, --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
caprese pipeline "$@"
