#!/usr/bin/env bash
# The recovery evidence on qwen2.5-coder-1.5b-instruct (bf16, CPU): the default distillation
# recipe (only --samples/--max-length given) for GRIFFIN and CATS at density 0.5 and CATS at a
# lower density, evaluated on the 200-problem GSM-style test set, plain-text fidelity on
# reserved XSum articles and XSum ROUGE. Every step is a `caprese` command whose output is
# skipped when it exists, so an interrupted run resumes where it stopped. The methods alone
# and each method's adapter come one method at a time, GRIFFIN first, so each pair is complete
# as soon as possible. Each finished result is copied into the repository's results folder at
# once, so a session that ends mid-way keeps what it measured; an evaluation that is killed
# resumes from its saved batches (caprese eval keeps them in RESULT.partial/ until it ends).
set -euo pipefail
OUT=${OUT:-runs/recovery-1.5b}
MODEL=${MODEL:-qwen2.5-coder-1.5b-instruct}
LOW=${LOW:-0.3}          # the lower CATS density, where CATS alone should drop >= 10 points
PROBLEMS=${PROBLEMS:-200}
ARTICLES=${ARTICLES:-200}  # XSum ROUGE
# Rows decoded together. The teacher text was generated at 32 rows. The math evaluations take
# 100 rows (200 problems in two batches): `python benchmarks/matmul_rate.py` on an AVX512_BF16
# Xeon without AMX gives the up projection's bf16 rate at 102-117 GFLOPS for 20-32 rows and
# 139-145 for 128, so a step of 100 rows costs much less than 3 steps of 32. Ended rows
# leave the batch every 32 tokens. The full model's result in git was decoded at 20.
BATCH=${BATCH:-32}
EVAL_BATCH=${EVAL_BATCH:-100}
LANGUAGE=${LANGUAGE:-32}   # plain-text fidelity (reserved XSum articles as plain text)
KEEP=${KEEP:-benchmarks/results/recovery_1p5b}
PAPER=${PAPER:-1}           # 0: the report without the paper's other settings (rho, 4-bit)
RHOS=${RHOS:-128 32}       # GRIFFIN's reselection intervals (answers average ~315 tokens)
FIDELITY=${FIDELITY:-24}   # held-out MATH solutions for the 4-bit method's fidelity
# The methods whose adapters and rows this run works on (the full model's always); e.g.
# METHODS=griffin does GRIFFIN's distillation and every GRIFFIN row, then the report.
METHODS=${METHODS:-griffin cats cats-low nf4}
mkdir -p "$OUT/results" "$KEEP"

