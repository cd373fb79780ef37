"""The one experiment driver: a small TOML config in, a table on screen and a JSON file out.

    python benchmarks/run.py benchmarks/configs/ridge_sweep.toml
    python benchmarks/run.py benchmarks/configs/ridge_sweep.toml model=smollm2-135m-instruct \
        samples=48 held_out=16 out=/path/to/smoke.json      # any key overridden for one run

A config names its experiment kind and settings (defaults below, per kind); the result JSON
(`out`, relative to the repository) records the config as run, the command, the machine and
the measurements, rewritten after each row so a run cut short keeps what it measured.

Kinds:
- kl_gap: how much of each method's KL gap a fitted path closes, on held-out samples of the
  seed-0 training mixture. KL(original || compressed) of next-token distributions at the
  continuation positions, teacher-forced; gap closed = 1 - KL(with path) / KL(method alone).
  Fits: "closed_form" (one statistics pass, then one solve and one scoring per ridge and
  rank; optionally E2E steps from the last fit, scored along the way), "sgd" and
  "sequential" (the distillation stages as `caprese distill` runs them).
- decode_latency: `caprese bench`'s variants side by side (interleaved, medians), per dtype
  and prompt + generation length, on a built-in model or on random weights shaped by a
  public config (the paper's Table 5 on a GPU). A named model's peak memory per variant comes
  from a process of its own (memory = "alone"; "together": between the timed runs).
- decode_overhead: time per token of HF `generate`, of the lean decode loop, and of the lean
  loop with the CPU kernels (full model, batch 1).
- general_share: the default recipe (`caprese distill` with size flags only) at several
  shares of general text, per method: the job's own held-out check, and KL(original ||
  compressed) with and without the path on fixed evaluation text (MATH500 solutions and
  reserved XSum articles as plain text), the same for every share.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import statistics
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch
import transformers

import caprese
from caprese import data
from caprese.bench.alone import peaks_alone, record_peaks
from caprese.bench.decode import greedy_decode
from caprese.bench.latency import bytes_per_token, format_table, measure_bandwidth, run_bench
from caprese.bench.memory import free_large_blocks_at_once, settled_rss
from caprese.bench.peer import LlamaCppPeer, peer_gguf
from caprese.data import training_split
from caprese.data.general import article_body, reserved
from caprese.distillation import DistillJob, DistillSettings, TrainSettings, distill, run_job
from caprese.distillation.e2e import e2e_loss
from caprese.distillation.harm import path_off
from caprese.distillation.layerwise import collect_stats, solve_closed_form
from caprese.distillation.trainer import train
from caprese.dtypes import resolve_dtype
from caprese.evaluate.fidelity import fidelity
from caprese.info import load_config
from caprese.io import atomic_write_text
from caprese.kernels.cpu import machine as bench_machine
from caprese.models import load_model, weights_description
from caprese.models.load import import_model_code
from caprese.prompts import teacher_forced
from caprese.samples import collate

ROOT = Path(__file__).resolve().parent.parent
NEVER = 10**9  # checkpoint interval that never comes: these runs are not resumed

DEFAULTS = {
    "kl_gap": dict(model="qwen2.5-coder-0.5b-instruct", dtype="auto", methods=["griffin", "cats"],
                   sources=["gsm8k", "math"], plain_prompts=False, samples=1000, held_out=200,
                   max_length=256, rank=256, density=0.5, batch_size=8, teacher_pass=False,
                   score_length=0, fits=[]),
    "decode_latency": dict(model="qwen2.5-coder-1.5b-instruct", config="", tiny=False,
                           dtypes=["auto"], variants=["full", "griffin", "caprese", "lora",
                                                      "cats", "caprese-cats"],
                           setups=["256+64"], repeats=3, rank=256, batch=1, peer=False,
                           compile="", prefill_chunk=0, memory="alone"),
    "decode_overhead": dict(model="qwen2.5-coder-1.5b-instruct", dtype="bf16", prompt_len=256,
                            gen_len=32, repeats=3),
    "general_share": dict(model="qwen2.5-coder-0.5b-instruct", dtype="auto",
                          methods=["griffin", "cats"], shares=[0.0, 0.25, 0.5], samples=256,
                          held_out=32, max_length=256, e2e_samples=64, rank=256, density=0.5,
                          eval_samples=32, batch_size=8),
}
FIT_DEFAULTS = {
    "closed_form": dict(ridges=[1e-4], ranks=[], e2e=None),
    "sgd": dict(sgd_epochs=1),
    "sequential": dict(e2e=None),
}
E2E_DEFAULTS = dict(epochs=1, samples=0, lr=1e-4, objective="mse", batch=16, micro_batch=4,
                    every=0, eval_samples=60)


def load_experiment(path: str, overrides: list[str]) -> dict:
    """The config file with `key=value` overrides (values parsed as TOML) over its kind's
    defaults; unknown keys are refused."""
    config = tomllib.loads(Path(path).read_text())
    for item in overrides:
        key, _, value = item.partition("=")
        try:
            config[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:  # a bare word: a string
            config[key] = value
    kind = config.get("experiment")
    if kind not in DEFAULTS:
        raise SystemExit(f"{path}: experiment must be one of {', '.join(DEFAULTS)}")
    unknown = sorted(set(config) - set(DEFAULTS[kind]) - {"experiment", "out", "about"})
    if unknown:
        raise SystemExit(f"{path}: unknown settings {unknown} for {kind}")
    return {**DEFAULTS[kind], **config}


def machine() -> str:
    return f"{bench_machine('cuda' if torch.cuda.is_available() else 'cpu')}, " \
        f"{torch.get_num_threads()} threads"


def write(report: dict, experiment: dict) -> None:
    out = ROOT / experiment["out"]
    atomic_write_text(out, json.dumps(report, indent=2))


# -- kl_gap -----------------------------------------------------------------------------
def scored(model, held_out, pad_id: int, batch_size: int) -> dict:
    result = fidelity(model, held_out, batch_size=batch_size, pad_id=pad_id, layer_errors=False)
    return {"kl": result["kl"], "top1": result["top1"], "tokens": result["tokens"]}


@torch.no_grad()
def teacher_pass_seconds(model, samples, batch_size: int, pad_id: int) -> float:
    """One plain forward of the original model over the samples (LM head included)."""
    started = time.perf_counter()
    for start in range(0, len(samples), batch_size):
        batch = collate(samples[start:start + batch_size], pad_id)
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    return time.perf_counter() - started


@torch.no_grad()
def apply_closed_form_at(model, stats, ridge: float, rank: int) -> None:
    """The rank-`rank` closed form in an adapter at least that wide: L's other columns and
    R's other rows are zero, so x L R is exactly the rank-`rank` product."""
    for index, block in caprese.blocks(model).items():
        left, right = solve_closed_form(stats[index], rank, ridge)
        block.L.zero_()
        block.R.zero_()
        block.L[:, :rank] = left
        block.R[:rank] = right


