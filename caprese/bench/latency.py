"""Decode latency of full / method / Caprese / LoRA, side by side.

Variants share one set of weights: each repeat attaches a variant, decodes, detaches, and
the variants alternate (A B C A B C ...) so that machine noise hits all of them alike. The
report gives medians, the weight bytes each variant reads per decode token, and the floor
those bytes imply at the memory bandwidth this machine measures for a matrix-vector product.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from caprese.adapter import attach, blocks, detach, load_weights, read_config
from caprese.bench import memory
from caprese.bench.decode import greedy_decode
from caprese.bench.lora import attach_lora, matched_rank
from caprese.config import CapreseConfig
from caprese.families import text_config
from caprese.info import budget
from caprese.kernels.cpu import machine
from caprese.kernels.huge_pages import collapse
from caprese.methods.nf4 import SETTINGS as NF4_SETTINGS
from caprese.phases import prepare_decode, use_decode_kernels

VARIANTS = ("full", "griffin", "caprese", "lora", "cats", "caprese-cats", "nf4", "caprese-nf4")
PEER = "llama.cpp"  # timed by a bench.peer.LlamaCppPeer, not attached to our model


KERNELS = ":k"  # variant suffix: single-token products by caprese.kernels ("griffin:k")


RESELECT = "@"  # variant suffix: GRIFFIN reselecting every RHO tokens ("griffin@32")


def parse_variant(name: str) -> tuple[str, bool]:
    """("griffin", True) for "griffin:k" (and for "griffin@32:k"); refuses unknown names."""
    base, kernels = (name[: -len(KERNELS)], True) if name.endswith(KERNELS) else (name, False)
    base, _, rho = base.partition(RESELECT)
    if base not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}, each "
                         f"optionally with {RESELECT}RHO (GRIFFIN's variants: reselect every "
                         f"RHO tokens) and {KERNELS} (the CPU decode kernels)")
    if rho and (not rho.isdigit() or method_of(base) != "griffin" or base == "full"):
        raise ValueError(f"variant {name!r}: {RESELECT}RHO takes a whole number of tokens, on "
                         "GRIFFIN's variants (griffin, caprese, lora) only")
    return base, kernels


def reselect_every(name: str) -> int | None:
    """RHO of a "griffin@RHO" variant (None: no reselection)."""
    rho = name.removesuffix(KERNELS).partition(RESELECT)[2]
    return int(rho) if rho else None


def method_of(name: str) -> str:
    """The efficient method a variant runs ("caprese" and "lora" run GRIFFIN)."""
    for method in ("cats", "nf4"):
        if name.endswith(method):
            return method
    return "griffin"


def refuse_reselection_when_compiled(variants, compile: str | None) -> None:
    """A compiled step is one fixed graph: reselecting GRIFFIN's neurons changes its shapes."""
    for name in variants:
        if reselect_every(name) is not None and compile:
            raise ValueError(f"compiled decoding runs fixed steps: {name!r} reselects GRIFFIN's "
                             "neurons; drop the compile option or the reselection")


@contextlib.contextmanager
def variant(model, name: str, density: float, rank: int, adapter: str | None,
            batch: int = 1):
    """The model as `name` for the duration of the block (weights shared, nothing copied)."""
    rho = reselect_every(name)
    name, kernels = parse_variant(name)
    method = method_of(name)
    if name == "full":
        use_decode_kernels(model, kernels)
        try:
            yield model
        finally:
            use_decode_kernels(model, False)
        return
    config = CapreseConfig(method=method, density=density,
                           rank=rank if name.startswith("caprese") else None,
                           reselect_every=rho)
    if name == "lora":
        attach_lora(model, config, caprese_rank=rank)
    elif adapter and name.startswith("caprese") and read_config(adapter)[0].method == method:
        attach(model, dataclasses.replace(read_config(adapter)[0], reselect_every=rho))
        load_weights(model, adapter)
    else:  # an untrained path times the same as a trained one
        attach(model, config)
    use_decode_kernels(model, kernels)
    prepare_decode(model, batch)  # once per attach: timed apart from the first token
    try:
        yield model
    finally:
        use_decode_kernels(model, False)
        detach(model)


