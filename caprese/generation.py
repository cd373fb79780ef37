"""Batched generation for evaluation: left padding, length-sorted batches, stop strings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


@dataclass
class GenerationSettings:
    max_new_tokens: int = 512
    batch_size: int = 8
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    samples: int = 1  # completions per prompt (pass@k needs more than one)
    seed: int = 0
    stop: tuple[str, ...] = ()  # cut the text at the first of these strings


@dataclass
class Completion:
    text: str
    tokens: int  # generated tokens, up to and including the end-of-sequence token
    truncated: bool  # hit max_new_tokens without ending
    ids: tuple[int, ...] = ()  # those tokens (before any stop string cut the text)


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str | Sequence[int]],
             settings: GenerationSettings, desc: str = "generate",
             progress: bool = True) -> list[list[Completion]]:
    """settings.samples completions for each prompt (text, or token ids used as they are), in
    the prompts' order."""
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    eos = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] if isinstance(p, str)
               else list(p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    results: list[list[Completion]] = [[] for _ in prompts]
    torch.manual_seed(settings.seed)
    for start in tqdm(range(0, len(order), settings.batch_size), desc=desc, unit="batch",
                      disable=not progress):
        chunk = order[start:start + settings.batch_size]
        width = max(len(encoded[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(chunk):
            ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]):] = 1
        sampling = settings.temperature > 0
        out = model.generate(
            ids.to(device), attention_mask=mask.to(device),
            max_new_tokens=settings.max_new_tokens, do_sample=sampling,
            temperature=settings.temperature if sampling else None,
            top_p=settings.top_p if sampling else None, top_k=None,
            num_return_sequences=settings.samples, pad_token_id=pad_id)
        generated = out[:, width:].cpu()
        for row, sequence in enumerate(generated):
            results[chunk[row // settings.samples]].append(_completion(
                sequence.tolist(), tokenizer, eos, pad_id, settings))
    return results


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
