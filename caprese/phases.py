"""Which phase a forward pass is in, decided in one place for every Caprese block.

- PREFILL: the prompt. The MLP runs dense (output exactly the original's) and each block
  keeps its per-sample selection or threshold.
- DECODE: generated tokens. Compressed MLP + x L R.
- SPLIT: teacher forcing. One forward over prompt + continuation; positions before each
  sample's boundary run as PREFILL, the rest as DECODE. Training and fidelity use it.
- CAPTURE: a SPLIT whose output stays dense (the original model) while each block hands its
  input and the activations its method drops to an observer: layer-wise distillation.
- DENSE: the original model (teacher), nothing selected.

Without an explicit context, a forward is a PREFILL when its KV cache is empty and a DECODE
when it extends a non-empty cache: that is exactly what prefill and decode mean, and it is how
`model.generate` drives the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import itertools
from collections.abc import Callable, Iterator

import torch
from torch import nn

from caprese.block import CapreseBlock, DecodeOptions, Phase, PhaseState
from caprese.kernels.cpu import route_linears
from caprese.kernels.huge_pages import collapse


def _past_length(cache) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    raise TypeError(
        f"caprese needs a transformers Cache object as past_key_values, got {type(cache).__name__}"
    )


def cache_argument(model: nn.Module) -> str:
    """The forward's KV-cache argument: transformers 5.x renamed past_key_values to cache."""
    parameters = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _cache_argument(arguments: dict):
    """The KV cache: `cache` since transformers 5.x, `past_key_values` before."""
    for source in (arguments, arguments.get("kwargs") or {}):
        for name in ("cache", "past_key_values"):
            if source.get(name) is not None:
                return source[name]
    return None


def mask_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each token's position in its own sequence under left padding (pads get 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def _valid_mask(attention_mask, shape: tuple[int, int], device, past: int) -> torch.Tensor:
    """Which of the forward's tokens are real (not padding). transformers' generate hands a
    static cache's forward 4D masks (one per kind of layer for Gemma 2/3) instead of the 2D
    one: there, a token is real when some query attends to it (a real token attends to
    itself), in the columns of the forward's tokens (past .. past + their count)."""
    if isinstance(attention_mask, dict):  # any kind of layer's mask shows the padding
        attention_mask = next(iter(attention_mask.values()), None)
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        return attention_mask[:, -shape[1] :].to(device=device, dtype=torch.bool)
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
        attended = attention_mask if attention_mask.dtype == torch.bool else \
            attention_mask > torch.finfo(attention_mask.dtype).min  # eager's additive mask
        return attended[..., past : past + shape[1]].any(dim=2).any(dim=1).to(device)
    return torch.ones(shape, dtype=torch.bool, device=device)


class PhaseHook:
    """The decoder stack's forward pre-hook (with kwargs): sets the phase of every block.

    An object rather than a closure, so copy.deepcopy of an attached model gives the copy a
    hook that writes the copy's own PhaseState (a closure would keep writing the original's).
    """

    def __init__(self, state: PhaseState, forward_signature: inspect.Signature) -> None:
        self.state = state
        self.signature = forward_signature

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        state = self.state
        if state.teacher_depth > 0:
            state.phase = Phase.DENSE
            return None
        if state.forced is Phase.DECODE or (state.forced is None
                                            and torch.compiler.is_compiling()):
            # caprese compiles decode steps only (caprese.compiled): prefill's selection has
            # prompt-dependent shapes, and reading a static cache's length is a tensor read
            # that would split the compiled graph.
            state.phase = Phase.DECODE
            return None
        bound = self.signature.bind_partial(*args, **kwargs).arguments
        tokens = bound.get("input_ids")
        if tokens is None:
            tokens = bound.get("inputs_embeds")
        if state.forced is not None:
            state.phase = state.forced
        else:
            cache = _cache_argument(bound)
            state.phase = Phase.PREFILL if _past_length(cache) == 0 else Phase.DECODE
        forcing = state.phase in (Phase.SPLIT, Phase.CAPTURE)
        if tokens is not None and (forcing or state.phase in (Phase.PREFILL, Phase.RESCORE)):
            state.valid = _valid_mask(bound.get("attention_mask"), tokens.shape[:2],
                                      tokens.device, _past_length(_cache_argument(bound)))
        if forcing:
            if state.boundary is None or tokens is None or len(state.boundary) != tokens.shape[0]:
                raise ValueError("split forward needs one boundary per sample in the batch")
            state.boundary = state.boundary.to(tokens.device)
        return None


