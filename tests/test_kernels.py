"""CPU decode kernels: equal to PyTorch's products, and wired into whole-model decoding."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils import cpp_extension

from caprese.kernels import cpu
from caprese.kernels.cpu import cpu_tag, machine, module
from caprese.kernels.cpu import linear as decode_linear
from caprese.kernels.cpu import rows_product as decode_rows_product
from caprese.phases import state_of, use_decode_kernels
from tests.conftest import prompt_ids, tiny_model
from tests.helpers import attached_copy, generate_with_logits, randomize_lowrank

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True, scope="module")
def two_threads():
    """The kernels split their rows between threads: test them on two, also where the test
    command gives each worker one (scripts/test.sh)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_the_kernels_build():
    assert module() is not None, "the CPU decode kernels did not build"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(13, 37), (64, 48), (130, 160)])  # tails of 8 rows / 16 cols
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_kernel_equals_torch(dtype, shape, with_bias, monkeypatch):
    monkeypatch.setattr(cpu, "FP32_KERNELS", True)  # as on an AMD CPU
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=generator).to(dtype)
    bias = torch.randn(shape[0], generator=generator).to(dtype) if with_bias else None
    x = torch.randn(1, 1, shape[1], generator=generator).to(dtype)
    got = decode_linear(x, weight, bias)
    reference = torch.nn.functional.linear(x.double(), weight.double(),
                                           None if bias is None else bias.double())
    assert got.shape == (1, 1, shape[0]) and got.dtype == dtype
    torch.testing.assert_close(got.double(), reference, rtol=TOLERANCE[dtype],
                               atol=TOLERANCE[dtype])


def test_linear_kernel_takes_x_in_float32_or_bf16():
    """With bf16 weights, a bf16 x is multiplied in bf16 pairs (AVX512_BF16) and a float32 x
    as it is, never rounded to bf16 (that would move the result by about 2^-9 relative);
    the result is float32 either way."""
    assert module() is not None
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(40, 96, generator=generator).to(torch.bfloat16)
    for x in (torch.randn(1, 96, generator=generator),
              torch.randn(1, 96, generator=generator).bfloat16()):
        got = torch.ops.caprese.linear(x, weight)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), x.double() @ weight.double().t(),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(300, 70), (5, 1), (600, 200), (1, 64), (513, 97)])
def test_rows_product_equals_torch(shape, dtype):
    """Tails of a cache line, of a SIMD vector and of four rows (fp32 on AVX2 adds four rows
    at a time), one thread's rows and two threads'."""
    generator = torch.Generator().manual_seed(1)
    rows = torch.randn(*shape, generator=generator).to(dtype)
    x = torch.randn(1, 1, shape[0], generator=generator).to(dtype)
    bias = torch.randn(shape[1], generator=generator).to(dtype)
    got = decode_rows_product(x, rows, bias)
    reference = x.double() @ rows.double() + bias.double()
    torch.testing.assert_close(got.double(), reference, rtol=TOLERANCE[dtype],
                               atol=TOLERANCE[dtype] * 10)


def masked_dense_cats(act, tau, up, down, x):
    """CATS' MLP the plain way, in float64: gate entries at or under tau zeroed, rows past
    d_ff (the low-rank path's) weighted 1."""
    extra = up.shape[0] - act.numel()
    weight = torch.cat([torch.where(act.abs() > tau, act, 0.0), torch.ones(extra)]).double()
    return ((up.double() @ x.double().reshape(-1)) * weight) @ down.double(), weight


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(d_ff=st.integers(1, 700), extra=st.integers(0, 9), dim=st.integers(1, 200),
       kept=st.floats(0, 1), bf16=st.booleans(), bf16_x=st.booleans(), seed=st.integers(0, 2**16))
