"""`caprese bench --memory alone`: each variant's peak measured in a process of its own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from caprese.bench.alone import FORWARDED, NOT_FORWARDED, child_arguments
from caprese.cli import build_parser


def bench_dests() -> set[str]:
    parsed = build_parser().parse_args(["bench", "--model", "m"])
    return set(vars(parsed)) - {"command", "func"}


def test_a_child_gets_every_bench_option_but_its_own():
    """A bench option added later must be forwarded to the children or named as theirs."""
    assert bench_dests() == set(FORWARDED) | set(NOT_FORWARDED)
    parent = build_parser().parse_args([
        "bench", "--model", "some/model", "--dtype", "fp32", "--device", "cpu", "--threads", "3",
        "--adapter", "run/adapter", "--density", "0.3", "--rank", "64", "--prompt-len", "100",
        "--gen-len", "7", "--batch", "2", "--prefill-chunk", "32", "--compile", "inductor",
        "--variants", "full,griffin", "--repeats", "5", "--out", "mine.json"])
    options = {name: getattr(parent, name) for name in FORWARDED}
    child = build_parser().parse_args(child_arguments(options, "griffin", "theirs.json"))
    assert {name: getattr(child, name) for name in FORWARDED} == options
    assert (child.variants, child.repeats, child.memory, child.out, child.peer) == \
        ("griffin", 1, "together", "theirs.json", None)


def test_unset_options_stay_unset_and_unknown_ones_are_refused():
    options = {name: None for name in FORWARDED} | {"model": "m"}
    child = build_parser().parse_args(child_arguments(options, "full", "r.json"))
    assert child.adapter is None and child.prefill_chunk is None and child.compile is None
    with pytest.raises(ValueError, match="not bench options"):
        child_arguments({"model": "m", "peer": "llama.cpp"}, "full", "r.json")


def test_bench_reports_each_variants_peak_from_its_own_process(tiny_dir, tmp_path, capsys):
    from caprese.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(tiny_dir), "--variants", "full,griffin",
                 "--prompt-len", "8", "--gen-len", "3", "--repeats", "1", "--rank", "4",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["setup"]["memory"] == "alone"
    for row in result["variants"]:
        assert isinstance(row["peak_bytes"], int) and row["peak_bytes"] > 0
        # the timed runs in this process did not measure memory: every peak is a child's
        assert all(run["peak"] is None for run in row["runs"])
    assert "each variant in a process of its own" in capsys.readouterr().out


def test_a_failing_child_says_which_variant_and_what_to_do(tmp_path, monkeypatch):
    import caprese.bench.alone as alone

    def broken(argv, **kwargs):
        class Done:
            returncode, stdout, stderr = 1, "", "Killed: out of memory"
        return Done()

    monkeypatch.setattr(alone.subprocess, "run", broken)
    with pytest.raises(RuntimeError, match=r"(?s)measuring cats's memory.*--memory together"
                       r".*out of memory"):
        alone.peaks_alone({"model": "m"}, ["cats"])


def test_the_benchmark_driver_measures_a_named_models_memory_alone(tiny_dir, tmp_path):
    from helpers import BENCHMARKS, benchmark_script

    driver = benchmark_script("run")
    results = driver.main([str(BENCHMARKS / "configs" / "decode_latency_cpu.toml"),
                           f"model={tiny_dir}", 'dtypes=["fp32"]', 'setups=["8+3"]',
                           'variants=["griffin"]', "repeats=1", "rank=4",
                           f"out={tmp_path / 'latency.json'}"])
    run = results["runs"]["fp32 8+3"]
    assert run["setup"]["memory"] == "alone"
    assert all(isinstance(row["peak_bytes"], int) and row["peak_bytes"] > 0
               and all(r["peak"] is None for r in row["runs"]) for row in run["variants"])


@pytest.mark.parametrize("memory, expected", [("off", 0), ("together", 1)])
def test_only_a_process_that_measures_peaks_maps_large_blocks_afresh(
        memory, expected, tiny_dir, tmp_path, monkeypatch):
    """glibc's 1 MiB threshold makes every large block fault its pages in again, which slows
    prefills: the timing process of `--memory off` (and of `alone`) must keep the default."""
    import caprese.cli.bench as bench
    from caprese.cli import main

    calls = []
    monkeypatch.setattr(bench, "free_large_blocks_at_once", lambda: calls.append(1))
    assert main(["bench", "--model", str(tiny_dir), "--variants", "full", "--prompt-len", "8",
                 "--gen-len", "3", "--repeats", "1", "--memory", memory,
                 "--out", str(tmp_path / "bench.json")]) == 0
    assert len(calls) == expected


@pytest.mark.parametrize("memory, compile, expected", [
    ("together", True, ["compiler", "baseline"]), ("together", False, ["baseline"]),
    ("off", True, [])])
def test_a_compiled_bench_measures_peaks_above_the_compilers_code(
        memory, compile, expected, tiny_dir, tmp_path, monkeypatch):
    """Like the model's code, the compiler's modules load before the baseline RSS is read,
    and only where peaks are measured (importing them costs a compile of a toy function)."""
    import caprese.cli.bench as bench
    from caprese.cli import main

    calls = []
    monkeypatch.setattr(bench, "import_compiler", lambda: calls.append("compiler"))
    settled = bench.settled_rss
    monkeypatch.setattr(bench, "settled_rss", lambda: calls.append("baseline") or settled())
    assert main(["bench", "--model", str(tiny_dir), "--variants", "full", "--prompt-len", "8",
                 "--gen-len", "3", "--repeats", "1", "--memory", memory,
                 *(["--compile"] if compile else []),
                 "--out", str(tmp_path / "bench.json")]) == 0
    assert calls == expected


@pytest.mark.parametrize("second_compiled", [False, True])
def test_a_compiled_variants_peak_is_measured_where_its_step_loads(tmp_path, monkeypatch,
                                                                   second_compiled):
    """A compile leaves the compiler's working memory in its process: a compiled variant's
    peak comes from a second child, which loads the step the first one compiled; the first
    child's peak is reported beside it, and a second child that compiled too is flagged."""
    import caprese.bench.alone as alone
    from caprese.bench.latency import format_table

    children = []

    def child(argv, **kwargs):
        first = len(children) % 2 == 0
        children.append(argv[argv.index("--variants") + 1])
        cache = ({"hits": 0, "misses": 2} if first or second_compiled
                 else {"hits": 2, "misses": 0})
        Path(argv[argv.index("--out") + 1]).write_text(json.dumps(
            {"setup": {"compile_cache": cache},
             "variants": [{"peak_bytes": (300 if first else 200) << 20}]}))

        class Done:
            returncode, stdout, stderr = 0, "", ""
        return Done()

    monkeypatch.setattr(alone.subprocess, "run", child)
    peaks = alone.peaks_alone({"model": "m", "compile": "inductor"}, ["full", "cats"])
    assert children == ["full", "full", "cats", "cats"]
    assert peaks["cats"] == {"peak_bytes": 200 << 20, "compiling_peak_bytes": 300 << 20,
                             "step_from_cache": not second_compiled}
    result = {"setup": {"prompt_len": 8, "gen_len": 3, "batch": 1, "dtype": "bf16",
                        "threads": 2, "device": "cpu", "machine": "a CPU", "repeats": 1,
                        "compiled": "inductor"},
              "bandwidth_gb_s": 30.0,
              "variants": [{"variant": "cats", "total": 1.0, "prepare": 0.0, "warmup": 9.0,
                            "ttft": 0.1, "ttnt": 0.01, "tokens_per_s": 100.0,
                            "bytes_per_token": 1e6, "floor_ttnt": 0.005,
                            "floor_fraction": 0.5, "allowed_bytes": 250 << 20}]}
    alone.record_peaks(result, peaks, "alone")
    row = format_table(result).splitlines()[-1]
    assert row.endswith("| 200 | 300" + (" (both compiled)" if second_compiled else "")
                        + " | 250 |")
    children.clear()
    assert set(alone.peaks_alone({"model": "m"}, ["cats"])["cats"]) == {"peak_bytes"}
    assert children == ["cats"]  # uncompiled: one child
