"""Compiled decoding: one static-shape decode step captured by torch.compile (CUDA graphs on
GPUs), the way gpt-fast decodes.

A decode step of a 1.5B model at batch 1 is a few hundred small kernels; on a GPU their
launches cost more than their work, and capturing the whole step once removes that cost.
Capture needs shapes that stay the same from step to step, and caprese's decode has them:
- the KV cache is transformers' StaticCache, allocated at its full length before the prompt
  (its sliding-window layers made full ones, the window left to the mask: _new_static_cache);
- GRIFFIN's gathered matrices keep k rows per sample and are written in place by every
  prompt (`prepare_decode`), CATS' weights are the shared layout: the same tensors, at the
  same addresses, in every step;
- CATS' sparse product runs as its Triton kernel on GPUs and as its C++ kernel on CPUs: the
  CPU kernels are torch operators (torch.ops.caprese.*), nodes of the graph like any other.
Prefill stays eager: its selection depends on the prompt, and it runs once per prompt. The
phase hook knows a forward being compiled as a decode step, so the compiled graph never reads
the cache's length.

On a CPU the compiled step attends with caprese's grouped-query attention
(caprese.kernels.attention: transformers' eager attention without its copies of the KV
heads; inductor fuses its mask and softmax into the step), while prefill keeps the model's
own (SDPA: eager would hold every score of a long prompt). PyTorch's CPU SDPA kernel is
built for many queries; with one query per step a 1.5B model's compiled step took 1.23x the
eager-attention step's time at 256 cached tokens and 1.54x at 2048 in bf16 on a Zen 4 EPYC
(fp32: 1.04x, 1.19x), and eager attention's copies cost a further 17% at 2048
(benchmarks/decode_attention.py, docs/BENCHMARKS.md). GPUs keep SDPA.

Compilation happens at the first compiled decode step of each kind of variant: time it
apart, as `caprese bench --compile` does in its warm-up run. transformers keeps the compiled
call on the model; an attach that changes what the step reads (another method, another
batch, another cache length) compiles again. Dynamo counts these compiles per code object,
for every model in the process together, and past its limit a one-graph step fails instead
of running: caprese raises that limit to RECOMPILE_LIMIT (a bench of five variants at two
prompt lengths compiles ten steps; dynamo's default is 8).
"""

from __future__ import annotations

import gc

import torch
from torch import nn
from transformers import StaticCache
from transformers.cache_utils import StaticLayer
from transformers.generation import CompileConfig

from caprese.block import CapreseBlock
from caprese.kernels import cpu
from caprese.kernels.attention import DECODE, GROUPED

# The static cache's length is rounded up to a multiple of this, so that batches of prompts
# of different lengths share one compiled step instead of compiling one each.
CACHE_BUCKET = 256


# Compiles of decode steps allowed per process (dynamo's recompile limit, raised to this).
RECOMPILE_LIMIT = 64

# The attention a compiled decode step uses, per device type (absent: the model's own).
DECODE_ATTENTION = {"cpu": DECODE}
# Implementations that add their mask to the scores (generate hands SDPA's boolean ones).
ADDITIVE_MASKS = ("eager", GROUPED, DECODE)

# Inductor's settings for CPU decode steps. cpp_wrapper: the step's few hundred calls (its
# generated kernels, caprese's products, buffer allocations) run from generated C++ instead of
# a generated Python function. A step streams the weights through every CPU cache, so the
# Python interpreter ran each call with its own code and objects evicted. Compared side by
# side by benchmarks/wrapper_ab.py (docs/BENCHMARKS.md). Built apart from the kernels, the
# wrapper compiles at -O1 instead of -O3 within one file with them: on a 2-core machine a
# new step of the 1.5B model then compiled in about a minute instead of two.
CPU_OPTIONS = {"cpp_wrapper": True, "cpp_wrapper_build_separate": True}