def e2e_steps(model, train_set, held_out, e2e: dict, pad_id: int, batch_size: int,
              row: dict) -> None:
    """E2E training from the current adapter; scores the first eval_samples held-out samples
    every `every` steps (0: never) into row["trajectory"], all of them at the end."""
    settings = TrainSettings("e2e", e2e["lr"], e2e["epochs"], e2e["batch"], e2e["micro_batch"],
                             0.02, NEVER, 0)
    probe = held_out[:e2e["eval_samples"]]
    row["trajectory"] = []

    def on_step(step: int) -> None:
        if e2e["every"] and step % e2e["every"] == 0:
            row["trajectory"].append({"step": step, **scored(model, probe, pad_id, batch_size)})
            print(f"|   E2E step {step} | KL {row['trajectory'][-1]['kl']:.4f} on "
                  f"{len(probe)} |", flush=True)

    on_step(0)
    subset = train_set[:e2e["samples"]] if e2e["samples"] else train_set
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        row["losses"] = train(model, subset, e2e_loss(model, e2e["objective"]), settings,
                              Path(run_dir), pad_id, on_step=on_step)
    row["seconds"] = time.perf_counter() - started
    row["e2e"] = scored(model, held_out, pad_id, batch_size)


def run_fit(model, fit: dict, train_set, held_out, ex: dict, pad_id: int, rows: dict,
            length_held_out) -> None:
    """One fit of the config's `fits` list on an attached model; adds its rows."""
    fit = {**FIT_DEFAULTS[fit["solver"]], **fit}
    batch = ex["batch_size"]
    if fit["solver"] == "closed_form":
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as work:
            stats = collect_stats(model, train_set, batch, Path(work), "stats-train", NEVER,
                                  pad_id)
        rows["method alone"]["stats_s"] = time.perf_counter() - started
        for ridge in fit["ridges"]:
            for rank in fit["ranks"] or [ex["rank"]]:
                started = time.perf_counter()
                apply_closed_form_at(model, stats, ridge, rank)
                name = f"closed form, ridge {ridge:g}, rank {rank}"
                rows[name] = {"ridge": ridge, "rank": rank,
                              "solve_s": time.perf_counter() - started,
                              **scored(model, held_out, pad_id, batch)}
                if length_held_out:
                    rows[name]["long"] = scored(model, length_held_out, pad_id, batch)
                print_row(rows, name)
    else:
        settings = DistillSettings(stages=("layerwise",), solver=fit["solver"],
                                   sgd_epochs=fit.get("sgd_epochs", 1), capture_batch=batch,
                                   checkpoint_every=NEVER)
        with tempfile.TemporaryDirectory() as work:
            summary = distill(model, train_set, work, settings, held_out=held_out,
                              pad_id=pad_id)
        stage = summary["stages"]["layerwise"]
        name = f"{fit['solver']} layer-wise"
        rows[name] = {**scored(model, held_out, pad_id, batch), "stage_s": stage["seconds"],
                      "timings": stage["timings"], "layers": stage["layers"],
                      "peak_memory_gib": summary["peak_memory_gib"]}
        print_row(rows, name)
    if fit.get("e2e"):
        e2e = {**E2E_DEFAULTS, **fit["e2e"]}
        name = f"{name} + E2E"
        rows[name] = {}
        e2e_steps(model, train_set, held_out, e2e, pad_id, batch, rows[name])
        rows[name].update(rows[name].pop("e2e"))
        print_row(rows, name)


