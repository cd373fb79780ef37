"""Compiled decoding (torch.compile, on the CPU here) against the eager decode it replaces."""

from __future__ import annotations

import gc
import weakref
from contextlib import nullcontext

import pytest
import torch
import torch._dynamo
from conftest import tiny_model
from helpers import RecordedPeer, randomize_lowrank, word_tokenizer
from transformers import AttentionInterface
from transformers.masking_utils import create_masks_for_generate

import caprese
from caprese import compiled, phases
from caprese.bench.decode import greedy_decode
from caprese.bench.latency import cudagraph_skips, format_table, run_bench
from caprese.evaluate.tasks import EvalTask
from caprese.generation import GenerationSettings, generate
from caprese.kernels import cpu
from caprese.kernels.attention import DECODE, decode_attention

# (method, density, rank): the full model, each method alone and with the low-rank path.
VARIANTS = [(None, 1.0, None), ("griffin", 0.5, None), ("griffin", 0.5, 8), ("cats", 0.5, None),
            ("cats", 0.5, 8)]
# bf16: max |compiled - eager| over the largest |eager logit|. inductor fuses and reorders
# bf16 roundings (2^-8 relative each); measured up to 1.2% on the tiny models of each family.
BF16_LOGITS_TOLERANCE = 0.03


@pytest.fixture(autouse=True)
def fresh_compiler():
    """Each test compiles from scratch, so that no test falls back to eager silently after
    dynamo's recompile limit, and `compiled_graphs` counts this test's graphs only."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def compiled_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def variant_model(method, density, rank, dtype=torch.float32, family="qwen2", **config):
    model = tiny_model(family, **{"max_position_embeddings": 512, **config}).to(dtype)
    if method is not None:
        caprese.attach(model, caprese.CapreseConfig(method=method, density=density, rank=rank))
        if rank:
            randomize_lowrank(model, scale=0.3)
    return model


@pytest.mark.parametrize("method, density, rank", VARIANTS)
@pytest.mark.parametrize("batch", [1, 2])
def test_compiled_decode_generates_the_eager_tokens(method, density, rank, batch):
    model = variant_model(method, density, rank)
    prompt = torch.randint(3, 96, (batch, 12), generator=torch.Generator().manual_seed(batch))
    eager = greedy_decode(model, prompt, 10)
    first = greedy_decode(model, prompt, 10, compile="inductor")
    again = greedy_decode(model, prompt, 10, compile="inductor")
    assert compiled_graphs() >= 1  # it did compile, as one graph (fullgraph=True)
    assert torch.equal(first.tokens, eager.tokens)
    assert torch.equal(again.tokens, eager.tokens)


@pytest.mark.parametrize("family, config", [("gemma2", {}), ("mistral", {"sliding_window": 8})])
def test_a_sliding_window_model_compiles_its_step_once(family, config):
    """Gemma 2 alternates windowed and full layers (a window of 16 here), a windowed Mistral
    has only windowed ones (8): the step compiles once, not once a token, and generates past
    the window what the eager step (transformers' own windowed cache) generates."""
    model = variant_model("griffin", 0.5, 8, family=family, **config)
    prompt = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(4))
    eager = greedy_decode(model, prompt, 16)
    assert torch.equal(greedy_decode(model, prompt, 16, compile="inductor").tokens,
                       eager.tokens)
    assert compiled_graphs() == 1


def test_more_compiled_variants_than_dynamos_limit_in_one_process():
    """Each attach compiles its own step, and dynamo counts the compiles of every model in
    the process against one limit: past it a fullgraph step fails. A bench of five variants
    at two prompt lengths compiles ten; here the limit is made 1 and three variants run."""
    prompt = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch._dynamo.config.patch(recompile_limit=1):
        for method, density, rank in VARIANTS[:3]:
            model = variant_model(method, density, rank)
            eager = greedy_decode(model, prompt, 4)
            assert torch.equal(greedy_decode(model, prompt, 4, compile="inductor").tokens,
                               eager.tokens)
    assert compiled_graphs() >= 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU "
                    "(scripts/gpu_checks.sh runs this on one)")