def test_cats_kernel_equals_masked_dense(d_ff, extra, dim, kept, bf16, bf16_x, seed):
    """Any count of kept rows (none, all, fewer than a thread's rows ahead), any row length
    (tails of a cache line and of a SIMD vector), rows past d_ff always kept with weight 1."""
    assert module() is not None
    generator = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if bf16 else torch.float32
    up = torch.randn(d_ff + extra, dim, generator=generator).to(dtype)
    down = torch.randn(d_ff + extra, dim, generator=generator).to(dtype)
    act = torch.randn(d_ff, generator=generator)
    tau = act.abs().quantile(1 - kept).reshape(1) if kept < 1 else torch.tensor([-1.0])
    x = torch.randn(dim, generator=generator).to(torch.bfloat16 if bf16_x else torch.float32)
    got = torch.ops.caprese.cats_decode(act, tau, up, down, x)
    reference, weight = masked_dense_cats(act, tau, up, down, x)
    scale = (up.double().abs() @ x.double().abs() * weight.abs()) @ down.double().abs()
    assert got.dtype == torch.float32 and got.shape == (dim,)
    assert ((got.double() - reference).abs() <= 1e-5 * scale + 1e-6).all()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(1, 40), cols=st.integers(1, 300), quantile=st.floats(0, 1),
       bf16=st.booleans(), seed=st.integers(0, 2**16), ties=st.booleans())
def test_abs_order_statistic_equals_kthvalue(rows, cols, quantile, bf16, seed, ties):
    """CATS' threshold kernel: exact, over valid rows only, for any sign, zero or tie."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(rows, cols, generator=generator) * 4
    if ties:  # few distinct values, signed zeros among them
        values = values.round() * 0.0 if seed % 5 == 0 else values.round()
    values = values.to(torch.bfloat16 if bf16 else torch.float32)
    valid = torch.rand(rows, generator=generator) < 0.7
    valid[seed % rows] = True
    kept = values[valid].abs().flatten()
    rank = int(quantile * (kept.numel() - 1))
    got = cpu.abs_order_statistic(values, valid, rank)
    assert got.dtype == values.dtype
    assert got == kept.kthvalue(rank + 1).values


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 300), fp16=st.booleans(),
       seed=st.integers(0, 2**16))
def test_abs_histogram_equals_bincount(rows, cols, fp16, seed):
    """The counts CATS' streamed threshold adds up: those of torch.bincount over the 16-bit
    magnitudes of the valid rows (signed zeros and infinities included; a NaN lands above
    infinity in both, in the bin of its own payload where torch.abs makes it canonical)."""
    generator = torch.Generator().manual_seed(seed)
    values = (torch.randn(rows, cols, generator=generator) * 4).round(decimals=1)
    every = values.view(-1)[:: max(1, cols // 3)]
    every.copy_(torch.tensor([-0.0, float("inf"), float("-inf")])[torch.arange(len(every)) % 3])
    values = values.to(torch.float16 if fp16 else torch.bfloat16)
    valid = torch.rand(rows, generator=generator) < 0.7
    bits = values[valid].abs().flatten().view(torch.int16).long()
    assert torch.equal(cpu.abs_histogram(values, valid), torch.bincount(bits, minlength=1 << 15))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["normal", "ties", "misleading sample"])
def test_abs_order_statistic_on_prompts_large_enough_to_bracket(dtype, case):
    """Past 128K values the kernel brackets the rank from a strided sample; a sample that
    misleads (every sampled value an outlier) must still give the exact answer."""
    generator = torch.Generator().manual_seed(7)
    values = torch.randn(300, 1000, generator=generator)
    if case == "ties":
        values = values.round()
    valid = torch.ones(300, dtype=torch.bool)
    valid[::7] = False
    if case == "misleading sample":
        count = int(valid.sum()) * 1000
        flat = values[valid].flatten()
        flat[:: (count // 16384) | 1] = 1e6  # exactly the values the sample reads
        values[valid] = flat.reshape(-1, 1000)
    values = values.to(dtype)
    kept = values[valid].abs().flatten()
    for quantile in (0.0, 0.1, 0.5, 0.97, 1.0):
        rank = int(quantile * (kept.numel() - 1))
        assert cpu.abs_order_statistic(values, valid, rank) == kept.kthvalue(rank + 1).values


def test_kernels_decline_what_they_do_not_do():
    weight = torch.randn(8, 16).bfloat16()
    assert decode_linear(torch.randn(2, 1, 16), weight, None) is None  # two tokens
    assert decode_linear(torch.randn(1, 16), weight.t().contiguous().t(), None) is None
    assert decode_linear(torch.randn(1, 16), weight.half(), None) is None
    trained = weight.clone().requires_grad_()
    assert decode_linear(torch.randn(1, 16), trained, None) is None  # autograd stays in torch
    with torch.no_grad():
        assert decode_linear(torch.randn(1, 16), trained, None) is not None


def count_kernel_calls(patch) -> list[str]:
    calls: list[str] = []
    for name, label in (("linear", "decode_linear"), ("rows_product", "decode_rows_product")):
        original = getattr(cpu, name)
        patch.setattr(cpu, name, lambda *a, _n=label, _o=original: calls.append(_n) or _o(*a))
    return calls


@pytest.mark.parametrize("method", ["none", "griffin", "cats"])
def test_model_with_decode_kernels_generates_the_same(method):
    base = tiny_model("qwen2").to(torch.bfloat16)  # q/k/v biases: the kernel's bias
    model = base if method == "none" else attached_copy(base, method=method, density=0.5,
                                                        rank=8)
    if method != "none":
        randomize_lowrank(model, scale=0.3)
    ids = prompt_ids(1, 12)
    with torch.no_grad():
        ref_tokens, ref_logits = generate_with_logits(model, ids, steps=6)
    fast = use_decode_kernels(model)
    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        calls = count_kernel_calls(patch)
        tokens, logits = generate_with_logits(fast, ids, steps=6)
    torch.testing.assert_close(logits, ref_logits, rtol=5e-2, atol=5e-2)
    assert torch.equal(tokens, ref_tokens)
    if method == "griffin":  # the fused Caprese decode: up/gate and down by the kernels
        assert "decode_rows_product" in calls
    assert calls.count("decode_linear") >= 5 * 4 * 4  # q, k, v, o of every layer, each step
    use_decode_kernels(fast, enabled=False)
    assert not any("forward" in m.__dict__ for m in fast.modules()
                   if isinstance(m, torch.nn.Linear))
    if method != "none":  # the blocks are back on the default backend choice
        assert state_of(fast).decode.kernels == "auto"


def test_decode_kernels_match_torch_in_bf16():
    """bf16 Caprese(GRIFFIN) decode: the kernels round like PyTorch's bf16 products."""
    model = attached_copy(tiny_model("llama").to(torch.bfloat16), method="griffin",
                          density=0.5, rank=8)
    randomize_lowrank(model, scale=0.3)
    ids = prompt_ids(1, 10)
    with torch.no_grad():
        ref_tokens, ref_logits = generate_with_logits(model, ids, steps=5)
        use_decode_kernels(model)
        tokens, logits = generate_with_logits(model, ids, steps=5)
    torch.testing.assert_close(logits, ref_logits, rtol=5e-2, atol=5e-2)
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.skipif(not {"avx2", "fma"} <= set(cpu.cpu_flags()),
                    reason="builds x86 code: needs an x86 CPU with AVX2")