def state_of(model: nn.Module) -> PhaseState:
    """The PhaseState that the blocks of an attached model share."""
    for module in model.modules():
        if isinstance(module, CapreseBlock):
            return module.phase_state
    raise ValueError("this model has no caprese blocks: call caprese.attach(model, config)")


def set_decode(model: nn.Module, **changes) -> DecodeOptions:
    """Change how the model's blocks decode (DecodeOptions fields: fused, kernels); returns
    the previous options, so that a caller can put them back."""
    state = state_of(model)
    previous = state.decode
    state.decode = dataclasses.replace(previous, **changes)
    return previous


def prepare_decode(model: nn.Module, batch: int | None = None) -> nn.Module:
    """Do the once-per-attach work of decoding now rather than in a prompt's time to first
    token: the weight layouts (and the fused weights every prompt shares, rebuilt later
    only for the r rows of L and R once they change) and, with `batch`, GRIFFIN's
    gathered matrices for that many samples, which each prompt then fills in place."""
    if state_of(model).decode.fused:
        for module in model.modules():
            if isinstance(module, CapreseBlock):
                module.prepare_layout(batch)
    return model


def keep_samples(model: nn.Module, index: torch.Tensor) -> None:
    """Continue decoding only the samples at `index` of the current batch (their KV cache
    rows are the caller's to select): each block keeps those samples' selections. A model
    without caprese blocks has nothing to keep."""
    for module in model.modules():
        if isinstance(module, CapreseBlock):
            module.keep_samples(index)


def _blocks(model: nn.Module) -> list[CapreseBlock]:
    return [m for m in model.modules() if isinstance(m, CapreseBlock)]


@torch.no_grad()
def prefill(model: nn.Module, input_ids: torch.Tensor, cache, chunk: int | None = None,
            attention_mask: torch.Tensor | None = None):
    """The prompt into an empty `cache` (the output of its last forward: logits of the last
    token only). With `chunk`, it goes in pieces of that many tokens, so a long prompt's
    activations take chunk/S of the memory; every block's method sees all the pieces before
    it selects (GRIFFIN adds scores, CATS counts 16-bit magnitudes), so decoding then equals
    a one-piece prefill's. A method that cannot (CATS in fp32: its quantile needs every
    value at once) gets the prompt in one piece."""
    blocks = _blocks(model)
    width = input_ids.shape[1]
    name = cache_argument(model)
    dtype = next(model.parameters()).dtype
    if chunk is None or width <= chunk or not all(b.method.streams(dtype) for b in blocks):
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                     logits_to_keep=1, **{name: cache})
    if chunk < 1:
        raise ValueError(f"prefill chunk must be at least 1 token, got {chunk}")
    positions = None if attention_mask is None else mask_positions(attention_mask)
    state = state_of(model) if blocks else None
    if state is not None:
        state.prompt_chunks = True
    for block in blocks:
        block.stream = None  # left over only by a prefill that raised
    try:
        for start in range(0, width, chunk):
            end = min(start + chunk, width)
            with forced_phase(model, Phase.PREFILL) if state is not None \
                    else contextlib.nullcontext():
                output = model(
                    input_ids=input_ids[:, start:end],
                    attention_mask=None if attention_mask is None else attention_mask[:, :end],
                    position_ids=None if positions is None else positions[:, start:end],
                    cache_position=torch.arange(start, end, device=input_ids.device),
                    use_cache=True, logits_to_keep=1, **{name: cache})
    finally:
        if state is not None:
            state.prompt_chunks = False
    for block in blocks:
        block.finish_prompt()
    return output