def kv_cache_bytes(model, batch: int, length: int) -> int:
    """Keys and values of every layer for `batch` sequences of `length` tokens."""
    text = text_config(model.config)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    element = next(model.parameters()).element_size()
    return 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * length * batch \
        * element


def bytes_per_token(model, name: str, density: float, rank: int, context: int) -> int:
    """Weight bytes read per decode token, plus the KV cache at `context` tokens."""
    full_name, name = name, parse_variant(name)[0]
    text = text_config(model.config)
    method = method_of(name)
    config = CapreseConfig(method="none" if name == "full" else method, density=density,
                           rank=rank if name.startswith("caprese") else None)
    counts = budget(model.config, config)
    params = counts.active_caprese
    d, d_ff = text.hidden_size, text.intermediate_size
    if name == "lora":
        params += 3 * matched_rank(d, d_ff, rank) * (d + d_ff) * len(counts.method_layers)
    element = next(model.parameters()).element_size()
    read = params * element
    rho = reselect_every(full_name)
    if rho:  # a dense pass over the last rho tokens reads every weight once per reselection
        read += budget(model.config, CapreseConfig(method="none", rank=None)).active_full \
            * element / rho
    if method == "nf4" and name != "full":  # the MLPs' weights in 4 bits plus block absmax
        mlp = 3 * d * d_ff * len(counts.method_layers)
        read += round(mlp * (0.5 + 4 / NF4_SETTINGS["blocksize"])) - mlp * element
    return round(read) + kv_cache_bytes(model, 1, context)


def bandwidth_probe(dtype: torch.dtype, device: str = "cpu", megabytes: int = 512
                    ) -> Callable[..., float]:
    """A function measuring the bytes per second the machine reads now: the better of a large
    matrix-vector product in `dtype` and a plain sum over as many bytes (medians of `repeats`
    after `warmup` untimed runs each). Its buffers are allocated once, so a benchmark can
    measure the rate beside every run on a host whose bandwidth wanders; they lie on huge
    pages where the system allows, as the weights do under the decode kernels
    (kernels/huge_pages.py), since a read from them is faster. The product alone
    understates the limit where the dtype's products are compute-bound: PyTorch's bf16
    product reads 11 GB/s on a 2-core AMD EPYC that sums 42 GB/s, which made the full model
    decode at "136% of the floor"."""
    columns = 4096
    rows = megabytes * 2**20 // (columns * torch.empty((), dtype=dtype).element_size())
    matrix = torch.randn(rows, columns, device=device).to(dtype)
    vector = torch.randn(columns, device=device).to(dtype)
    collapse([matrix])
    flat = matrix.view(-1).view(torch.uint8).view(torch.float32)  # the same bytes

    def rate(repeats: int = 15, warmup: int = 2) -> float:
        product = median_seconds(lambda: torch.mv(matrix, vector), device, repeats, warmup)
        total = median_seconds(lambda: flat.sum(), device, repeats, warmup)
        return matrix.numel() * matrix.element_size() / min(product, total)
    return rate


def measure_bandwidth(dtype: torch.dtype, device: str = "cpu", megabytes: int = 512,
                      repeats: int = 15, warmup: int = 2) -> float:
    """The read rate of bandwidth_probe, measured once."""
    return bandwidth_probe(dtype, device, megabytes)(repeats, warmup)


def median_seconds(run, device: str = "cpu", repeats: int = 9, warmup: int = 2) -> float:
    """The median time of `run` over `repeats` calls after `warmup` untimed ones."""
    times = []
    for _ in range(warmup + repeats):
        if device != "cpu":
            torch.cuda.synchronize()
        started = time.perf_counter()
        run()
        if device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times[warmup:])


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views and tied weights count once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in tensors if t is not None}
    return sum(storages.values())


def quantized_bytes(model) -> int:
    """A quantizing method's 4-bit copies of the MLPs (beside the dense weights)."""
    return sum(block.replacement.nbytes() for block in blocks(model).values()
               if block.replacement is not None)