@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64"])  # AVX2 + FMA; no SIMD path at all
def test_kernels_built_for_other_cpus_compute_the_same(march):
    """The kernels' AVX2 and plain-loop paths, which an AVX-512 machine never runs natively,
    against float64 products: every operator, fp32 and bf16 weights, fp32 and bf16 x, shapes
    with line and vector tails, CATS with rows past d_ff, decode attention with more query
    heads per KV head than one pass takes."""
    ops = cpu.build_variant(cpu.source_files(), "caprese_" + march.replace("-", "_"), march)
    generator = torch.Generator().manual_seed(3)
    for dtype, x_dtype in [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                           (torch.bfloat16, torch.float32)]:
        # decode attention rounds scores and weights to bf16, as PyTorch's bf16 products do
        tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {
            "rtol": 2e-2, "atol": 2e-2}
        weight = torch.randn(131, 97, generator=generator).to(dtype)
        x = torch.randn(1, 97, generator=generator).to(x_dtype)
        reference = x.double() @ weight.double().t()
        torch.testing.assert_close(ops.linear(x, weight).double(), reference,
                                   rtol=1e-5, atol=1e-5)
        rows = torch.randn(600, 77, generator=generator).to(dtype)
        h = torch.randn(600, generator=generator)
        torch.testing.assert_close(ops.rows_product(h, rows).double(),
                                   h.double() @ rows.double(), rtol=1e-5, atol=1e-4)
        d_ff, extra = 700, 5
        up = torch.randn(d_ff + extra, 97, generator=generator).to(dtype)
        down = torch.randn(d_ff + extra, 97, generator=generator).to(dtype)
        act = torch.randn(d_ff, generator=generator)
        tau = act.abs().median().reshape(1)
        reference, _ = masked_dense_cats(act, tau, up, down, x)
        torch.testing.assert_close(ops.cats_decode(act, tau, up, down, x.reshape(-1)).double(),
                                   reference, rtol=1e-5, atol=1e-3)
        query = torch.randn(2, 1, 14, 40, generator=generator).to(dtype).transpose(1, 2)
        key, value = (torch.randn(2, 2, 9, 40, generator=generator).to(dtype) for _ in range(2))
        mask = torch.zeros(2, 9).masked_fill(torch.rand(2, 9, generator=generator) < 0.3, -1e38)
        mask[:, 0] = 0
        weights = torch.softmax((query.double().reshape(2, 2, 7, 40) @ key.double().transpose(
            -1, -2)) * 40 ** -0.5 + mask.double()[:, None, None], dim=-1)
        reference = (weights @ value.double()).reshape(2, 1, 14, 40)
        torch.testing.assert_close(ops.decode_attention(query, key, value, mask, 40 ** -0.5)
                                   .double(), reference, **tolerance)