@pytest.mark.parametrize("method, density, rank", VARIANTS)
@pytest.mark.parametrize("backend", compiled.BACKENDS)
def test_cuda_graph_decode_generates_the_eager_tokens(method, density, rank, backend):
    """On a GPU: each step replayed as a CUDA graph (CATS by its Triton kernel) decodes what
    the eager step decodes, and a second prompt replays the same graph."""
    model = tiny_model("qwen2", max_position_embeddings=512).cuda()
    if method is not None:  # attached on the device, as a user does
        caprese.attach(model, caprese.CapreseConfig(method=method, density=density, rank=rank))
        if rank:
            randomize_lowrank(model, scale=0.3)
    generator = torch.Generator().manual_seed(3)
    for prompt in [torch.randint(3, 96, (1, 12), generator=generator).cuda() for _ in range(2)]:
        eager = greedy_decode(model, prompt, 10)
        assert torch.equal(greedy_decode(model, prompt, 10, compile=backend).tokens, eager.tokens)
    assert compiled_graphs() == 1
    assert cudagraph_skips() == 0  # replayed as CUDA graphs, not run eagerly behind our back


def test_the_cuda_graph_backend_copies_no_weight_and_writes_the_cache_in_place(monkeypatch):
    """The capture itself needs a GPU; what it is handed is checked here. torch's own
    "cudagraphs" backend handed it no static input at all: every weight was copied into the
    graph at each replay. Here the weights and the cache are static, and the cache is written
    inside the graph."""
    import torch._dynamo.backends.cudagraphs as dynamo_cudagraphs
    import torch._inductor.cudagraph_trees as trees
    from transformers.generation import CompileConfig

    captures = []

    def capture(run, inputs, static, **options):
        captures.append((inputs, set(static), set(options["mutated_input_idxs"])))
        return run

    monkeypatch.setattr(trees, "cudagraphify_impl", capture)
    monkeypatch.setattr(dynamo_cudagraphs, "get_device_index", lambda graph: 0)
    config = CompileConfig(fullgraph=True, dynamic=False, backend=compiled._cuda_graphs,
                           mode=None)
    monkeypatch.setattr(compiled, "compile_config", lambda device, backend: config)
    model = variant_model("griffin", 0.5, 8)
    prompt = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy_decode(model, prompt, 8, compile="cudagraphs").tokens,
                       greedy_decode(model, prompt, 8).tokens)
    [(inputs, static, written)] = captures
    weights = {id(p) for p in model.parameters()}
    assert {i for i, x in enumerate(inputs) if id(x) in weights} <= static  # none copied
    cache_writes = 2 * model.config.num_hidden_layers  # keys and values, one step each
    assert len(written) >= cache_writes and written <= static


def test_a_second_prompt_reuses_the_compiled_step():
    model = variant_model("griffin", 0.5, 8)
    caprese.prepare_decode(model, batch=1)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 96, (1, 12), generator=generator) for _ in range(3)]
    greedy_decode(model, prompts[0], 6, compile="inductor")
    graphs = compiled_graphs()
    for prompt in prompts[1:]:  # new selections, written into the same gathered matrices
        assert torch.equal(greedy_decode(model, prompt, 6, compile="inductor").tokens,
                           greedy_decode(model, prompt, 6).tokens)
    assert compiled_graphs() == graphs


def test_one_static_cache_per_shape_is_reused_reset(monkeypatch):
    """CUDA graphs replay on the addresses they recorded: on a GPU each batch of a long
    evaluation must get the same cache back, emptied, not a new one."""
    model = variant_model(None, 1.0, None)
    assert compiled.static_cache(model, 20, 1) is not compiled.static_cache(model, 20, 1)
    monkeypatch.setattr(compiled, "replays_cuda_graphs", lambda device: True)  # as on a GPU
    cache = compiled.static_cache(model, 20, batch=1)
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True,
              **{phases.cache_argument(model): cache})
    assert cache.get_seq_length() == 3
    again = compiled.static_cache(model, 30, batch=1)  # the same bucket of 256 positions
    assert again is cache and again.get_seq_length() == 0
    assert all(not layer.keys.any() for layer in again.layers)
    assert compiled.static_cache(model, 20, batch=2) is not cache  # another shape: a new one


