"""Benchmark building blocks: the lean decode loop and the LoRA baseline."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import prompt_ids, tiny_model
from helpers import (
    BENCHMARKS,
    RecordedPeer,
    attached_copy,
    benchmark_script,
    randomize_lowrank,
    set_fused,
)

import caprese
from caprese.bench.decode import greedy_decode
from caprese.bench.lora import attach_lora, matched_rank


@pytest.mark.parametrize("static_cache", [True, False])
@pytest.mark.parametrize("method", [None, "griffin", "cats", "nf4"])
def test_lean_decode_matches_generate(method, static_cache):
    base = tiny_model("qwen2")
    model = base if method is None else attached_copy(base, method=method, rank=8)
    if method:
        randomize_lowrank(model, scale=0.3)
    ids = prompt_ids(1, 10)
    run = greedy_decode(model, ids, 8, static_cache=static_cache)
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(run.tokens, expected[:, 10:])
    assert len(run.step_seconds) == 7 and run.ttft > 0


def test_lora_matches_the_paper_parameter_count():
    hidden, d_ff, rank = 4096, 14336, 256
    lora_rank = matched_rank(hidden, d_ff, rank)
    assert abs(3 * lora_rank * (hidden + d_ff) - 2 * hidden * rank) / (2 * hidden * rank) < 0.01


@pytest.mark.parametrize("method", ["griffin", "cats"])
def test_lora_fast_path_equals_reference(method):
    model = attach_lora(copy.deepcopy(tiny_model("llama")),
                        caprese.CapreseConfig(method=method, density=0.5), caprese_rank=8)
    ids = prompt_ids()
    with torch.no_grad():
        fast = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0,
                              output_logits=True, return_dict_in_generate=True)
        set_fused(model, False)
        ref = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
    torch.testing.assert_close(torch.stack(fast.logits), torch.stack(ref.logits),
                               rtol=1e-4, atol=1e-4)
    assert torch.equal(fast.sequences, ref.sequences)


def test_bench_runs_every_variant_and_reports_consistent_bytes():
    from caprese.bench.latency import format_table, run_bench

    model = tiny_model("llama")
    result = run_bench(model, ["full", "griffin", "caprese", "lora", "cats"], prompt_len=12,
                       gen_len=4, repeats=1, rank=4)
    rows = {r["variant"]: r for r in result["variants"]}
    assert not hasattr(model, "_caprese")  # every variant detached again
    assert rows["griffin"]["bytes_per_token"] < rows["full"]["bytes_per_token"]
    assert rows["caprese"]["bytes_per_token"] > rows["griffin"]["bytes_per_token"]
    assert rows["cats"]["bytes_per_token"] < rows["full"]["bytes_per_token"]
    # Caprese and its parameter-matched LoRA read (almost) the same number of bytes
    assert abs(rows["lora"]["bytes_per_token"] / rows["caprese"]["bytes_per_token"] - 1) < 0.05
    assert all(r["ttnt"] > 0 and r["floor_fraction"] > 0 for r in rows.values())
    assert all(r["ttft_faults"] >= 0 for r in rows.values())
    assert "| caprese |" in format_table(result) and "TTFT page faults" in format_table(result)


def test_minor_faults_counts_the_pages_a_fresh_block_touches():
    from caprese.bench.decode import minor_faults

    before = minor_faults()
    block = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB: glibc maps it fresh
    assert minor_faults() - before >= 16  # 16384 pages of 4 KiB, or 32 huge pages
    del block


def test_bench_reports_what_each_variant_holds_and_its_peak():
    from caprese.bench import memory
    from caprese.bench.latency import run_bench, storage_bytes

    model = tiny_model("llama")
    weights = storage_bytes(model.parameters())
    result = run_bench(model, ["full", "griffin", "caprese", "cats", "caprese-cats"],
                       prompt_len=12, gen_len=4, repeats=1, rank=4,
                       baseline_rss=memory.rss_bytes())
    rows = {r["variant"]: r for r in result["variants"]}
    text = model.config
    path = 2 * text.hidden_size * 4 * text.num_hidden_layers  # L and R per rank, fp32
    layout_rows = 2 * text.hidden_size * 4 * text.num_hidden_layers  # r rows of each, fp32
    assert result["weights_bytes"] == weights
    assert rows["full"]["adapter_bytes"] == rows["cats"]["adapter_bytes"] == 0
    assert rows["caprese"]["adapter_bytes"] == 4 * path // 2  # GRIFFIN: layers 0-1 of 4
    assert rows["caprese-cats"]["adapter_bytes"] == 4 * (path + layout_rows)
    assert rows["griffin"]["gathered_bytes"] > 0 and rows["cats"]["gathered_bytes"] == 0
    for row in rows.values():
        assert row["allowed_bytes"] >= weights + result["kv_cache_bytes"]
        assert isinstance(row["peak_bytes"], int)  # tiny: within the noise of Python itself
        assert row["prepare"] >= 0 and "ttft_added" in row


def test_the_4bit_variants_read_fewer_bytes_and_show_their_copy():
    from caprese.bench.latency import format_table, run_bench

    pytest.importorskip("bitsandbytes")
    model = tiny_model("llama").to(torch.bfloat16)
    result = run_bench(model, ["full", "nf4", "caprese-nf4"], prompt_len=12, gen_len=4,
                       repeats=1, rank=4)
    rows = {r["variant"]: r for r in result["variants"]}
    text = model.config
    mlp = 3 * text.hidden_size * text.intermediate_size * text.num_hidden_layers
    # bf16 MLP weights (2 bytes) become 4 bits plus a float32 absmax per block of 64
    assert rows["full"]["bytes_per_token"] - rows["nf4"]["bytes_per_token"] == \
        2 * mlp - (mlp // 2 + mlp // 64 * 4)
    assert rows["nf4"]["quantized_bytes"] == rows["caprese-nf4"]["quantized_bytes"] == \
        mlp // 2 + mlp // 64 * 4
    assert rows["full"]["quantized_bytes"] == 0
    assert rows["nf4"]["allowed_bytes"] >= result["weights_bytes"] + rows["nf4"]["quantized_bytes"]
    assert "nf4: its 4-bit copy of the MLPs" in format_table(result)


def test_gpu_table5_config_runs_with_tiny_shapes(tmp_path):
    """The Table-5 experiment through the one driver, with tiny shapes on the CPU."""
    driver = benchmark_script("run")
    out = tmp_path / "t5.json"
    results = driver.main([str(BENCHMARKS / "configs" / "gpu_table5.toml"), "tiny=true",
                           'setups=["16+4"]', "repeats=1", "rank=8", f"out={out}",
                           'compile=""'])  # its CUDA graphs need a GPU: eager here
    rows = {r["variant"]: r for r in results["runs"]["bf16 16+4"]["variants"]}
    assert set(rows) == {"full", "griffin", "lora", "caprese", "cats", "caprese-cats"}
    assert rows["griffin"]["bytes_per_token"] < rows["full"]["bytes_per_token"]
    assert out.is_file() and results["experiment"]["tiny"] is True


@pytest.mark.parametrize("interrupt_at", [15, 3])  # in the second timed round; in warm-up
def test_an_interrupted_bench_writes_the_runs_that_ended(tmp_path, monkeypatch, interrupt_at):
    """A time limit (`timeout -s INT`) or Ctrl-C keeps the medians of the runs that ended,
    marked cut off, and runs no further setup; interrupted before any timed run, it stops."""
    import caprese.bench.latency as latency

    calls = []

    def decode_until_interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == interrupt_at:
            raise KeyboardInterrupt
        return greedy_decode(*args, **kwargs)

    monkeypatch.setattr(latency, "greedy_decode", decode_until_interrupted)
    driver = benchmark_script("run")
    out = tmp_path / "t5.json"
    argv = [str(BENCHMARKS / "configs" / "gpu_table5.toml"), "tiny=true",
            'setups=["16+4", "24+4"]', "repeats=2", "rank=8", f"out={out}", 'compile=""']
    if interrupt_at <= 6:  # six variants warm up first: nothing timed yet
        with pytest.raises(KeyboardInterrupt):
            driver.main(argv)
        assert not out.exists()
        return
    results = driver.main(argv)
    assert list(results["runs"]) == ["bf16 16+4"]  # the second setup never started
    run = results["runs"]["bf16 16+4"]
    assert run["setup"]["cut_off"] is True
    timed = {r["variant"]: len(r["runs"]) for r in run["variants"]}
    assert timed == {"full": 2, "griffin": 2, "lora": 1, "caprese": 1, "cats": 1,
                     "caprese-cats": 1}
    assert "CUT OFF" in latency.format_table(run)
    assert out.is_file() and len(calls) == interrupt_at


def test_bench_kernel_variants_compare_against_full_on_the_same_path():
    from caprese.bench.latency import parse_variant, run_bench

    model = tiny_model("llama")
    names = ["full", "griffin", "full:k", "griffin:k", "lora:k", "caprese-cats:k"]
    result = run_bench(model, names, prompt_len=12, gen_len=4, repeats=1, rank=4)
    rows = {r["variant"]: r for r in result["variants"]}
    assert rows["griffin:k"]["bytes_per_token"] == rows["griffin"]["bytes_per_token"]
    for name in ("griffin", "griffin:k"):  # each cut is against its own path's full model
        base = "full:k" if name.endswith(":k") else "full"
        assert rows[name]["ttnt_cut"] == 1 - rows[name]["ttnt"] / rows[base]["ttnt"]
    assert not any("forward" in m.__dict__ for m in model.modules())  # kernels switched off
    assert parse_variant("cats:k") == ("cats", True)
    with pytest.raises(ValueError, match="unknown variant 'fast'"):
        parse_variant("fast")


@pytest.mark.parametrize("full", ["full", "full:k"])
def test_the_peer_is_compared_with_whichever_full_model_ran(full):
    from caprese.bench.latency import run_bench

    model = tiny_model("llama")
    eager = greedy_decode(model, torch.randint(0, 96, (1, 12),
                                               generator=torch.Generator().manual_seed(0)), 4)
    result = run_bench(model, [full, "cats:k"], prompt_len=12, gen_len=4, repeats=1, rank=4,
                       peer=RecordedPeer(eager.tokens[0].tolist()))
    rows = {r["variant"]: r for r in result["variants"]}
    peer = rows["llama.cpp"]
    assert peer["tokens_agree"] == 1.0
    assert peer["ttnt_cut"] == 1 - peer["ttnt"] / rows[full]["ttnt"]


def test_peer_ratios_pair_each_repeat_with_the_peers():
    script = benchmark_script("peer_ratios")
    row = lambda name, ttnts: {"variant": name, "runs": [{"ttnt": t} for t in ttnts]}  # noqa: E731
    results = {"runs": {"bf16 256+32": {"variants": [
        row("full:k", [0.2, 0.3, 0.1]), row("llama.cpp", [0.1, 0.3, 0.2])]}}}
    assert script.repeat_ratios(results) == {("bf16 256+32", "full:k"): [2.0, 1.0, 0.5]}
    del results["runs"]["bf16 256+32"]["variants"][1]
    with pytest.raises(SystemExit, match="no llama.cpp row"):
        script.repeat_ratios(results)


def test_path_cost_cuts_pair_each_round_with_the_full_models():
    from caprese.bench.latency import bytes_per_token

    script = benchmark_script("path_cost")
    model = tiny_model("llama")
    medians = {"full": [0.10, 0.20, 0.10], "griffin": [0.08, 0.20, 0.09],
               "caprese-griffin": [0.12, 0.10, 0.10]}
    cuts = script.full_cuts(model, "griffin", medians, 0.5, 8, 40)
    assert set(cuts) == {"griffin", "caprese-griffin"}
    # per-round ratios 0.8, 1.0, 0.9 and 1.2, 0.5, 1.0: medians of ratios, not of times
    assert cuts["griffin"]["time_cut"] == pytest.approx(0.1)
    assert cuts["caprese-griffin"]["time_cut"] == pytest.approx(0.0)
    full = bytes_per_token(model, "full", 0.5, 8, 40)
    for name, latency_name in (("griffin", "griffin"), ("caprese-griffin", "caprese")):
        bytes_cut = 1 - bytes_per_token(model, latency_name, 0.5, 8, 40) / full
        assert 0 < cuts[name]["bytes_cut"] == pytest.approx(bytes_cut)
        assert cuts[name]["cut_fraction"] == pytest.approx(cuts[name]["time_cut"] / bytes_cut)


def test_path_cost_measures_the_read_rate_after_each_timed_run():
    script = benchmark_script("path_cost")
    calls = iter(range(1, 100))
    medians, rates = script.paired_rounds({"a": lambda: [1.0, 3.0], "b": lambda: [2.0]},
                                          rounds=2, read_rate=lambda: next(calls))
    # round 0 (b, a) warms, is dropped and measures no rate; round 1 runs a, b; round 2 b, a
    assert medians == {"a": [2.0, 2.0], "b": [2.0, 2.0]}
    assert rates == {"a": [1, 4], "b": [2, 3]}
    assert script.paired_rounds({"a": lambda: [1.0]}, rounds=1)[1] == {}


def test_path_cost_floor_pairs_each_step_with_its_own_read_rate():
    from caprese.bench.latency import bytes_per_token

    script = benchmark_script("path_cost")
    model = tiny_model("llama")
    medians = {"full": [0.1, 0.2, 0.4], "griffin": [0.1, 0.1, 0.1]}
    rates = {"full": [4e9, 1e9, 1e9], "griffin": [1e9, 1e9, 1e9]}
    floor = script.floor_fractions(model, "griffin", medians, rates, 0.5, 8, 40)
    full = bytes_per_token(model, "full", 0.5, 8, 40)
    # per round: bytes / (rate x step) = full / 4e8, / 2e8, / 4e8; the median pairs them
    # (the median step at the median rate would give full / 2e8)
    assert floor["full"]["of_floor"] == pytest.approx(full / 4e8)
    assert floor["full"]["read_gb_s"] == pytest.approx(1.0)
    griffin = bytes_per_token(model, "griffin", 0.5, 8, 40)
    assert floor["griffin"]["of_floor"] == pytest.approx(griffin / 1e8)