def test_fp32_products_take_the_kernels_off_intel_cpus(tmp_path, monkeypatch):
    """fp32 single-token products go to the kernels on x86 CPUs not made by Intel (MKL runs
    generic code there) and stay with PyTorch on Intel's and on CPUs without a vendor id."""
    cpuinfo = {"GenuineIntel": False, "AuthenticAMD": True, "HygonGenuine": True}
    for vendor, expected in cpuinfo.items():
        (tmp_path / vendor).write_text(f"processor\t: 0\nvendor_id\t: {vendor}\nflags\t: avx2\n")
        assert cpu.fp32_kernels(str(tmp_path / vendor)) is expected
    (tmp_path / "arm").write_text("processor\t: 0\nFeatures\t: fp asimd\n")
    assert not cpu.fp32_kernels(str(tmp_path / "arm"))
    assert not cpu.fp32_kernels(str(tmp_path / "missing"))

    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(24, 40, generator=generator)
    rows = torch.randn(40, 24, generator=generator)
    x, h = torch.randn(1, 1, 40, generator=generator), torch.randn(1, 1, 40, generator=generator)
    monkeypatch.setattr(cpu, "FP32_KERNELS", False)
    assert decode_linear(x, weight, None) is None and decode_rows_product(h, rows, None) is None
    monkeypatch.setattr(cpu, "FP32_KERNELS", True)
    torch.testing.assert_close(decode_linear(x, weight, None), x @ weight.t())
    torch.testing.assert_close(decode_rows_product(h, rows, None), h @ rows)


def test_the_kernels_march_comes_from_the_environment(monkeypatch):
    """CAPRESE_KERNELS_MARCH picks the instruction set the kernels are built for, and the
    benchmarks' machine line says so."""
    monkeypatch.delenv(cpu.MARCH_ENV, raising=False)
    assert cpu.march() == "native" and "-march=native" in cpu._cflags(cpu.march())
    monkeypatch.setenv(cpu.MARCH_ENV, "x86-64-v3")
    assert cpu.march() == "x86-64-v3"
    flags = cpu._cflags(cpu.march())
    assert "-march=x86-64-v3" in flags and not any(f == "-march=native" for f in flags)
    assert "kernels -march=x86-64-v3" in machine()  # every bench table names it


def test_the_kernel_cache_is_per_cpu_kind(tmp_path):
    """-march=native code is cached under a name that changes with the CPU's flags."""
    avx2, avx512 = tmp_path / "avx2", tmp_path / "avx512"
    avx2.write_text("processor : 0\nflags : fpu sse2 avx avx2 fma\n")
    avx512.write_text("processor : 0\nflags : fpu sse2 avx avx2 fma avx512f avx512_bf16\n")
    assert cpu_tag(str(avx2)) == cpu_tag(str(avx2))
    assert cpu_tag(str(avx2)) != cpu_tag(str(avx512))
    assert cpu_tag(str(tmp_path / "missing"))  # no /proc: still a tag