def print_row(rows: dict, name: str) -> None:
    alone, row = rows["method alone"]["kl"], rows[name]
    row["kl_gap_closed"] = 1 - row["kl"] / alone if alone > 0 else float("nan")
    if "long" in row:
        row["long"]["kl_gap_closed"] = 1 - row["long"]["kl"] / rows["method alone"]["long"]["kl"]
    print(f"| {name} | KL {row['kl']:.4f} | top-1 {100 * row['top1']:.1f}% | gap closed "
          f"{100 * row['kl_gap_closed']:.1f}% |", flush=True)


def kl_gap(ex: dict) -> Iterator[dict]:
    model, tokenizer = load_model(ex["model"], dtype=ex["dtype"])
    if ex["plain_prompts"]:  # prompts.templated then writes the question as plain text
        tokenizer.chat_template = None
    pad_id = tokenizer.pad_token_id or 0
    train_set, held_out = training_split(tokenizer, ex["sources"], ex["samples"],
                                         ex["held_out"], 0, ex["max_length"])
    length_held_out = []
    if ex["score_length"]:  # held-out cut longer, minus prompts the short split trains on
        trained = {tuple(s.input_ids[:s.boundary]) for s in train_set}
        _, longer = training_split(tokenizer, ex["sources"], ex["samples"], ex["held_out"], 0,
                                   ex["score_length"])
        length_held_out = [s for s in longer if tuple(s.input_ids[:s.boundary]) not in trained]
    report = {"setup": {"weights": weights_description(ex["model"]),
                        "train_continuation_tokens": sum(len(s.input_ids) - s.boundary
                                                         for s in train_set)},
              "methods": {}}
    if ex["teacher_pass"]:
        report["teacher_pass_s"] = teacher_pass_seconds(model, train_set, ex["batch_size"],
                                                        pad_id)
        print(f"teacher pass over {len(train_set)} samples: {report['teacher_pass_s']:.0f} s")
    for method in ex["methods"]:
        rows = report["methods"].setdefault(method, {})
        for fit in ex["fits"]:
            widest = max([ex["rank"], *fit.get("ranks", [])])
            caprese.attach(model, caprese.CapreseConfig(method=method, density=ex["density"],
                                                        rank=widest))
            if "method alone" not in rows:
                rows["method alone"] = scored(model, held_out, pad_id, ex["batch_size"])
                if length_held_out:
                    rows["method alone"]["long"] = scored(model, length_held_out, pad_id,
                                                          ex["batch_size"])
                print(f"\n{method}: method alone KL {rows['method alone']['kl']:.4f}")
            run_fit(model, fit, train_set, held_out, ex, pad_id, rows, length_held_out)
            caprese.detach(model)
            yield report
    yield report


