#!/usr/bin/env bash
# The first 1.5B report (benchmarks/results/results_1p5b/REPORT.md, 100 GSM8K test problems,
# before the default recipe): full / GRIFFIN / CATS / Caprese(GRIFFIN) / Caprese(CATS) on
# qwen2.5-coder-1.5b-instruct, bf16, CPU. Every step is a `caprese` command whose output file
# is skipped when it exists, so an interrupted run resumes; the report lists each command.
# Adapters: layer-wise closed form on GSM8K *train* (the evaluation problems are GSM8K test).
set -euo pipefail
OUT=${OUT:-runs/results-1.5b}
MODEL=${MODEL:-qwen2.5-coder-1.5b-instruct}
PROBLEMS=${PROBLEMS:-100}
ARTICLES=${ARTICLES:-16}  # ~1.5 min per variant on the 1.5B (1-shot prompts ~740 tokens)
ARTICLES_MAIN=${ARTICLES_MAIN:-200}
FIDELITY=${FIDELITY:-50}
LANGUAGE=${LANGUAGE:-16}  # XSum articles for fidelity-language (~740 tokens each)

step() {  # step OUTPUT caprese-args...
    local output=$1; shift
    if [ -e "$output" ]; then echo "[results] skip (exists): $output"; return; fi
    echo "[results] caprese $*"
    caprese "$@"
}

for method in griffin cats; do
    step "$OUT/adapter-$method/summary.json" distill --model "$MODEL" --method "$method" \
        --density 0.5 --rank 256 --solver closed_form --stages layerwise --data gsm8k \
        --samples 600 --held-out 40 --max-length 512 --out "$OUT/adapter-$method"
done

# E2E for GRIFFIN, from its layer-wise adapter, on the same 600 samples (one epoch of 38 steps:
# ~30 s per step of 16 sequences on this CPU, 19 min)
step "$OUT/adapter-griffin-e2e/summary.json" distill --model "$MODEL" --method griffin \
    --density 0.5 --rank 256 --stages e2e --init-from "$OUT/adapter-griffin/stages/layerwise" \
    --data gsm8k --samples 600 --held-out 40 --max-length 512 --e2e-epochs 1 \
    --e2e-lr "${E2E_LR:-2e-4}" --checkpoint-every 5 --out "$OUT/adapter-griffin-e2e"
# a second epoch, from the first one's adapter, at half the learning rate
step "$OUT/adapter-griffin-e2e2/summary.json" distill --model "$MODEL" --method griffin \
    --density 0.5 --rank 256 --stages e2e --init-from "$OUT/adapter-griffin-e2e/stages/e2e" \
    --data gsm8k --samples 600 --held-out 40 --max-length 512 --e2e-epochs 1 \
    --e2e-lr 1e-4 --checkpoint-every 5 --out "$OUT/adapter-griffin-e2e2"
# E2E on the logits' KL instead of the hidden states' MSE, on twice the data (the 600 above are
# nearly all among these 1200) with a 5-step warm-up: one epoch of 75 steps
step "$OUT/adapter-griffin-e2e-kl/summary.json" distill --model "$MODEL" --method griffin \
    --density 0.5 --rank 256 --stages e2e --init-from "$OUT/adapter-griffin/stages/layerwise" \
    --data gsm8k --samples 1200 --held-out 40 --max-length 512 --e2e-epochs 1 \
    --e2e-lr 2e-4 --e2e-objective kl --checkpoint-every 5 --out "$OUT/adapter-griffin-e2e-kl"

# Layer-wise + E2E on the model's own greedy text for the same 600 (+40) prompts instead of the
# GSM8K reference solutions (--continuations teacher: ~70 min of generation here, cached in
# the run folder, so an interrupted run generates only what is missing)
step "$OUT/adapter-griffin-teacher/summary.json" distill --model "$MODEL" --method griffin \
    --density 0.5 --rank 256 --solver closed_form --stages layerwise,e2e --data gsm8k \
    --samples 600 --held-out 40 --max-length 512 --continuations teacher --generation-batch 16 \
    --e2e-epochs 1 --e2e-lr 2e-4 --checkpoint-every 5 --out "$OUT/adapter-griffin-teacher"
