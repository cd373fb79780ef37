#!/usr/bin/env bash
# The GPU checks, prepared here and run on a lent device as separate calls, each well within
# 8 minutes of device time:
#   bash scripts/gpu_checks.sh pipeline      (about 3 min) the main job, unchanged, with a Hub
#       model id on CUDA (`caprese pipeline --quick --model Qwen/Qwen2.5-Coder-0.5B-Instruct
#       --device cuda`), then Triton's CATS kernel tests compiled on CUDA. The device cannot
#       reach the Hub, so the id resolves from a Hugging Face cache filled beforehand with a
#       model of that config, tokenizer and chat template and random weights
#       (tests/hub_cache.py); the accuracies mean nothing. Measured on one H200 (2026-11-27):
#       setup ~20 s, pipeline 146 s, Triton tests 5 s.
#   bash scripts/gpu_checks.sh tests         (part of pipeline; ~40 s with setup) Triton's CATS
#       kernel tests and the compiled-decode tests on CUDA: each step as a CUDA graph generates
#       the eager tokens; CATS' threshold by sorting on CUDA against the CPU's.
#       PYTEST_ADDOPTS='-k "cudagraphs or triton or gpu"' keeps the fast ones (14 of them took
#       19 s on an H200, 2026-12-04); the inductor ones take minutes.
#   bash scripts/gpu_checks.sh kernels       (~1 min, estimated) CATS' Triton kernel alone at
#       the 14B's MLP shapes, for several block shapes, against the dense MLP
#       (benchmarks/triton_cats.py).
#   bash scripts/gpu_checks.sh table5 [OVERRIDES]  the paper's Table 5 (+ CATS by Triton) on a
#       Qwen2.5-14B-shaped random bf16 model at 2048 + 256, decode steps compiled
#       (`compile = "cudagraphs"`: one CUDA graph per step), 2 repeats: 18 runs, 4 min 40 s
#       on an H200 (2026-12-04: warm-ups with compiling 22-41 s per variant, timed runs
#       5-11 s). Give it CALL_SECONDS=420. OVERRIDES go to benchmarks/run.py, e.g.
#       'variants=["full","cats","caprese-cats"]'. At the limit the bench is interrupted and
#       writes the medians of the runs that ended; each run's TTFT and TTNT are logged as it
#       ends.
#   bash scripts/gpu_checks.sh table5-long   optional: the same at 2048 + 2048, one repeat.
# It uses the machine's own python3 (torch, triton, transformers are there) and this checkout
# through PYTHONPATH; what pip would add (math-verify, rouge-score, ...) travels as wheels.
#   here, once (needs the package registries):  bash scripts/gpu_checks.sh --prepare
#   then with the device tool, carry [".whl", ".gpu"]:  bash scripts/gpu_checks.sh STEP
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
    folder=$(caprese models prepare "$MODEL" | sed -n 1p)  # sed reads on: no broken pipe
    mkdir -p .gpu/model
    cp "$folder"/{config.json,generation_config.json,tokenizer.json,tokenizer_config.json} \
        "$folder"/chat_template.jinja .gpu/model/
    du -sh .whl .gpu
    exit 0
fi
step=${1:?which step: pipeline, tests, kernels, table5 or table5-long (or --prepare, here)}
seconds=${CALL_SECONDS:-420}
work=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --ignore-requires-python \
    --target "$work/site" .whl/*.whl
export PYTHONPATH=$PWD:$work/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export HF_HUB_CACHE=$work/hub
OUT=${OUT:-benchmarks/results}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, \
transformers.__version__)" | tee -a "$OUT/gpu.txt"

table5() {  # $1: setup, $2: repeats, $3: output name, then run.py's own overrides
    # SIGINT at the limit: the bench writes the runs that ended (marked cut off), then stops;
    # perf_hints logs why a graph would not replay as a CUDA graph
    TORCH_LOGS=${TORCH_LOGS:-perf_hints} timeout -s INT -k 60 "$seconds" python3 benchmarks/run.py benchmarks/configs/gpu_table5.toml \
        "setups=[\"$1\"]" "repeats=$2" "out=$OUT/$3.json" "${@:4}" 2>&1 | tee "$OUT/$3.log"
}

gpu_tests() {  # Triton's CATS kernel, and compiled decode (CUDA graphs) against eager
    local status=0
    timeout "${TESTS_SECONDS:-150}" python3 -m pytest -q -p no:cacheprovider \
        tests/test_kernels_triton.py tests/test_compiled.py tests/test_methods.py \
        >"$OUT/gpu_tests.log" 2>&1 || status=$?
    tail -3 "$OUT/gpu_tests.log"
    return "$status"
}

case "$step" in
pipeline)
    python3 -m tests.hub_cache --like .gpu/model --repo-id "$HUB_ID" --cache "$work/hub" \
        --work "$work/random-model"
    start=$(date +%s)
    status=0
    timeout 240 python3 -m caprese.cli pipeline --quick --model "$HUB_ID" \
        --device cuda --out "$work/run" >"$OUT/gpu_pipeline.log" 2>&1 || status=$?
    echo "pipeline exit $status after $(($(date +%s) - start)) s" | tee -a "$OUT/gpu.txt"
    tail -5 "$OUT/gpu_pipeline.log"
    cp "$work/run/report.md" "$OUT/gpu_pipeline_report.md" 2>/dev/null || true
    gpu_tests || status=$?
    exit "$status"
    ;;
tests) gpu_tests ;;
kernels) python3 benchmarks/triton_cats.py --out "$OUT/triton_cats.json" ;;
table5) table5 2048+256 2 gpu_table5 "${@:2}" ;;
table5-long) table5 2048+2048 1 gpu_table5_long "${@:2}" ;;
*) echo "unknown step $step: pipeline, tests, kernels, table5 or table5-long" >&2; exit 2 ;;
esac