@pytest.mark.parametrize("method, density, rank", [(None, 1.0, None), ("cats", 0.5, 8)])
def test_the_run_that_compiles_frees_its_cache_when_it_ends(monkeypatch, method, density,
                                                            rank):
    """Dynamo's tracing objects hold the traced call's arguments in reference cycles: the
    compiling run's KV cache must not outlive the run (beside the next run's own) until
    Python's cycle collector happens to run."""
    model = variant_model(method, density, rank)
    caches = []

    def recorded(*args, **kwargs):
        cache = made(*args, **kwargs)
        caches.append(weakref.ref(cache))
        return cache

    made = compiled.static_cache
    monkeypatch.setattr(compiled, "static_cache", recorded)
    prompt = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(0))
    gc.collect()
    gc.disable()  # only what the decode itself frees
    try:
        greedy_decode(model, prompt, 6, compile="inductor")
        alive = [cache() is not None for cache in caches]
    finally:
        gc.enable()
    assert compiled_graphs() >= 1 and alive == [False]


@pytest.mark.parametrize("method, density, rank", [(None, 1.0, None), ("griffin", 0.5, 8)])
def test_a_compile_keeps_nothing_of_its_trace(method, density, rank):
    """Dynamo keeps each compiled step for the life of the process; the trace it was compiled
    from (every FX node of the step, with its fake tensors and stack traces) must not stay
    alive with it."""
    from torch.fx import Node

    def nodes() -> set[int]:
        gc.collect()
        return {id(item) for item in gc.get_objects() if type(item) is Node}

    model = variant_model(method, density, rank)
    prompt = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(0))
    before = nodes()
    greedy_decode(model, prompt, 6, compile="inductor")
    assert compiled_graphs() >= 1
    assert nodes() <= before


def forced_logits(model, prompt, continuation, compile):
    """Logits of each decode step, teacher-forced on `continuation` (the same inputs for the
    eager and the compiled step, whatever either would have picked)."""
    name = phases.cache_argument(model)
    cache = compiled.static_cache(model, prompt.shape[1] + continuation.shape[1],
                                  prompt.shape[0])
    with torch.no_grad():
        model(input_ids=prompt, use_cache=True, **{name: cache})
        step = compiled.compiled_forward(model) if compile else model
        logits = []
        for offset in range(continuation.shape[1]):
            position = torch.full((prompt.shape[0], 1), prompt.shape[1] + offset)
            out = step(input_ids=continuation[:, offset:offset + 1], position_ids=position,
                       use_cache=True, logits_to_keep=1, **{name: cache})
            logits.append(out.logits[:, -1].float())
    return torch.stack(logits, dim=1)


@pytest.mark.parametrize("method, density, rank", [(None, 1.0, None), ("griffin", 0.5, 8),
                                                    ("cats", 0.5, 8)])
@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_bf16_compiled_logits_are_within_the_stated_tolerance(method, density, rank, family):
    model = variant_model(method, density, rank, dtype=torch.bfloat16, family=family)
    generator = torch.Generator().manual_seed(3)
    prompt = torch.randint(3, 96, (1, 12), generator=generator)
    continuation = torch.randint(3, 96, (1, 6), generator=generator)
    eager = forced_logits(model, prompt, continuation, compile=False)
    compiled_ = forced_logits(model, prompt, continuation, compile="inductor")
    assert compiled_graphs() >= 1
    assert (compiled_ - eager).abs().max() <= BF16_LOGITS_TOLERANCE * eager.abs().max()


@pytest.mark.parametrize("family, method", [("llama", "cats"), ("gemma3_text", "griffin")])
def test_generate_with_compile_gives_the_eager_texts(family, method):
    """Left-padded batches of different widths share one compiled step (the static cache is
    rounded up to compiled.CACHE_BUCKET) and give what eager generation gives. With a static
    cache, generate hands the forward 4D masks built for SDPA (Gemma 3: a dict, one per kind
    of layer), which the prefill's phase hook reads and the compiled CPU step, attending
    eagerly, takes as additive masks."""
    model = variant_model(method, 0.5, 8, family=family)
    tokenizer = word_tokenizer()
    prompts = [" ".join(f"t{4 + (7 * i + j) % 90}" for j in range(5 + 3 * i)) for i in range(5)]
    settings = GenerationSettings(max_new_tokens=8, batch_size=2)
    eager = generate(model, tokenizer, prompts, settings, progress=False)
    compiled_run = generate(model, tokenizer, prompts, GenerationSettings(
        max_new_tokens=8, batch_size=2, compile="inductor"), progress=False)
    assert compiled_graphs() >= 1
    assert [[c.ids for c in row] for row in compiled_run] == [[c.ids for c in row]
                                                              for row in eager]


