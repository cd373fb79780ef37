#!/usr/bin/env bash
# The GPU checks, as one prepared run for a session that has a device (about 10 minutes on
# one H100): Triton's CATS kernel tests compiled on CUDA, then the paper's Table 5 (+ CATS)
# on a Qwen2.5-14B-shaped random bf16 model, prompt 2048 + 256. It uses the machine's own
# python3 (torch, triton, transformers are there; nothing can be installed) and this
# checkout through PYTHONPATH. Results go to $OUT (the device tool's folder) or
# benchmarks/results. Run with the device tool:  bash scripts/gpu_checks.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, \
transformers.__version__)" | tee -a "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_kernels_triton.py 2>&1 | tee "$OUT/gpu_tests.log"
python3 benchmarks/gpu_table5.py --setups "${SETUPS:-2048+256}" --repeats 3 \
    --out "$OUT/gpu_table5.json" 2>&1 | tee "$OUT/gpu_table5.log"