@torch.no_grad()
def rescore(model: nn.Module, tokens: torch.Tensor, attention_mask: torch.Tensor,
            cache) -> None:
    """GRIFFIN's reselection: the last tokens.shape[1] entries of `cache` (written while
    decoding compressed) are replaced by the dense model's for `tokens`, whose scores join
    the prompt's; every block then selects its neurons again. `attention_mask` covers the
    whole sequence up to and including `tokens` (left padding as in generation)."""
    width = tokens.shape[1]
    cache.crop(-width)  # a negative count removes that many of the last entries
    positions = mask_positions(attention_mask)[:, -width:]
    with forced_phase(model, Phase.RESCORE):
        model(input_ids=tokens, attention_mask=attention_mask, position_ids=positions,
              use_cache=True, logits_to_keep=1, **{cache_argument(model): cache})


def use_decode_kernels(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Decode single tokens with caprese's CPU kernels everywhere: every nn.Linear (attention,
    LM head) and, on an attached model, the blocks' fused products, their weights on huge
    pages (kernels/huge_pages.py). enabled=False restores PyTorch (and "auto" kernels in the
    blocks)."""
    if enabled:
        collapse(itertools.chain(model.parameters(), model.buffers()))
    route_linears(model, enabled)
    if any(isinstance(m, CapreseBlock) for m in model.modules()):
        set_decode(model, kernels="cpu" if enabled else "auto")
    return model


@contextlib.contextmanager
def teacher(model: nn.Module) -> Iterator[nn.Module]:
    """The original dense model from the same weights: method and low-rank path off."""
    state = state_of(model)
    state.teacher_depth += 1
    try:
        yield model
    finally:
        state.teacher_depth -= 1


@contextlib.contextmanager
def split(
    model: nn.Module,
    boundary: torch.Tensor | list[int],
    phase: Phase = Phase.SPLIT,
    observer: Callable | None = None,
) -> Iterator[nn.Module]:
    """Teacher-forced forwards: sample b's positions < boundary[b] are prompt (prefill).

    Boundaries index the padded input, so with left padding they include the pad count.
    phase=Phase.CAPTURE keeps the output dense and calls `observer` from every block.
    """
    state = state_of(model)
    if state.forced is not None:
        raise RuntimeError("caprese.split contexts cannot be nested")
    state.forced, state.boundary = phase, torch.as_tensor(boundary, dtype=torch.long)
    state.observer = observer
    try:
        yield model
    finally:
        state.forced, state.boundary, state.observer = None, None, None


@contextlib.contextmanager
def forced_phase(model: nn.Module, phase: Phase) -> Iterator[nn.Module]:
    """Run in one phase regardless of the cache: hand-written decode loops, or calling
    blocks directly (the phase is set at once, not only at the next model forward)."""
    state = state_of(model)
    previous = state.forced, state.phase
    state.forced = state.phase = phase
    try:
        yield model
    finally:
        state.forced, state.phase = previous


def guarded_generate(model: nn.Module, *args, **kwargs):
    """model.generate, refusing cache-less generation (every step would look like a prompt).

    attach binds it to the model with types.MethodType, which copy.deepcopy rebinds to the
    copy (a closure over the original bound method would keep generating with the original).
    """
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    use_cache = kwargs.get("use_cache", getattr(config, "use_cache", True))
    if use_cache is False:
        raise ValueError(
            "caprese generation needs the KV cache (use_cache=True): the prompt runs "
            "dense once and only generated tokens run compressed"
        )
    beams = kwargs.get("num_beams", getattr(config, "num_beams", 1)) or 1
    if beams > 1:
        raise ValueError(
            f"beam search (num_beams={beams}) reorders the batch between steps, which each "
            "sample's selection cannot follow: use greedy decoding or sampling"
        )
    return type(model).generate(model, *args, **kwargs)