# -- decode latency ---------------------------------------------------------------------
def random_model(config: transformers.PretrainedConfig, dtype: torch.dtype,
                 device: str) -> torch.nn.Module:
    """Allocate directly on the device and fill with N(0, 0.02): no host copy. Random weights
    time the same as trained ones (no data-dependent control flow in the full model)."""
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model = model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02, generator=generator)
        for name, buffer in model.named_buffers():  # rotary frequencies
            if "inv_freq" in name:
                dim = buffer.numel() * 2
                base = getattr(config, "rope_theta", 10000.0)
                buffer.copy_(1.0 / base ** (torch.arange(0, dim, 2, device=device).float() / dim))
    return model.eval()


TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096)


def decode_latency(ex: dict) -> Iterator[dict]:
    """`caprese bench` per dtype and setup; with peer = true llama.cpp runs beside (built-in
    models: it reads a GGUF of the same weights in the same dtype)."""
    device = "cuda" if torch.cuda.is_available() and not ex["tiny"] else "cpu"
    report = {"runs": {}}
    # memory = "alone": each variant's peak from a `caprese bench` process of its own (built-in
    # or Hub models on the CPU; random-weight configs are measured in this process).
    alone_memory = ex["memory"] == "alone" and not ex["config"] and device == "cpu"
    # Peaks measured between the timed runs; glibc's setting for that slows prefills.
    measured_here = not alone_memory and ex["memory"] != "off"
    for dtype in ex["dtypes"]:
        choice = resolve_dtype(dtype, device)
        alone = {}  # setup -> peaks_alone(), measured before our model loads
        for setup in ex["setups"] if alone_memory else ():
            prompt_len, gen_len = (int(n) for n in setup.split("+"))
            alone[setup] = peaks_alone(
                {"model": ex["model"], "dtype": dtype, "device": device, "rank": ex["rank"],
                 "prompt_len": prompt_len, "gen_len": gen_len, "batch": ex["batch"],
                 "prefill_chunk": ex["prefill_chunk"] or None, "compile": ex["compile"] or None},
                ex["variants"])
        if measured_here:
            free_large_blocks_at_once()
        if ex["config"]:
            config = load_config(str(ROOT / ex["config"]))
            for key, value in (TINY.items() if ex["tiny"] else ()):
                setattr(config, key, value)
            baseline_rss = settled_rss() if measured_here else None
            model = random_model(config, choice.dtype, device)
        else:
            import_model_code(ex["model"])
            baseline_rss = settled_rss() if measured_here else None
            model, tokenizer = load_model(ex["model"], dtype=dtype, device=device)
            del tokenizer  # not a variant's memory
            report["weights"] = weights_description(ex["model"])
        for setup in ex["setups"]:
            prompt_len, gen_len = (int(n) for n in setup.split("+"))
            with contextlib.ExitStack() as stack:
                peer = None
                if ex["peer"]:
                    gguf_path = peer_gguf(ex["model"], choice.dtype)
                    peer = stack.enter_context(LlamaCppPeer(
                        gguf_path, torch.get_num_threads(), prompt_len + gen_len))
                result = run_bench(model, ex["variants"], prompt_len, gen_len, ex["repeats"],
                                   ex["batch"], rank=ex["rank"], baseline_rss=baseline_rss,
                                   peer=peer, compile=ex["compile"] or None,
                                   prefill_chunk=ex["prefill_chunk"] or None)
            record_peaks(result, alone.get(setup, {}),
                         "alone" if alone_memory else "together" if measured_here else "off")
            report["runs"][f"{choice.name} {setup}"] = result
            print(f"\n## {choice.name}, {setup}\n{format_table(result)}", flush=True)
            yield report
            if result["setup"]["cut_off"]:  # interrupted: what ran is written, nothing more
                return
        del model


