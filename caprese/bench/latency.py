"""Decode latency of full / method / Caprese / LoRA, side by side.

Variants share one set of weights: each repeat attaches a variant, decodes, detaches, and
the variants alternate (A B C A B C ...) so that machine noise hits all of them alike. The
report gives medians, the weight bytes each variant reads per decode token, and the floor
those bytes imply at the memory bandwidth this machine measures for a matrix-vector product.
"""

from __future__ import annotations

import contextlib
import platform
import resource
import statistics
import time

import torch
from tqdm.auto import tqdm

from caprese.adapter import attach, detach, load_weights, read_config
from caprese.bench.decode import greedy_decode
from caprese.bench.lora import attach_lora, matched_rank
from caprese.config import CapreseConfig
from caprese.families import text_config
from caprese.info import budget
from caprese.phases import use_decode_kernels

VARIANTS = ("full", "griffin", "caprese", "lora", "cats", "caprese-cats")


KERNELS = ":k"  # variant suffix: single-token products by caprese.kernels ("griffin:k")


def parse_variant(name: str) -> tuple[str, bool]:
    """("griffin", True) for "griffin:k"; refuses unknown names."""
    base, kernels = (name[: -len(KERNELS)], True) if name.endswith(KERNELS) else (name, False)
    if base not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}, each "
                         f"optionally with {KERNELS} for the CPU decode kernels")
    return base, kernels


@contextlib.contextmanager
def variant(model, name: str, density: float, rank: int, adapter: str | None):
    """The model as `name` for the duration of the block (weights shared, nothing copied)."""
    name, kernels = parse_variant(name)
    method = "cats" if name.endswith("cats") else "griffin"
    if name == "full":
        use_decode_kernels(model, kernels)
        try:
            yield model
        finally:
            use_decode_kernels(model, False)
        return
    config = CapreseConfig(method=method, density=density,
                           rank=rank if name.startswith("caprese") else None)
    if name == "lora":
        attach_lora(model, config, caprese_rank=rank)
    elif adapter and name.startswith("caprese") and read_config(adapter)[0].method == method:
        attach(model, read_config(adapter)[0])
        load_weights(model, adapter)
    else:  # an untrained path times the same as a trained one
        attach(model, config)
    use_decode_kernels(model, kernels)
    try:
        yield model
    finally:
        use_decode_kernels(model, False)
        detach(model)


def bytes_per_token(model, name: str, density: float, rank: int, context: int) -> int:
    """Weight bytes read per decode token, plus the KV cache at `context` tokens."""
    name = parse_variant(name)[0]
    text = text_config(model.config)
    method = "cats" if name.endswith("cats") else "griffin"
    config = CapreseConfig(method="none" if name == "full" else method, density=density,
                           rank=rank if name.startswith("caprese") else None)
    counts = budget(model.config, config)
    params = counts.active_caprese
    if name == "lora":
        d, d_ff = text.hidden_size, text.intermediate_size
        params += 3 * matched_rank(d, d_ff, rank) * (d + d_ff) * len(counts.method_layers)
    element = next(model.parameters()).element_size()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * context * element
    return params * element + kv


def measure_bandwidth(dtype: torch.dtype, device: str = "cpu", megabytes: int = 512,
                      repeats: int = 15, warmup: int = 2) -> float:
    """Bytes per second of a large matrix-vector product: what a decode step can reach (the
    median of `repeats` products after `warmup` untimed ones)."""
    columns = 4096
    rows = megabytes * 2**20 // (columns * torch.empty((), dtype=dtype).element_size())
    matrix = torch.randn(rows, columns, device=device).to(dtype)
    vector = torch.randn(columns, device=device).to(dtype)
    times = []
    for _ in range(warmup + repeats):
        if device != "cpu":
            torch.cuda.synchronize()
        started = time.perf_counter()
        torch.mv(matrix, vector)
        if device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return matrix.numel() * matrix.element_size() / statistics.median(times[warmup:])