class InductorKeepingNoTrace:
    """torch.compile backend: inductor with `options`, and nothing of the trace kept after.

    AOTAutograd's compiled function keeps three bound methods of the graph module Dynamo
    traced (zero_grad, named_parameters, named_buffers: "for convenience"), and Dynamo keeps
    the compiled function for the life of the process, as a global of the traced function's
    module. Through them the whole trace stayed alive after every compile: each FX node of
    the step with its fake tensors and stack traces (on a tiny two-layer model 519 nodes and
    466 fake tensors; tests/test_compiled.py). Nothing calls those methods on a decode step,
    so they are dropped and the trace goes with the compile."""

    def __init__(self, options: dict) -> None:
        self.options = options

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list) -> object:
        from torch._inductor.compile_fx import compile_fx

        step = compile_fx(graph, example_inputs, config_patches=self.options)
        wrapper = step
        while wrapper is not None:
            for name in ("zero_grad", "named_parameters", "named_buffers"):
                getattr(wrapper, "__dict__", {}).pop(name, None)
            wrapper = getattr(wrapper, "__wrapped__", None)
        return step


CPU_BACKEND = InductorKeepingNoTrace(CPU_OPTIONS)  # one object: transformers compares configs

# "inductor": generated kernels (fused elementwise ops), replayed as CUDA graphs on GPUs.
# "cudagraphs": PyTorch's own kernels replayed as one CUDA graph (GPUs only): no code
# generation, so it compiles in the time of one trace, where inductor takes minutes for a
# 48-layer model.
BACKENDS = ("inductor", "cudagraphs")