# CATS, layer-wise, on the same teacher text: it depends only on the model, the prompts and
# --max-length, so the GRIFFIN run's cache is copied in and nothing is generated again
if [ ! -e "$OUT/adapter-cats-teacher/teacher_text.jsonl" ]; then
    mkdir -p "$OUT/adapter-cats-teacher"
    cp "$OUT/adapter-griffin-teacher/teacher_text.jsonl" "$OUT/adapter-cats-teacher/"
fi
step "$OUT/adapter-cats-teacher/summary.json" distill --model "$MODEL" --method cats \
    --density 0.5 --rank 256 --solver closed_form --stages layerwise --data gsm8k \
    --samples 600 --held-out 40 --max-length 512 --continuations teacher --generation-batch 16 \
    --out "$OUT/adapter-cats-teacher"

declare -A VARIANT=(
    [full]="--method none --label full"
    [griffin]="--method griffin --density 0.5 --label GRIFFIN"
    [caprese-griffin]="--adapter $OUT/adapter-griffin --stage layerwise --label Caprese(GRIFFIN)"
    [caprese-griffin-e2e]="--adapter $OUT/adapter-griffin-e2e --stage e2e --label E2E-Caprese(GRIFFIN)"
    [caprese-griffin-e2e2]="--adapter $OUT/adapter-griffin-e2e2 --stage e2e --label E2E-Caprese(GRIFFIN)-2ep"
    [caprese-griffin-e2e-kl]="--adapter $OUT/adapter-griffin-e2e-kl --stage e2e --label E2E-KL-Caprese(GRIFFIN)"
    [caprese-griffin-teacher]="--adapter $OUT/adapter-griffin-teacher --stage e2e --label Teacher-text-E2E-Caprese(GRIFFIN)"
    [cats]="--method cats --density 0.5 --label CATS"
    [caprese-cats]="--adapter $OUT/adapter-cats --stage layerwise --label Caprese(CATS)"
    [caprese-cats-teacher]="--adapter $OUT/adapter-cats-teacher --stage layerwise --label Teacher-text-Caprese(CATS)"
)
ORDER=(full griffin caprese-griffin caprese-griffin-e2e caprese-griffin-e2e2 caprese-griffin-e2e-kl
       caprese-griffin-teacher cats caprese-cats caprese-cats-teacher)

for name in "${ORDER[@]}"; do  # math accuracy first: the headline numbers
    # shellcheck disable=SC2086
    step "$OUT/results/gsm8k-$name.json" eval --model "$MODEL" ${VARIANT[$name]} \
        --task gsm-symbolic-all --limit "$PROBLEMS" --batch-size 20 --max-new-tokens 512 \
        --out "$OUT/results/gsm8k-$name.json"
done
eval_step() {  # eval_step TASK NAME LIMIT BATCH
    # shellcheck disable=SC2086
    step "$OUT/results/$1-$2.json" eval --model "$MODEL" ${VARIANT[$2]} --task "$1" \
        --limit "$3" --batch-size "$4" --out "$OUT/results/$1-$2.json"
}
# then fidelity on math, language retention for the Caprese variants, and the rest
for name in "${ORDER[@]:1}"; do eval_step fidelity "$name" "$FIDELITY" 4; done
for name in full caprese-griffin caprese-griffin-e2e caprese-cats; do eval_step xsum "$name" "$ARTICLES" 8; done
# 200 articles for the full model and the Caprese variants the report leads with
# (batches of 16: 12-26 min per variant on this CPU)
for name in full caprese-griffin-e2e caprese-griffin-teacher caprese-cats; do
    # shellcheck disable=SC2086
    step "$OUT/results/xsum200-$name.json" eval --model "$MODEL" ${VARIANT[$name]} --task xsum \
        --limit "$ARTICLES_MAIN" --batch-size 16 --out "$OUT/results/xsum200-$name.json"
done
for name in "${ORDER[@]:1}"; do eval_step fidelity-language "$name" "$LANGUAGE" 4; done
for name in griffin cats; do eval_step xsum "$name" "$ARTICLES" 8; done
mkdir -p benchmarks/results/results_1p5b  # the evidence, in git (adapters are not: 130 MB)
cp "$OUT"/results/*.json "$OUT"/results/*.jsonl benchmarks/results/results_1p5b/
caprese report benchmarks/results/results_1p5b/{gsm8k,fidelity,xsum}*.json \
    --out "${REPORT:-benchmarks/results/results_1p5b/REPORT.md}" \
    --title "Results: qwen2.5-coder-1.5b-instruct" --intro benchmarks/results_1p5b_intro.md
