#!/usr/bin/env bash
# The GPU checks, as one prepared run for a session that has a device. Timings on one H200
# (2026-11-27): setup ~20 s, step 1 146 s, step 2 5 s; step 3 printed nothing within its 240 s
# there (it has a progress bar since), so give it most of a call of its own
# (PIPELINE_ONLY=1 runs step 1 alone; SETUPS, TABLE5_SECONDS size step 3):
#   1. the main job, unchanged, with a Hub model id on CUDA: `caprese pipeline --quick --model
#      Qwen/Qwen2.5-Coder-0.5B-Instruct --device cuda`. The device cannot reach the Hub, so the
#      id resolves from a Hugging Face cache filled beforehand with a model of that config,
#      tokenizer and chat template and random weights (tests/hub_cache.py): every step runs on
#      the GPU (closed-form and E2E distillation, generation, fidelity, XSum, report); the
#      accuracies mean nothing;
#   2. Triton's CATS kernel tests compiled on CUDA;
#   3. the paper's Table 5 (+ CATS) on a Qwen2.5-14B-shaped random bf16 model, 2048 + 256.
# It uses the machine's own python3 (torch, triton, transformers are there) and this checkout
# through PYTHONPATH; what pip would add (math-verify, rouge-score, ...) travels as wheels.
#   here, once (needs the package registries):  bash scripts/gpu_checks.sh --prepare
#   then with the device tool, carry [".whl", ".gpu"]:  bash scripts/gpu_checks.sh
# Results go to $OUT (the device tool's folder) or benchmarks/results.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=qwen2.5-coder-0.5b-instruct HUB_ID=Qwen/Qwen2.5-Coder-0.5B-Instruct
if [[ "${1:-}" == "--prepare" ]]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || printf '/.whl/\n/.gpu/\n' >>.git/info/exclude
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_17_x86_64 -d .whl platformdirs==4.14.8 \
        math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2 \
        nltk==3.10.4
    python -m pip wheel -q --no-deps rouge_score==0.1.2 -w .whl  # published as sdist only
    folder=$(caprese models prepare "$MODEL" | head -1)
    mkdir -p .gpu/model
    cp "$folder"/{config.json,generation_config.json,tokenizer.json,tokenizer_config.json} \
        "$folder"/chat_template.jinja .gpu/model/
    du -sh .whl .gpu
    exit 0
fi
work=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --ignore-requires-python \
    --target "$work/site" .whl/*.whl
export PYTHONPATH=$PWD:$work/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export HF_HUB_CACHE=$work/hub
OUT=${OUT:-benchmarks/results}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, \
transformers.__version__)" | tee -a "$OUT/gpu.txt"

python3 -m tests.hub_cache --like .gpu/model --repo-id "$HUB_ID" --cache "$work/hub" \
    --work "$work/random-model"
start=$(date +%s)
status=0
timeout "${PIPELINE_SECONDS:-240}" python3 -m caprese.cli pipeline --quick --model "$HUB_ID" \
    --device cuda --out "$work/run" >"$OUT/gpu_pipeline.log" 2>&1 || status=$?
echo "pipeline exit $status after $(($(date +%s) - start)) s" | tee -a "$OUT/gpu.txt"
tail -5 "$OUT/gpu_pipeline.log"
cp "$work/run/report.md" "$OUT/gpu_pipeline_report.md" 2>/dev/null || true

[[ "${PIPELINE_ONLY:-0}" == 1 ]] && exit "$status"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_triton.py \
    >"$OUT/gpu_tests.log" 2>&1 || true
tail -3 "$OUT/gpu_tests.log"
timeout "${TABLE5_SECONDS:-240}" python3 benchmarks/run.py benchmarks/configs/gpu_table5.toml \
    "setups=[\"${SETUPS:-2048+256}\"]" repeats=3 "out=$OUT/gpu_table5.json" 2>&1 \
    | tee "$OUT/gpu_table5.log"