def _cuda_graphs(graph: torch.fx.GraphModule, example_inputs: list) -> object:
    """torch.compile backend: the traced step's own kernels, replayed as a CUDA graph.

    torch's built-in "cudagraphs" backend treats only lifted parameters as fixed inputs;
    when dynamo inlines modules (its default) that is none of them, so each replay copied
    every weight into the graph's own memory, and the KV cache's writes were copied back
    whole after it (8.9 s against 5.0 s per Table-5 run on an H200). This backend takes
    the static inputs inductor takes (parameters, buffers, and tensors marked static, as
    transformers' StaticCache marks its keys and values): no weight is copied into the graph
    at each replay, and the cache is written in place inside it."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.backends.cudagraphs import (
        find_input_mutations,
        get_device_index,
        get_stack_traces,
    )
    from torch._dynamo.backends.debugging import boxed_nop
    from torch._inductor.compile_fx import get_static_input_idxs
    from torch._inductor.cudagraph_trees import cudagraphify_impl
    from torch._inductor.cudagraph_utils import get_placeholder_info
    from torch._inductor.utils import num_fw_fixed_arguments

    def inference(aot_graph: torch.fx.GraphModule, aot_inputs: list) -> object:
        fixed = num_fw_fixed_arguments(len(example_inputs), len(aot_inputs))
        replay = cudagraphify_impl(
            boxed_nop(aot_graph, aot_inputs), aot_inputs, get_static_input_idxs(fixed),
            device_index=get_device_index(aot_graph), is_backward=False, is_inference=True,
            stack_traces=get_stack_traces(aot_graph),
            placeholders=get_placeholder_info(aot_graph.graph),
            mutated_input_idxs=find_input_mutations(aot_graph.graph))
        replay._boxed_call = True
        return replay

    def training(aot_graph: torch.fx.GraphModule, aot_inputs: list) -> object:
        raise RuntimeError("compiled decoding is for inference: run it under torch.no_grad()")

    # the cache is written inside the graph, not copied back whole after each replay
    return aot_autograd(fw_compiler=training, inference_compiler=inference,
                        keep_inference_input_mutations=True)(graph, example_inputs)


def compile_config(device: torch.device | str, backend: str = "inductor") -> CompileConfig:
    """torch.compile's settings for decode steps: static shapes, and one graph (a graph break
    would split the capture and hide a slow Python path). On a CPU this also loads caprese's
    kernels, which a step being traced cannot build."""
    device = torch.device(device)
    if backend not in BACKENDS:
        raise ValueError(f"unknown compile backend {backend!r}; choose one of "
                         f"{', '.join(BACKENDS)}")
    if backend == "cudagraphs" and device.type != "cuda":
        raise ValueError(f"the cudagraphs compile backend needs a CUDA device, not "
                         f"{device.type}: use inductor")
    if backend == "cudagraphs":
        config = CompileConfig(fullgraph=True, dynamic=False, backend=_cuda_graphs, mode=None)
    elif device.type == "cuda":
        config = CompileConfig(fullgraph=True, dynamic=False, mode="reduce-overhead")
    else:
        config = CompileConfig(fullgraph=True, dynamic=False, backend=CPU_BACKEND, mode=None)
    if device.type == "cpu":
        cpu.module()
    dynamo = torch._dynamo.config
    dynamo.recompile_limit = max(dynamo.recompile_limit, RECOMPILE_LIMIT)
    config._compile_all_devices = True  # transformers' generate compiles only on GPUs unless told
    return config


def import_compiler() -> None:
    """Import the code torch.compile runs, by compiling a trivial function: a process that
    measures memory from here on counts what a model's own step compiles and holds, not
    the compiler's modules (tens of MiB beside transformers' model code, part of them
    imported only by a first compile)."""
    torch.compile(lambda x: (x * 2).sin().sum(), fullgraph=True)(torch.ones(8))


def compiled_forward(model: nn.Module, backend: str = "inductor",
                     attention: str | None = None):
    """The model's forward compiled for decode steps. transformers caches the compiled call
    on the model, and its generate() takes it from there: the cached call becomes a
    _DecodeStep, which on a device with a DECODE_ATTENTION (or given `attention`) runs the
    compiled forward with that attention implementation and restores the model's own after
    each step."""
    device = next(model.parameters()).device
    _mark_decode_weights_static(model)
    call = model.get_compiled_call(compile_config(device, backend))
    if isinstance(call, _DecodeStep):  # wrapped by an earlier call
        call = call.compiled
    step = _DecodeStep(model, call, _step_attention(model, attention))
    model._compiled_call = step
    return step


def compiled_step_with(model: nn.Module, options: dict) -> _DecodeStep:
    """A CPU decode step compiled by inductor with `options` instead of CPU_OPTIONS, held
    apart from the step generate takes from the model: a benchmark alternates two of them on
    one model and one cache."""
    compile_config("cpu")  # loads the kernels, raises the recompile limit
    _mark_decode_weights_static(model)
    call = torch.compile(model.__call__, fullgraph=True, dynamic=False,
                         backend=InductorKeepingNoTrace(options))
    return _DecodeStep(model, call, _step_attention(model, None))


def _step_attention(model: nn.Module, attention: str | None) -> str | None:
    """The attention a decode step runs with, None where it is the model's own."""
    device = next(model.parameters()).device
    attention = attention or DECODE_ATTENTION.get(device.type)
    return None if attention == model.config._attn_implementation else attention


class _DecodeStep:
    """A compiled forward, run under another attention implementation where one is given.

    Dynamo guards on the config's implementation, so the step compiles once, with this one.
    transformers' generate builds a static cache's masks before the forward, for the model's
    own implementation: SDPA's are boolean (True: attend), and eager attention adds its mask
    to the scores, so those become 0 / the dtype's lowest value, as transformers' eager masks.

    A step that compiles leaves Dynamo's tracing objects behind in reference cycles, and they
    hold what the traced call took, the KV cache among them, until Python's cycle collector
    runs: the compiling run's cache then outlived its run beside the next run's own (+63 MiB
    at 2048 tokens of the 1.5B model, over the bench's memory allowance). So a step that
    compiled collects them at once; the other steps cost nothing more."""

    def __init__(self, model: nn.Module, compiled: object, attention: str | None) -> None:
        from torch._dynamo.utils import counters  # imported here: a heavy module

        self.model, self.compiled, self.attention = model, compiled, attention
        self.counters = counters  # ["stats"]["unique_graphs"]: graphs compiled so far

    def __call__(self, *args, **kwargs):
        graphs = self.counters["stats"]["unique_graphs"]
        try:
            if self.attention is None:
                return self.compiled(*args, **kwargs)
            return self._with_attention(*args, **kwargs)
        finally:
            if self.counters["stats"]["unique_graphs"] != graphs:
                gc.collect()

    def _with_attention(self, *args, **kwargs):
        configs = list(_with_sub_configs(self.model.config))  # parents before their parts
        own = [config._attn_implementation for config in configs]
        configs[0]._attn_implementation = self.attention  # the setter sets the sub-configs too
        if self.attention in ADDITIVE_MASKS and "attention_mask" in kwargs:
            kwargs["attention_mask"] = _additive(kwargs["attention_mask"], self.model.dtype)
        try:
            return self.compiled(*args, **kwargs)
        finally:
            for config, implementation in zip(configs, own, strict=True):
                config._attn_implementation = implementation