def decode_overhead(ex: dict) -> Iterator[dict]:
    model, _ = load_model(ex["model"], dtype=ex["dtype"])
    prompt = torch.randint(0, 20000, (1, ex["prompt_len"]),
                           generator=torch.Generator().manual_seed(0))
    gen_len = ex["gen_len"]

    def generate_seconds(tokens: int) -> float:
        started = time.perf_counter()
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=tokens,
                       min_new_tokens=tokens, do_sample=False, pad_token_id=0)
        return time.perf_counter() - started

    times: dict[str, list[float]] = {"HF generate": [], "lean loop": [], "lean loop + kernels": []}
    with torch.no_grad():
        for repeat in range(ex["repeats"] + 1):  # repeat 0 warms up and is dropped
            one, many = generate_seconds(1), generate_seconds(gen_len)
            lean = greedy_decode(model, prompt, gen_len).ttnt
            caprese.use_decode_kernels(model)
            kernels = greedy_decode(model, prompt, gen_len).ttnt
            caprese.use_decode_kernels(model, False)
            if repeat:
                times["HF generate"].append((many - one) / (gen_len - 1))
                times["lean loop"].append(lean)
                times["lean loop + kernels"].append(kernels)
    floor = bytes_per_token(model, "full", 0.5, 256, ex["prompt_len"] + gen_len // 2) / \
        measure_bandwidth(model.dtype)
    rows = [{"path": name, "ttnt": statistics.median(values), "runs": values,
             "floor_fraction": floor / statistics.median(values)} for name, values in times.items()]
    print(f"floor {1e3 * floor:.1f} ms\n| path | TTNT ms | of floor |\n|---|---|---|")
    for row in rows:
        print(f"| {row['path']} | {1e3 * row['ttnt']:.1f} | {100 * row['floor_fraction']:.0f}% |")
    yield {"weights": weights_description(ex["model"]), "floor_ttnt": floor, "rows": rows}


# -- general share -----------------------------------------------------------------------
def general_share(ex: dict) -> Iterator[dict]:
    model, tokenizer = load_model(ex["model"], dtype=ex["dtype"])
    pad_id = tokenizer.pad_token_id or 0
    texts = {"math500": teacher_forced(tokenizer, data.load("math500")[:ex["eval_samples"]],
                                       max_length=ex["max_length"]),
             "xsum_plain": teacher_forced(
                 tokenizer, [replace(r, prompt=article_body(r))
                             for r in reserved(data.load("xsum"))[:ex["eval_samples"]]],
                 language=True, max_length=ex["max_length"])}
    settings = DistillSettings(stages=("layerwise", "e2e"), e2e_epochs=1,
                               e2e_samples=ex["e2e_samples"])
    report: dict = {"setup": {"weights": weights_description(ex["model"])}, "rows": []}
    with tempfile.TemporaryDirectory() as work:
        cache = str(Path(work) / "teacher_text.jsonl")  # one generation for every share
        for method in ex["methods"]:
            config = caprese.CapreseConfig(method=method, density=ex["density"], rank=ex["rank"])
            alone: dict[str, float] = {}
            for share in ex["shares"]:
                job = DistillJob(config, settings, samples=ex["samples"],
                                 held_out=ex["held_out"], max_length=ex["max_length"],
                                 general_share=share, teacher_cache=cache)
                out = Path(work) / f"{method}-{share}"
                started = time.perf_counter()
                summary = run_job(model, tokenizer, job, out)
                row = {"method": method, "share": share, "seconds": time.perf_counter() - started,
                       "kept": summary.get("kept"), "held_out": summary.get("adapter_check")}
                caprese.load(model, out)
                if not alone:  # the method alone is the same for every share
                    with path_off(model):
                        alone = {name: scored(model, samples, pad_id, ex["batch_size"])["kl"]
                                 for name, samples in texts.items()}
                for name, samples in texts.items():
                    row[name] = {"kl_method": alone[name],
                                 "kl_caprese": scored(model, samples, pad_id,
                                                      ex["batch_size"])["kl"]}
                caprese.detach(model)
                report["rows"].append(row)
                print(f"| {method} | {share} | " + " | ".join(
                    f"{name} {row[name]['kl_method']:.4f} -> {row[name]['kl_caprese']:.4f}"
                    for name in texts) + f" | {row['seconds']:.0f} s |", flush=True)
                yield report
    yield report


KINDS = {"kl_gap": kl_gap, "decode_latency": decode_latency, "decode_overhead": decode_overhead,
         "general_share": general_share}


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        raise SystemExit(__doc__)
    experiment = load_experiment(argv[0], argv[1:])
    header = {"experiment": experiment, "machine": machine(), "caprese": caprese.__version__,
              "command": "python benchmarks/run.py " + shlex.join(argv)}
    report: dict = {}
    for report in KINDS[experiment["experiment"]](experiment):
        write({**header, **report}, experiment)
    print(f"(written to {experiment['out']})")
    return {**header, **report}


if __name__ == "__main__":
    main()