def test_the_bench_compiles_in_the_warm_up_and_refuses_reselection():
    model = variant_model(None, 1.0, None, dtype=torch.bfloat16)
    result = run_bench(model, ["full", "lora", "caprese-cats:k"], prompt_len=16, gen_len=4,
                       repeats=1, rank=8, compile="inductor")
    assert result["setup"]["compiled"] and compiled_graphs() >= 1
    for row in result["variants"]:
        assert row["warmup"] > row["total"]  # the warm-up compiled; the timed run did not
    cache = result["setup"]["compile_cache"]
    assert cache["hits"] + cache["misses"] >= 1
    torch._dynamo.reset()  # as a new process: the step comes from torch.compile's disk cache
    again = run_bench(model, ["caprese-cats:k"], prompt_len=16, gen_len=4, repeats=1, rank=8,
                      compile="inductor")
    assert again["setup"]["compile_cache"]["hits"] >= 1
    assert again["setup"]["compile_cache"]["misses"] == 0
    with pytest.raises(ValueError, match="reselects"):
        run_bench(model, ["griffin@4"], prompt_len=16, gen_len=4, repeats=1, compile="inductor")


def test_a_compiled_bench_times_the_peer_warm_up_too():
    """The peer runs uncompiled beside compiled variants; its row still fills every column
    of the compiled table (its warm-up is its first run)."""
    model = variant_model(None, 1.0, None)
    prompt = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(0))
    eager = greedy_decode(model, prompt, 4)
    result = run_bench(model, ["full"], prompt_len=12, gen_len=4, repeats=1,
                       compile="inductor", peer=RecordedPeer(eager.tokens[0].tolist()))
    peer = next(r for r in result["variants"] if r["variant"] == "llama.cpp")
    assert peer["warmup"] == pytest.approx(0.5 + 0.01 * 3)
    assert "| llama.cpp | " in format_table(result)


def kernel_calls(run) -> dict[str, int]:
    """How often each caprese operator ran during run()."""
    with torch.profiler.profile() as profiler:
        run()
    calls: dict[str, int] = {}
    for event in profiler.events():
        if event.name.startswith("caprese::"):
            calls[event.name] = calls.get(event.name, 0) + 1
    return calls


@pytest.mark.parametrize("method, rank, dtype", [
    (None, None, torch.bfloat16), ("griffin", 8, torch.bfloat16), ("cats", 8, torch.bfloat16),
    (None, None, torch.float32), ("griffin", 8, torch.float32)])
def test_a_compiled_step_keeps_the_cpu_kernels(method, rank, dtype, monkeypatch):
    """The kernels are torch operators: the compiled step calls them in one graph, and
    generates what the eager step with the same kernels generates (fp32 products as on a CPU
    not made by Intel)."""
    monkeypatch.setattr(cpu, "FP32_KERNELS", True)
    model = variant_model(method, 0.5, rank, dtype=dtype)
    phases.use_decode_kernels(model)
    prompt = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(5))
    eager = greedy_decode(model, prompt, 8)
    greedy_decode(model, prompt, 8, compile="inductor")  # compiles
    calls = kernel_calls(lambda: greedy_decode(model, prompt, 8, compile="inductor"))
    assert compiled_graphs() == 1
    assert torch.equal(greedy_decode(model, prompt, 8, compile="inductor").tokens, eager.tokens)
    decode_steps, layers = 7, model.config.num_hidden_layers
    products = calls.get("caprese::linear", 0) + calls.get("caprese::rows_product", 0)
    assert products >= decode_steps * (layers * 4 + 1)  # q, k, v, o of each layer, LM head
    if method == "cats":
        assert calls.get("caprese::cats_decode", 0) == decode_steps * layers


def attention_ops(run) -> list[str]:
    """The SDPA operators and caprese's decode attention kernels that ran during run()."""
    with torch.profiler.profile() as profiler:
        run()
    return [e.name for e in profiler.events()
            if "scaled_dot_product" in e.name or e.name == "caprese::decode_attention"]