def _additive(mask, dtype: torch.dtype):
    """A boolean mask (or a dict of them: one per kind of layer) as eager attention's."""
    if isinstance(mask, dict):
        return {kind: _additive(part, dtype) for kind, part in mask.items()}
    if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
            ~mask, torch.finfo(dtype).min)
    return mask


def _with_sub_configs(config):
    yield config
    for key in config.sub_configs:
        if getattr(config, key, None) is not None:
            yield from _with_sub_configs(getattr(config, key))


def static_cache(model: nn.Module, length: int, batch: int) -> StaticCache:
    """A KV cache of `batch` rows and at least `length` positions (rounded up to
    CACHE_BUCKET). On a GPU the model keeps the last one and hands it out again, reset, for
    the same shape: a CUDA graph replays only on the addresses it was recorded with, so a new
    cache per batch would record the step again, and past torch's limit of such
    re-recordings (128, a long evaluation's batches) the step would run without CUDA graphs.
    A CPU replays no graph, and gets its memory back when the batch ends."""
    parameter = next(model.parameters())
    shape = (batch, -(-length // CACHE_BUCKET) * CACHE_BUCKET, parameter.dtype, parameter.device)
    if not replays_cuda_graphs(parameter.device):
        return _new_static_cache(model, shape[1])
    kept = getattr(model, "_caprese_static_cache", None)
    if kept is not None and kept[0] == shape:
        kept[1].reset()
        return kept[1]
    model._caprese_static_cache = None  # the old cache's memory goes before the new one's
    cache = _new_static_cache(model, shape[1])
    model._caprese_static_cache = (shape, cache)
    return cache


def _new_static_cache(model: nn.Module, length: int) -> StaticCache:
    """A static cache of `length` positions whose sliding-window layers (Gemma 2/3, Mistral)
    are full ones.

    transformers' static sliding-window layer counts its tokens in a Python int, which the
    mask code reads at every step: with static shapes dynamo guards on its value, so a Gemma
    decode step compiled again at every token (15 s a token on a tiny model) until dynamo's
    limit stopped it. A full layer counts in a tensor; the window is then the mask's work
    (transformers' sliding-window mask excludes keys a window behind the query). Same keys
    attended, same memory up to the window's length; past it the sliding layers hold, and
    attention reads, the whole cache instead of the window."""
    cache = StaticCache(config=model.config, max_cache_len=length)
    for index, layer in enumerate(cache.layers):
        if layer.is_sliding:
            cache.layers[index] = StaticLayer(max_cache_len=length)
    return cache


def replays_cuda_graphs(device: torch.device) -> bool:
    """Whether compiled steps on `device` replay as CUDA graphs, so need stable addresses."""
    return device.type == "cuda"


def _mark_decode_weights_static(model: nn.Module) -> None:
    """CUDA graphs copy every input whose address may change; the blocks' decode weights
    (the shared layouts, GRIFFIN's reused per-prompt matrices) keep theirs for the whole
    attach, so they are marked static, as the model's parameters are."""
    for module in model.modules():
        if isinstance(module, CapreseBlock):
            for fast in (module._gathered, module._shared_fast and module._shared_fast[1]):
                for tensor in (fast.gate, fast.up, fast.down_rows) if fast else ():
                    torch._dynamo.mark_static_address(tensor)
