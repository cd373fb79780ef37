"""Batched generation for evaluation: left padding, length-sorted batches, stop strings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from caprese import compiled, distributed

# Sampling seeds: seed * BATCH_SEED_STRIDE + batch index, so every batch draws the same
# numbers whichever rank (or process count) generates it.
BATCH_SEED_STRIDE = 1_000_003


@dataclass
class GenerationSettings:
    max_new_tokens: int = 512
    batch_size: int = 8
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    samples: int = 1  # completions per prompt (pass@k needs more than one)
    seed: int = 0
    stop: tuple[str, ...] = ()  # cut the text at the first of these strings
    compile: str | None = None  # a caprese.compiled backend: decode steps compiled, prompt eager


@dataclass
class Completion:
    text: str
    tokens: int  # generated tokens, up to and including the end-of-sequence token
    truncated: bool  # hit max_new_tokens without ending
    ids: tuple[int, ...] = ()  # those tokens (before any stop string cut the text)


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str | Sequence[int]],
             settings: GenerationSettings, desc: str = "generate",
             progress: bool = True, shard: bool = True) -> list[list[Completion]]:
    """settings.samples completions for each prompt (text, or token ids used as they are), in
    the prompts' order. Prompts are batched by length; under torchrun (unless shard=False:
    this rank alone, on all the prompts) each rank generates whole batches (batch i on rank
    i % N) and every rank gets all the results, so greedy outputs equal a single process's.
    Sampling draws from a seed per batch."""
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    eos = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] if isinstance(p, str)
               else list(p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    chunks = [order[start:start + settings.batch_size]
              for start in range(0, len(order), settings.batch_size)]
    done: list[tuple[int, list[Completion]]] = []
    bar = tqdm(total=len(chunks), desc=desc, unit="batch",
               disable=not progress or not distributed.is_main())
    for index, chunk in enumerate(chunks):
        if shard and not distributed.mine(index):
            continue
        torch.manual_seed(settings.seed * BATCH_SEED_STRIDE + index)
        outputs = _generate_batch(model, [encoded[i] for i in chunk], settings, pad_id, device)
        for row, sequence in enumerate(outputs):
            done.append((chunk[row // settings.samples],
                         _completion(sequence, tokenizer, eos, pad_id, settings)))
        bar.update(distributed.world_size() if shard else 1)
    bar.close()
    results: list[list[Completion]] = [[] for _ in prompts]
    for prompt, completion in distributed.gather(done) if shard else done:  # stable sort
        results[prompt].append(completion)
    return results


def _generate_batch(model, batch: list[list[int]], settings: GenerationSettings, pad_id: int,
                    device) -> list[list[int]]:
    """The generated tokens of one left-padded batch, settings.samples rows per prompt."""
    width = max(len(ids) for ids in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(batch):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    sampling = settings.temperature > 0
    compiling = {}
    if settings.compile:  # transformers' generate compiles its decode steps when given these
        compiled.compiled_forward(model, settings.compile)
        compiling = {"compile_config": compiled.compile_config(device, settings.compile),
                     compiled.cache_argument(model): compiled.static_cache(
                         model, width + settings.max_new_tokens)}
    out = model.generate(
        ids.to(device), attention_mask=mask.to(device),
        max_new_tokens=settings.max_new_tokens, do_sample=sampling,
        temperature=settings.temperature if sampling else None,
        top_p=settings.top_p if sampling else None, top_k=None,
        num_return_sequences=settings.samples, pad_token_id=pad_id, **compiling)
    return out[:, width:].cpu().tolist()


def _completion(tokens: list[int], tokenizer, eos, pad_id, settings) -> Completion:
    ends = set(eos if isinstance(eos, list) else [eos])
    length = next((i + 1 for i, t in enumerate(tokens) if t in ends), None)
    truncated = length is None
    kept = tokens[: length or len(tokens)]
    text = tokenizer.decode(kept, skip_special_tokens=True)
    for stop in settings.stop:
        if stop in text:
            text, truncated = text[: text.index(stop)], False
    return Completion(text, len(kept), truncated, tuple(kept))