def run_bench(model, variants, prompt_len: int, gen_len: int, repeats: int, batch: int = 1,
              density: float = 0.5, rank: int = 256, adapter: str | None = None,
              seed: int = 0) -> dict:
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    vocab = text_config(model.config).vocab_size
    prompt = torch.randint(0, vocab, (batch, prompt_len), generator=generator).to(device)
    runs: dict[str, list] = {name: [] for name in variants}
    tokens: dict[str, torch.Tensor] = {}
    # A bar per run, with the last run's time: a run cut off at a time limit still shows how
    # far it got and how long each variant takes.
    progress = tqdm(total=(repeats + 1) * len(variants), desc="bench", unit="run")
    for repeat in range(repeats + 1):  # repeat 0 warms up every variant and is dropped
        for name in variants:
            with variant(model, name, density, rank, adapter):
                started = time.perf_counter()
                run = greedy_decode(model, prompt, gen_len)
                total = time.perf_counter() - started
            tokens[name] = run.tokens
            if repeat:
                runs[name].append({"total": total, "ttft": run.ttft, "ttnt": run.ttnt})
            progress.set_postfix_str(f"{name}: {total:.2f} s", refresh=False)
            progress.update()
    progress.close()
    bandwidth = measure_bandwidth(next(model.parameters()).dtype, device.type)
    rows = []
    for name in variants:
        per = {k: statistics.median(r[k] for r in runs[name]) for k in ("total", "ttft", "ttnt")}
        read = bytes_per_token(model, name, density, rank, prompt_len + gen_len // 2)
        rows.append({"variant": name, **per, "tokens_per_s": batch / per["ttnt"],
                     "bytes_per_token": read, "floor_ttnt": read / bandwidth,
                     "floor_fraction": read / bandwidth / per["ttnt"],
                     "runs": runs[name]})
    for row in rows:  # cuts against the full model on the same path (PyTorch or kernels)
        kernels = parse_variant(row["variant"])[1]
        full = next((r for r in rows if parse_variant(r["variant"]) == ("full", kernels)), None)
        if full:
            row["ttnt_cut"] = 1 - row["ttnt"] / full["ttnt"]
            row["bytes_cut"] = 1 - row["bytes_per_token"] / full["bytes_per_token"]
    return {
        "setup": {"prompt_len": prompt_len, "gen_len": gen_len, "batch": batch,
                  "repeats": repeats, "density": density, "rank": rank, "adapter": adapter,
                  "dtype": str(next(model.parameters()).dtype), "device": str(device),
                  "threads": torch.get_num_threads(), "machine": _machine(device)},
        "bandwidth_gb_s": bandwidth / 1e9,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "variants": rows,
    }


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {platform.platform()}"


def format_table(result: dict) -> str:
    s = result["setup"]
    lines = [f"prompt {s['prompt_len']} + gen {s['gen_len']}, batch {s['batch']}, {s['dtype']}, "
             f"{s['threads']} threads, {s['device']} ({s['machine']}); median of {s['repeats']}; "
             f"measured bandwidth {result['bandwidth_gb_s']:.1f} GB/s",
             "| variant | total s | TTFT s | TTNT ms | tok/s | MB/token | floor ms | of floor "
             "| TTNT cut | bytes cut |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["variants"]:
        lines.append(
            f"| {r['variant']} | {r['total']:.2f} | {r['ttft']:.3f} | {1e3 * r['ttnt']:.1f} | "
            f"{r['tokens_per_s']:.1f} | {r['bytes_per_token'] / 1e6:.0f} | "
            f"{1e3 * r['floor_ttnt']:.1f} | {100 * r['floor_fraction']:.0f}% | "
            f"{100 * r.get('ttnt_cut', 0):.1f}% | {100 * r.get('bytes_cut', 0):.1f}% |")
    return "\n".join(lines)