@pytest.mark.parametrize("family", ["qwen2", "gemma3_text"])
def test_a_cpu_compiled_step_attends_by_the_decode_kernel_while_prefill_keeps_sdpa(
        family, monkeypatch):
    traced = []

    def grouped(*args, **kwargs):  # runs while dynamo traces the step, once per layer
        traced.append(1)
        return decode_attention(*args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, DECODE, grouped)
    model = variant_model("griffin", 0.5, 8, family=family)
    assert model.config._attn_implementation == "sdpa"
    name = phases.cache_argument(model)
    prompt = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(0))
    cache = compiled.static_cache(model, 16, 1)
    with torch.no_grad():
        assert attention_ops(lambda: model(input_ids=prompt, use_cache=True, **{name: cache}))
        step = compiled.compiled_forward(model)

        def decode(position: int):
            return step(input_ids=prompt[:, :1], position_ids=torch.tensor([[position]]),
                        use_cache=True, logits_to_keep=1, **{name: cache})

        decode(12)  # compiles
        assert len(traced) == model.config.num_hidden_layers
        kernels = attention_ops(lambda: decode(13))  # each call shows as two events or one
        assert set(kernels) == {"caprese::decode_attention"}
        assert len(kernels) >= model.config.num_hidden_layers
        assert model.config._attn_implementation == "sdpa"  # restored after each step
        assert model.get_compiled_call(compiled.compile_config("cpu")) is step  # generate's
        # A step compiled with inductor's C++ wrapper may call PyTorch's own operators past
        # the profiler, so SDPA is seen where it is traced, and the kernel must be gone.
        sdpa = AttentionInterface._global_mapping["sdpa"]
        traced_sdpa = []
        monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa",
                            lambda *args, **kwargs: traced_sdpa.append(1) or sdpa(*args, **kwargs))
        sdpa_step = compiled.compiled_forward(model, attention="sdpa")
        sdpa_step(input_ids=prompt[:, :1], position_ids=torch.tensor([[14]]), use_cache=True,
                  logits_to_keep=1, **{name: cache})
        assert len(traced_sdpa) == model.config.num_hidden_layers
        assert "caprese::decode_attention" not in attention_ops(lambda: sdpa_step(
            input_ids=prompt[:, :1], position_ids=torch.tensor([[15]]), use_cache=True,
            logits_to_keep=1, **{name: cache}))


def test_compile_backends_are_checked():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        compiled.compile_config("cpu", "cudagraphs")
    with pytest.raises(ValueError, match="unknown compile backend"):
        compiled.compile_config("cpu", "xla")
    with pytest.raises(ValueError, match="unknown compile backend"):
        EvalTask("gsm8k", compile="fast")


@pytest.mark.parametrize("flags, message", [
    (["bench", "--compile", "--variants", "full,griffin@4:k"], "reselects"),
    (["bench", "--compile", "xla"], "invalid choice"),
    (["eval", "--task", "gsm8k", "--out", "OUT", "--compile", "xla"], "invalid choice"),
])
def test_the_cli_refuses_compile_options_it_cannot_honour(tiny_dir, tmp_path, capsys, flags,
                                                          message):
    from caprese.cli import main

    flags = [str(tmp_path / "r.json") if flag == "OUT" else flag for flag in flags]
    with pytest.raises(SystemExit) if message == "invalid choice" else nullcontext():
        assert main([*flags, "--model", str(tiny_dir)]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_prompt_padding_is_read_from_generates_4d_masks(family, attention):
    """With a static cache, transformers' generate hands the forward the 4D masks it builds
    (boolean for SDPA, additive for eager, one per kind of layer for Gemma 3), not the 2D
    one: the prompt's padding found in them is the 2D mask's, in a prompt's first forward
    and in a later piece of it (after cached tokens)."""
    model = variant_model("griffin", 0.5, None, family=family)
    model.set_attn_implementation(attention)
    name = phases.cache_argument(model)
    padding = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
    ids = torch.randint(3, 96, padding.shape, generator=torch.Generator().manual_seed(0))
    cache = compiled.static_cache(model, 12, 3)
    with torch.no_grad():
        for past, width in ((0, 4), (4, 2)):  # the prompt in two forwards
            seen = padding[:, : past + width]
            positions = phases.mask_positions(seen)[:, past:]
            masks = create_masks_for_generate(
                config=model.config, inputs_embeds=torch.empty(3, width, 0), attention_mask=seen,
                cache=cache, position_ids=positions)
            with phases.forced_phase(model, phases.Phase.PREFILL):
                model(input_ids=ids[:, past : past + width], attention_mask=masks,
                      position_ids=positions, use_cache=True, **{name: cache})
            assert torch.equal(phases.state_of(model).valid, padding[:, past : past + width] == 1)