def gathered_bytes(model) -> int:
    """GRIFFIN's per-prompt matrices (each sample's kept neurons, with L and R appended)."""
    tensors = [t for block in blocks(model).values()
               if block.fast is not None and block.uses_per_sample_weights()
               for t in vars(block.fast).values()]
    return storage_bytes(tensors)


def cudagraph_skips() -> int:
    """How many compiled graphs torch.compile has run without CUDA graphs, in this process."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


def compile_cache_counts() -> dict[str, int]:
    """Compiled graphs this process has taken from torch.compile's on-disk caches (hits:
    inductor's FX graph cache or AOTAutograd's) and compiled afresh (misses), so far."""
    from torch._dynamo.utils import counters

    inductor, aot = counters["inductor"], counters["aot_autograd"]
    return {"hits": inductor["fxgraph_cache_hit"] + aot["autograd_cache_hit"],
            "misses": inductor["fxgraph_cache_miss"] + aot["autograd_cache_miss"]}


def run_bench(model, variants, prompt_len: int, gen_len: int, repeats: int, batch: int = 1,
              density: float = 0.5, rank: int = 256, adapter: str | None = None,
              seed: int = 0, baseline_rss: int | None = None, peer=None,
              compile: str | None = None, prefill_chunk: int | None = None) -> dict:
    """Time every variant (interleaved repeats, medians). With `baseline_rss`, the RSS the
    process held before the model loaded, each variant's peak memory is measured too. A
    `peer` (bench.peer.LlamaCppPeer) is timed as one more variant, on the same prompt. With
    `compile` (a caprese.compiled backend), decode steps run compiled; each variant compiles
    in its warm-up run, reported as "warm-up s" and left out of the medians. With
    `prefill_chunk`, every variant takes the prompt in pieces of that many tokens."""
    refuse_reselection_when_compiled(variants, compile)
    if peer is not None:
        if batch != 1:
            raise ValueError(f"the {PEER} peer is timed at batch 1, not {batch}")
        variants = [*variants, PEER]
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    vocab = text_config(model.config).vocab_size
    prompt = torch.randint(0, vocab, (batch, prompt_len), generator=generator).to(device)
    weights = storage_bytes(model.parameters())
    kv_cache = kv_cache_bytes(model, batch, prompt_len + gen_len)
    measure_memory = baseline_rss is not None and device.type == "cpu"
    runs: dict[str, list] = {name: [] for name in variants}
    held: dict[str, dict] = {}
    tokens: dict[str, torch.Tensor] = {}
    warmup: dict[str, float] = {}  # the first run's total: compiling, when compiled
    before = measure_bandwidth(next(model.parameters()).dtype, device.type)
    # A bar per run, with the last run's time: a run cut off at a time limit still shows how
    # far it got and how long each variant takes.
    progress = tqdm(total=(repeats + 1) * len(variants), desc="bench", unit="run")
    skips_before, cache_before = cudagraph_skips(), compile_cache_counts()

    def time_one(name: str, repeat: int) -> None:
        if name == PEER:
            result = peer.decode(prompt[0].tolist(), gen_len)
            tokens[name] = torch.tensor([result["tokens"]])
            held[name] = {"adapter": 0, "gathered": 0, "quantized": 0}
            warmup.setdefault(name, result["ttft"] + sum(result["steps"]))
            if repeat:
                steps = result["steps"]
                runs[name].append({"total": result["ttft"] + sum(steps),
                                   "ttft": result["ttft"], "ttnt": sum(steps) / len(steps),
                                   "prepare": 0.0, "peak": result["peak"]})
            return
        measured = measure_memory and memory.reset_peak()
        started = time.perf_counter()
        with variant(model, name, density, rank, adapter, batch):
            prepare = time.perf_counter() - started
            started = time.perf_counter()
            run = greedy_decode(model, prompt, gen_len, compile=compile,
                                prefill_chunk=prefill_chunk)
            total = time.perf_counter() - started
            attached = parse_variant(name)[0] != "full"
            held[name] = {"adapter": storage_bytes(model.parameters()) - weights,
                          "gathered": gathered_bytes(model) if attached else 0,
                          "quantized": quantized_bytes(model) if attached else 0}
            peak = memory.peak_bytes() if measured else None
        tokens[name] = run.tokens
        warmup.setdefault(name, total)
        if repeat:
            runs[name].append({"total": total, "ttft": run.ttft, "ttnt": run.ttnt,
                               "prepare": prepare, "ttft_faults": run.ttft_faults,
                               "peak": None if peak is None else peak - baseline_rss})
        progress.set_postfix_str(f"{name}: {total:.2f} s", refresh=False)
        progress.write(f"{name} ({'warm-up' if not repeat else f'repeat {repeat}'}): "
                       f"TTFT {run.ttft:.3f} s ({run.ttft_faults} page faults), "
                       f"TTNT {run.ttnt * 1e3:.2f} ms, "
                       f"total {total:.2f} s")  # a log cut off at a time limit keeps these

    cut_off = False
    try:
        for repeat in range(repeats + 1):  # repeat 0 warms up every variant and is dropped
            for name in variants:
                time_one(name, repeat)
                progress.update()
    except KeyboardInterrupt:  # Ctrl-C, or a time limit (`timeout -s INT`): keep what ran
        cut_off = True
        variants = [name for name in variants if runs[name]]
        if not variants:
            raise
    progress.close()
    # The machine's read rate, measured after the runs and compared with the one before
    # them: the better of the two, since a shared machine reads slower while it is busy.
    bandwidth = max(before, measure_bandwidth(next(model.parameters()).dtype, device.type))
    rows = []
    for name in variants:
        per = {k: statistics.median(r[k] for r in runs[name])
               for k in ("total", "ttft", "ttnt", "prepare")}
        read = bytes_per_token(model, "full" if name == PEER else name, density, rank,
                               prompt_len + gen_len // 2)
        peaks = [r["peak"] for r in runs[name] if r["peak"] is not None]
        faults = [r["ttft_faults"] for r in runs[name] if "ttft_faults" in r]  # not the peer's
        allowed = memory.allowed_bytes(weights, held[name]["adapter"] + held[name]["quantized"],
                                       held[name]["gathered"], kv_cache)
        rows.append({"variant": name, **per, "tokens_per_s": batch / per["ttnt"],
                     "bytes_per_token": read, "floor_ttnt": read / bandwidth,
                     "floor_fraction": read / bandwidth / per["ttnt"],
                     "peak_bytes": max(peaks) if peaks else None, "allowed_bytes": allowed,
                     "ttft_faults": statistics.median(faults) if faults else None,
                     **{f"{k}_bytes": v for k, v in held[name].items()},
                     "warmup": warmup.get(name), "runs": runs[name]})
    if peer is not None:  # same weights: the peer's greedy tokens should match ours
        row = next(r for r in rows if r["variant"] == PEER)
        full = next((name for name in ("full", "full:k") if name in tokens), None)
        if full:
            row["tokens_agree"] = (tokens[PEER] == tokens[full].cpu()).float().mean().item()
    timed = [row["variant"] for row in rows if row["variant"] != PEER]
    for row in rows:  # cuts against the full model on the same path (PyTorch or kernels);
        # the peer against our full model, on PyTorch's path if it ran
        kernels = (parse_variant(row["variant"])[1] if row["variant"] != PEER
                   else "full" not in timed)
        full = next((r for r in rows if r["variant"] in timed
                     and parse_variant(r["variant"]) == ("full", kernels)), None)
        if full:
            row["ttnt_cut"] = 1 - row["ttnt"] / full["ttnt"]
            row["bytes_cut"] = 1 - row["bytes_per_token"] / full["bytes_per_token"]
            row["ttft_added"] = row["ttft"] / full["ttft"] - 1
    return {
        "setup": {"prompt_len": prompt_len, "gen_len": gen_len, "batch": batch,
                  "repeats": repeats, "density": density, "rank": rank, "adapter": adapter,
                  "dtype": str(next(model.parameters()).dtype), "device": str(device),
                  "threads": torch.get_num_threads(), "machine": machine(device),
                  "compiled": compile, "prefill_chunk": prefill_chunk, "cut_off": cut_off,
                  # graphs that torch.compile ran without CUDA graphs (its log says why)
                  "cudagraph_skips": (cudagraph_skips() - skips_before
                                      if compile and device.type == "cuda" else None),
                  # hits and no misses: every compiled step came from the on-disk caches
                  "compile_cache": ({kind: count - cache_before[kind]
                                     for kind, count in compile_cache_counts().items()}
                                    if compile else None)},
        "bandwidth_gb_s": bandwidth / 1e9,
        "weights_bytes": weights,
        "kv_cache_bytes": kv_cache,
        "variants": rows,
    }


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}"


def _compiling(row: dict) -> str:
    """The compiling child's peak; flagged where the measured child compiled its step too
    (torch.compile's cache did not keep it), so its peak is a compiling one."""
    if "compiling_peak_bytes" not in row:
        return "-"
    return _mib(row["compiling_peak_bytes"]) + ("" if row["step_from_cache"] else
                                                " (both compiled)")


def _thousands(count: float | None) -> str:
    return "-" if count is None else f"{count / 1e3:.0f}k"


MEMORY_NOTES = {"alone": "; peak MiB: each variant in a process of its own",
                "together": "; peak MiB: in this process, after the variants before it"}


def format_table(result: dict) -> str:
    s = result["setup"]
    compiled = bool(s.get("compiled"))
    compiling = any("compiling_peak_bytes" in r for r in result["variants"])
    lines = [f"prompt {s['prompt_len']} + gen {s['gen_len']}, batch {s['batch']}, {s['dtype']}, "
             f"{s['threads']} threads, {s['device']} ({s['machine']}); median of {s['repeats']}; "
             f"measured bandwidth {result['bandwidth_gb_s']:.1f} GB/s"
             + (f"; decode compiled by {s['compiled']} (warm-up s: the first run, "
                "compiling included)" if compiled else "")
             + (f"; prompt fed in pieces of {s['prefill_chunk']} tokens"
                if s.get("prefill_chunk") else "")
             + ("; CUT OFF before its last run: medians of the runs that ended"
                if s.get("cut_off") else "")
             + (f"; CUDA graphs SKIPPED for {s['cudagraph_skips']} compiled graph(s): those "
                "steps ran eagerly (torch's log says why)" if s.get("cudagraph_skips") else "")
             + MEMORY_NOTES.get(s.get("memory"), "")
             + (", its decode step loaded from torch.compile's cache (compiling MiB: the "
                "process that compiled it)" if compiling else ""),
             "| variant | total s | build s | " + ("warm-up s | " if compiled else "")
             + "TTFT s | TTFT added | TTFT page faults | TTNT ms | tok/s | MB/token "
             "| floor ms | of floor | TTNT cut | bytes cut | peak MiB | "
             + ("compiling MiB | " if compiling else "") + "allowed MiB |",
             "|---" * (15 + compiled + compiling) + "|"]
    for r in result["variants"]:
        warmup = f"{r['warmup']:.2f} | " if compiled else ""
        lines.append(
            f"| {r['variant']} | {r['total']:.2f} | {r['prepare']:.2f} | {warmup}"
            f"{r['ttft']:.3f} | "
            f"{100 * r.get('ttft_added', 0):+.0f}% | {_thousands(r.get('ttft_faults'))} | "
            f"{1e3 * r['ttnt']:.1f} | "
            f"{r['tokens_per_s']:.1f} | {r['bytes_per_token'] / 1e6:.0f} | "
            f"{1e3 * r['floor_ttnt']:.1f} | {100 * r['floor_fraction']:.0f}% | "
            f"{100 * r.get('ttnt_cut', 0):.1f}% | {100 * r.get('bytes_cut', 0):.1f}% | "
            f"{_mib(r['peak_bytes'])} | "
            + (f"{_compiling(r)} | " if compiling else "") + f"{_mib(r['allowed_bytes'])} |")
    lines += [f"{r['variant']}: its 4-bit copy of the MLPs holds {_mib(r['quantized_bytes'])} "
              "MiB beside the dense weights (counted in allowed MiB)"
              for r in result["variants"] if r.get("quantized_bytes")]
    return "\n".join(lines)