wanted() {  # wanted NAME: is NAME (griffin, caprese-griffin-rho32, full, ...) in $METHODS?
    local method=${1#caprese-}
    method=${method%-rho*}
    [ "$method" = full ] || [[ " $METHODS " == *" $method "* ]]
}
step() {  # step OUTPUT caprese-args...
    local output=$1; shift
    if [ -e "$output" ]; then echo "[recovery] skip (exists): $output"; return; fi
    echo "[recovery] caprese $*"
    caprese "$@"
}
restore() {  # restore RESULT_JSON NAME: a result kept in git by an earlier session, into $OUT
    local kept="$KEEP/$(basename "$1")" records=${1%.json}.jsonl
    if [ -e "$1" ] || [ ! -e "$kept" ]; then return; fi
    if [[ $2 == caprese-* ]]; then  # only for the very adapter it measured, not a new one
        local method=${2#caprese-}
        method=${method%-rho*}  # a reselection row measures its method's adapter
        measured_adapter "$kept" "$OUT/adapter-$method" || return 0
    fi
    if [ -e "$KEEP/$(basename "$records").gz" ]; then
        gunzip -c "$KEEP/$(basename "$records").gz" > "$records.tmp" && mv "$records.tmp" "$records"
    fi
    cp "$kept" "$1.tmp" && mv "$1.tmp" "$1"
    echo "[recovery] restored from $KEEP: $1"
}
measured_adapter() {  # measured_adapter RESULT_JSON ADAPTER_DIR: did the result measure it?
    # By the digest of the adapter's weights, which results record; a result without one
    # predates that record and measured an adapter no longer here.
    python - "$1" "$2" <<'PY'
import json, sys
from pathlib import Path
import caprese
result, adapter = sys.argv[1:]
if not (Path(adapter) / "caprese_config.json").is_file():
    sys.exit(1)  # not distilled here
measured = json.loads(Path(result).read_text())["variant"].get("adapter_sha256")
sys.exit(0 if measured and measured == caprese.read_adapter(adapter).weights_sha256 else 1)
PY
}
keep() {  # keep RESULT_JSON: the summary and its compressed records, into git's folder
    if cmp -s "$1" "$KEEP/$(basename "$1")"; then return; fi  # kept already (or restored)
    cp "$1" "$KEEP/"
    local records=${1%.json}.jsonl
    if [ -e "$records" ]; then gzip -9 -n -c "$records" > "$KEEP/$(basename "$records").gz"; fi
}

declare -A VARIANT=(
    [full]="--method none --label full"
    [griffin]="--method griffin --density 0.5 --label GRIFFIN"
    [cats]="--method cats --density 0.5 --label CATS"
    [cats-low]="--method cats --density $LOW --label CATS-$LOW"
    [caprese-griffin]="--adapter $OUT/adapter-griffin --label Caprese(GRIFFIN)"
    [caprese-cats]="--adapter $OUT/adapter-cats --label Caprese(CATS)"
    [caprese-cats-low]="--adapter $OUT/adapter-cats-low --label Caprese(CATS-$LOW)"
    [nf4]="--method nf4 --label NF4"
    [caprese-nf4]="--adapter $OUT/adapter-nf4 --label Caprese(NF4)"
)
for rho in $RHOS; do  # GRIFFIN's reselection every rho generated tokens, with and without the path
    VARIANT[griffin-rho$rho]="--method griffin --density 0.5 --reselect-every $rho --label GRIFFIN@$rho"
    VARIANT[caprese-griffin-rho$rho]="--adapter $OUT/adapter-griffin --reselect-every $rho --label Caprese(GRIFFIN)@$rho"
done
math_step() {  # math_step NAME
    wanted "$1" || return 0
    local out="$OUT/results/math-$1.json"
    restore "$out" "$1"
    # shellcheck disable=SC2086
    step "$out" eval --model "$MODEL" ${VARIANT[$1]} --task gsm-symbolic-test \
        --limit "$PROBLEMS" --batch-size "$EVAL_BATCH" --max-new-tokens 512 --out "$out"
    keep "$out"
}
eval_step() {  # eval_step TASK NAME LIMIT BATCH
    wanted "$2" || return 0
    local out="$OUT/results/$1-$2.json"
    restore "$out" "$2"
    # shellcheck disable=SC2086
    step "$out" eval --model "$MODEL" ${VARIANT[$2]} --task "$1" --limit "$3" \
        --batch-size "$4" --out "$out"
    keep "$out"
}

math_step full

# The default recipe: the model's own greedy text for the prompts plus a share of general
# text, layer-wise closed form with the do-no-harm cut, then one E2E epoch. The teacher text
# depends only on the model, the prompts and --max-length, so the three runs share one cache
# (generated once, ~65 min here). It is kept in git, compressed, so a later session (or a
# reader checking the adapters) starts from it instead of generating it again.
TEACHER="$OUT/teacher_text.jsonl"
if [ ! -e "$TEACHER" ] && [ -e "$KEEP/teacher_text.jsonl.gz" ]; then
    gunzip -c "$KEEP/teacher_text.jsonl.gz" > "$TEACHER"
fi
distill_step() {  # distill_step NAME METHOD-ARGS...
    wanted "$1" || return 0
    local name=$1 dir="$OUT/adapter-$1"; shift
    local resume=()
    if [ -e "$dir/run.json" ]; then resume=(--resume); fi
    step "$dir/summary.json" distill --model "$MODEL" "$@" \
        --samples 600 --max-length 512 --teacher-text "$TEACHER" --generation-batch "$BATCH" \
        --out "$dir" "${resume[@]}"
    mkdir -p "$KEEP/distill-$name"  # what the run trained on, kept, cost: for the report
    cp "$dir/run.json" "$dir/summary.json" "$KEEP/distill-$name/"
    if ! gunzip -c "$KEEP/teacher_text.jsonl.gz" 2>/dev/null | cmp -s - "$TEACHER"; then
        gzip -9 -n -c "$TEACHER" > "$KEEP/teacher_text.jsonl.gz"  # -n: no time stamp
    fi
}
distill_step griffin --method griffin --density 0.5
math_step griffin
math_step caprese-griffin
distill_step cats --method cats --density 0.5
math_step cats
math_step caprese-cats
distill_step cats-low --method cats --density "$LOW"
math_step cats-low
math_step caprese-cats-low

for name in griffin caprese-griffin cats caprese-cats cats-low caprese-cats-low; do
    eval_step fidelity-language "$name" "$LANGUAGE" 4
done
for name in full caprese-griffin caprese-cats caprese-cats-low; do
    eval_step xsum "$name" "$ARTICLES" 16
done

# The paper's other settings. GRIFFIN's reselection (rho) with the same GRIFFIN adapter, and
# the 4-bit method (NF4 weights in every layer's MLP) with an adapter of its own, distilled by
# the same default recipe on the same teacher text.
if [ "$PAPER" = 1 ]; then
    for rho in $RHOS; do
        math_step "griffin-rho$rho"
        math_step "caprese-griffin-rho$rho"
    done
    distill_step nf4 --method nf4
    math_step nf4
    math_step caprese-nf4
    for name in nf4 caprese-nf4; do
        eval_step fidelity "$name" "$FIDELITY" 4
        eval_step fidelity-language "$name" "$LANGUAGE" 4
    done
fi

runs=()
for name in griffin cats cats-low nf4; do
    if [ -e "$KEEP/distill-$name/summary.json" ]; then runs+=("$KEEP/distill-$name"); fi
done
caprese report "$KEEP"/math-*.json "$KEEP"/fidelity-*.json "$KEEP"/xsum-*.json \
    --distill "${runs[@]}" \
    --out "${REPORT:-docs/RESULTS.md}" --title "Results: qwen2.5-coder-1.5b-instruct" \
    --intro benchmarks/recovery_1p5b_intro.md
