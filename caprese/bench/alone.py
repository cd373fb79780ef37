"""Each variant's peak memory in a process of its own.

One process that runs several variants carries heap from the earlier ones into the later
ones' peaks: glibc keeps freed blocks in its arenas, and no trim hands all of them back. On
the 1.5B model that put later variants up to 250 MiB over their allowance while each, run
alone, stayed within it. So `caprese bench --memory alone` (the default on a CPU) runs
`caprese bench` once more per variant, on that variant alone, and reports those peaks.
A forked child would save loading the model again, but OpenMP's thread pool does not survive
a fork (the child hangs in its first parallel product), so each child starts fresh.

A compiled decode step is measured in two children: the first compiles it, and a process
that compiles its step holds tens of MiB more than one that loads it (docs/BENCHMARKS.md,
the 1.5B model); torch.compile keeps the step in its on-disk cache, and the second child
loads it from there, as every later process of a user does. The second's peak is the
variant's; the first's is reported beside it as the compiling peak.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

# `caprese bench` options a child takes from its parent, as attribute names. The child gets its
# own --variants, one timed run after the warm-up and in-process memory; it never starts the
# peer (llama.cpp measures its own memory in a worker of its own) and writes to a folder of
# ours.
FORWARDED = ("model", "dtype", "device", "threads", "adapter", "density", "rank", "prompt_len",
             "gen_len", "batch", "prefill_chunk", "compile")
NOT_FORWARDED = ("variants", "repeats", "peer", "memory", "out")


def child_arguments(options: dict, variant: str, out: Path) -> list[str]:
    """The `caprese bench` arguments that measure `variant` alone with `options` (attribute
    name -> value, as the parent parsed them; None: not given)."""
    unknown = set(options) - set(FORWARDED)
    if unknown:
        raise ValueError(f"not bench options a child takes: {sorted(unknown)}")
    argv = ["bench", "--variants", variant, "--repeats", "1", "--memory", "together",
            "--out", str(out)]
    for name in FORWARDED:
        value = options.get(name)
        if value is not None:
            argv += ["--" + name.replace("_", "-"), str(value)]
    return argv


def peaks_alone(options: dict, variants: list[str]) -> dict[str, dict]:
    """{variant: {"peak_bytes": peak above the child's RSS before its model loaded, and with
    a compiled step "compiling_peak_bytes" and "step_from_cache" (whether the measured child
    loaded its step from torch.compile's cache)}}, the children one after the other (never
    two models in memory beside ours at once)."""
    peaks = {}
    children = 2 if options.get("compile") else 1
    with tempfile.TemporaryDirectory(prefix="caprese-memory-") as work:
        for variant in tqdm(variants, desc="memory alone", unit="variant"):
            runs = [_child(options, variant, Path(work) / "result.json")
                    for _ in range(children)]
            row, setup = runs[-1]
            peaks[variant] = {"peak_bytes": row["peak_bytes"]}
            if children == 2:
                cache = setup["compile_cache"]
                peaks[variant] |= {"compiling_peak_bytes": runs[0][0]["peak_bytes"],
                                   "step_from_cache": cache["hits"] > 0 and cache["misses"] == 0}
    return peaks


def _child(options: dict, variant: str, out: Path) -> tuple[dict, dict]:
    """One child's measurement of `variant`: its result row and setup."""
    argv = [sys.executable, "-m", "caprese", *child_arguments(options, variant, out)]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise RuntimeError(
            f"measuring {variant}'s memory alone failed (exit {done.returncode}); "
            f"rerun with --memory together to skip it. Its last output:\n{tail}")
    result = json.loads(out.read_text())
    row = result["variants"][0]
    if row["peak_bytes"] is None:
        raise RuntimeError(f"{variant}'s process measured no peak: this system does "
                           "not let a process reset its peak RSS (Linux does)")
    return row, result["setup"]


def record_peaks(result: dict, peaks: dict[str, dict], memory: str) -> None:
    """Put the children's peaks into a run_bench result (rows they did not measure, like the
    peer's, keep their own) and record how memory was measured."""
    for row in result["variants"]:
        row.update(peaks.get(row["variant"], {}))
    result["setup"]["memory"] = memory
