"""A lean greedy decode loop for timing: prefill once, then one forward per token.

`model.generate` spends much of a small model's decode step on its own bookkeeping (logits
processors, stopping criteria, input preparation), which hides MLP savings. This loop keeps
only what decoding needs: a pre-allocated static KV cache, a forward per token and an argmax.
Phases are the usual ones: the first forward (empty cache) is the dense prefill.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

try:
    import resource
except ImportError:  # not a Unix: no page-fault counts
    resource = None

import torch
from transformers import DynamicCache, StaticCache

from caprese import compiled, phases
from caprese.adapter import decode_reselection


@dataclass
class DecodeRun:
    tokens: torch.Tensor  # (B, G) generated tokens
    ttft: float  # seconds: prefill (incl. any per-prompt gathering) and the first token
    step_seconds: list[float]  # one entry per further token
    ttft_faults: int = 0  # pages first touched during the first token (see minor_faults)

    @property
    def ttnt(self) -> float:
        """Mean time to next token."""
        return sum(self.step_seconds) / max(len(self.step_seconds), 1)


def minor_faults() -> int:
    """Pages this process has touched for the first time so far (0 where not counted).

    glibc hands every block above 32 MiB (a 2048-token prompt's MLP activations in the 1.5B
    model) straight back to the system when freed, so the next one faults its pages in
    again: on a 2-core VM, 0 to 1M faults per prefill, up to seconds of time to first token
    that depend on what the process allocated before, not on the variant. The bench reports
    them beside TTFT so such a run is seen for what it is."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def greedy_decode(model: torch.nn.Module, input_ids: torch.Tensor, gen_len: int,
                  static_cache: bool = True, compile: str | None = None,
                  prefill_chunk: int | None = None) -> DecodeRun:
    """Greedy-generate gen_len tokens for unpadded prompts, timing every step. `compile` (a
    caprese.compiled backend) runs the decode steps compiled, with a static cache: the first
    run of a kind of variant compiles, so time a warm-up run apart. A model that reselects
    GRIFFIN's neurons (adapter.reselection) does so in the timed steps, on a dynamic cache
    (the dense model's entries replace the decoded ones). `prefill_chunk` feeds the prompt
    in pieces of that many tokens (phases.prefill), as llama.cpp does, to bound the memory
    of a long prompt's activations."""
    context, every = decode_reselection(model, compile)
    with context:
        return _greedy_decode(model, input_ids, gen_len, static_cache and every is None,
                              compile, every, prefill_chunk)


def _greedy_decode(model, input_ids, gen_len, static_cache, compile, every, prefill_chunk
                   ) -> DecodeRun:
    batch, prompt_len = input_ids.shape
    device = input_ids.device
    if compile:
        cache = compiled.static_cache(model, prompt_len + gen_len, batch)
    elif static_cache:
        cache = StaticCache(config=model.config, max_cache_len=prompt_len + gen_len)
    else:
        cache = DynamicCache(config=model.config)
    name = phases.cache_argument(model)
    _sync(device)
    faults = minor_faults()
    started = time.perf_counter()
    logits = phases.prefill(model, input_ids, cache, prefill_chunk).logits
    token = logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    ttft = time.perf_counter() - started
    faults = minor_faults() - faults
    step = compiled.compiled_forward(model, compile) if compile else model
    tokens, steps = [token], []
    dense_end = prompt_len  # cache entries up to here were written by the dense model
    for position in range(prompt_len, prompt_len + gen_len - 1):
        started = time.perf_counter()
        if every and len(tokens) % every == 0:  # GRIFFIN's reselection, a part of decoding
            decoded = torch.cat(tokens, dim=1)[:, dense_end - prompt_len : -1]
            phases.rescore(model, decoded, torch.ones(batch, position, dtype=torch.long,
                                                      device=device), cache)
            dense_end = position
        positions = torch.full((batch, 1), position, device=device)
        logits = step(input_ids=token, position_ids=positions, use_cache=True,
                      logits_to_keep=1, **{name: cache}).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        steps.append(time.perf_counter() - started)
        tokens.append(token)
    return DecodeRun(torch.cat(tokens, dim=1), ttft, steps, faults)