def test_a_build_killed_midway_does_not_block_the_next(tmp_path, monkeypatch):
    """torch waits without end on the `lock` file a killed build leaves; the next build
    clears it and compiles."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = cpu.build_folder("caprese_probe")
    folder.mkdir(parents=True)
    (folder / "lock").touch()  # what a build killed by Ctrl-C or a time limit leaves
    seen = {}

    def load(name, build_directory, **_):
        seen["lock left"] = (Path(build_directory) / "lock").exists()
        seen["folder"] = Path(build_directory)
        return "module"

    monkeypatch.setattr(cpp_extension, "load", load)
    assert cpu._load("caprese_probe", Path("kernels.cpp"), ["-O3"]) == "module"
    assert seen == {"lock left": False, "folder": folder}


def test_a_live_build_keeps_its_lock(tmp_path, caplog):
    """While another process builds, its `lock` is not stale: the next build waits for it
    instead of clearing it."""
    folder = tmp_path / "module"
    builder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import time
            from pathlib import Path
            from caprese.kernels.cpu import exclusive_build
            folder = Path({str(folder)!r})
            with exclusive_build(folder):
                (folder / "lock").touch()
                print("building", flush=True)
                time.sleep(1.0)
                (folder / "lock").unlink()
        """)], stdout=subprocess.PIPE, text=True)
    assert builder.stdout.readline().strip() == "building"
    with caplog.at_level(logging.WARNING, logger=cpu.__name__):
        with cpu.exclusive_build(folder):  # entered early, it would delete the live lock
            assert not (folder / "lock").exists()
    assert builder.wait() == 0, "the builder's own lock was taken from it"
    assert "killed" not in caplog.text


@pytest.mark.parametrize("method", ["none", "griffin"])
def test_eval_decodes_with_the_kernels_when_asked(method, tmp_path, tiny_dir, monkeypatch):
    """`caprese eval --cpu-kernels`: the result records it, its single-token products run
    through the kernels, and its answers are those of PyTorch's products (bf16, tiny model)."""
    import json

    from caprese.cli import main

    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"problem": f"t{i} t{i + 1}", "answer": str(i)}) + "\n"
                            for i in range(4, 7)))
    argv = ["eval", "--model", str(tiny_dir), "--method", method, "--dtype", "bf16",
            "--task", str(task), "--batch-size", "1", "--max-new-tokens", "5"]
    assert main([*argv, "--out", str(tmp_path / "torch.json")]) == 0
    calls = count_kernel_calls(monkeypatch)
    assert main([*argv, "--cpu-kernels", "--out", str(tmp_path / "kernels.json")]) == 0
    assert calls.count("decode_linear") >= 3 * 4 * 4  # q, k, v, o of 4 layers, 4 steps, 3 problems
    plain, fast = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("torch", "kernels"))
    assert fast["variant"]["cpu_kernels"] is True and "cpu_kernels" not in plain["variant"]
    outputs = [[json.loads(line)["outputs"] for line in (tmp_path / f"{n}.jsonl").open()]
               for n in ("torch", "kernels")]
    assert outputs[0] == outputs[1]
    model = torch.nn.Linear(2, 2)
    from caprese.evaluate.variant import Variant, applied
    with pytest.raises(ValueError, match="drop --cpu-kernels"):
        with applied(model.to("meta"), Variant("m", cpu_kernels=True)):
            pass


def test_every_kernel_source_ships_with_the_package():
    """cpu_kernels.cpp includes the headers beside it; an installed package (not a checkout)
    carries only what pyproject's package data names."""
    import fnmatch
    import re
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    shipped = pyproject["tool"]["setuptools"]["package-data"]["caprese"]
    sources = cpu.source_files()
    included = set(re.findall(r'#include "([^"]+)"', "".join(sources.values())))
    assert included and included <= set(sources)  # every include is a file beside it
    for name in included | {cpu.SOURCE.name}:
        assert any(fnmatch.fnmatch(f"kernels/{name}", pattern) for pattern in shipped), name
