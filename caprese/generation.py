"""Batched generation for evaluation: left padding, length-sorted batches, ended rows leave
the batch, stop strings."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from caprese import compiled, distributed, heap, phases
from caprese.adapter import decode_reselection
from caprese.io import atomic_write_text, remove_stale_temporaries

# Sampling seeds: seed * BATCH_SEED_STRIDE + batch index, so every batch draws the same
# numbers whichever rank (or process count) generates it.
BATCH_SEED_STRIDE = 1_000_003
# Tokens between two checks for ended answers (whose rows then leave the batch): a row that
# ends mid-segment decodes RETIRE_EVERY / 2 tokens too many on average, and each check costs
# a generate call's setup and a copy of the remaining rows' KV cache.
RETIRE_EVERY = 32


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
    tokens: int  # generated tokens, up to the end token or the one that completes a stop string
    truncated: bool  # hit max_new_tokens without ending
    ids: tuple[int, ...] = ()  # those tokens (the text leaves the stop string out)


@dataclass(frozen=True)
class BatchJournal:
    """A folder where generate() saves each batch's tokens as soon as the batch ends, so a
    killed evaluation (hours on a CPU) resumes where it stopped and gives what an unbroken
    run gives. A saved batch is reused only when its key matches: the same prompts, batch
    position and settings, and the same `context` (what else decides the output: the model,
    the variant, the adapter's bytes). The folder holds nothing but these files."""

    folder: Path
    context: str = ""

    FILE = re.compile(r"batch-\d{5}\.json|\.batch-\d{5}\.json\..*\.tmp")

    def check(self) -> None:
        """Refuse a folder caprese did not write: resuming reads it, finishing removes it."""
        if self.folder.exists() and (not self.folder.is_dir() or any(
                not self.FILE.fullmatch(f.name) or not f.is_file()
                for f in self.folder.iterdir())):
            raise ValueError(f"{self.folder} exists and is not a folder of saved batches "
                             "caprese wrote: move it away or choose another output path")

    def saved(self) -> int:
        return len(list(self.folder.glob("batch-*.json"))) if self.folder.is_dir() else 0

    def key(self, index: int, batch: list[list[int]], settings: GenerationSettings) -> str:
        text = json.dumps([self.context, index, batch, asdict(settings)])
        return hashlib.sha256(text.encode()).hexdigest()

    def load(self, index: int, key: str) -> list[list[int]] | None:
        try:
            saved = json.loads((self.folder / f"batch-{index:05d}.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        return saved["sequences"] if isinstance(saved, dict) and saved.get("key") == key \
            else None

    def save(self, index: int, key: str, sequences: list[list[int]]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.folder / f"batch-{index:05d}.json",
                          json.dumps({"key": key, "sequences": sequences}))

    def remove(self) -> None:
        """Once the result is written: the saved batches (and nothing else) go."""
        if not self.folder.is_dir():
            return
        self.check()
        for saved in self.folder.glob("batch-*.json"):
            remove_stale_temporaries(saved)
            saved.unlink()
        self.folder.rmdir()


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str | Sequence[int]],
             settings: GenerationSettings, desc: str = "generate",
             progress: bool = True, shard: bool = True,
             journal: BatchJournal | None = None) -> list[list[Completion]]:
    """settings.samples completions for each prompt (text, or token ids used as they are), in
    the prompts' order. Prompts are batched by length; under torchrun (unless shard=False:
    this rank alone, on all the prompts) each rank generates whole batches (batch i on rank
    i % N) and every rank gets all the results, so greedy outputs equal a single process's.
    Sampling draws from a seed per batch. With a journal, finished batches are saved there
    and those saved by an earlier, interrupted call are read back instead of generated."""
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    eos = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    ends = end_ids(model, tokenizer)

    def ended(tokens: list[int]) -> bool:  # an end token, or a stop string in the text
        if any(t in ends for t in tokens):
            return True
        return bool(settings.stop) and _stop_at(tokens, tokenizer, settings.stop) is not None

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
        batch = [encoded[i] for i in chunk]
        key = journal.key(index, batch, settings) if journal else ""
        outputs = journal.load(index, key) if journal else None
        if outputs is None:
            torch.manual_seed(settings.seed * BATCH_SEED_STRIDE + index)
            outputs = _generate_batch(model, batch, settings, pad_id, ended, device)
            if journal:
                journal.save(index, key, outputs)
            heap.release()  # the next batch's cache has another size: see caprese/heap.py
        for row, sequence in enumerate(outputs):
            done.append((chunk[row // settings.samples],
                         _completion(sequence, tokenizer, ends, settings)))
        bar.update(distributed.world_size() if shard else 1)
    bar.close()
    results: list[list[Completion]] = [[] for _ in prompts]
    for prompt, completion in distributed.gather(done) if shard else done:  # stable sort
        results[prompt].append(completion)
    return results


def _generate_batch(model, batch: list[list[int]], settings: GenerationSettings, pad_id: int,
                    ended: Callable[[list[int]], bool], device) -> list[list[int]]:
    """The generated tokens of one left-padded batch, settings.samples rows per prompt."""
    width = max(len(ids) for ids in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(batch):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    sampling = settings.temperature > 0
    options = {"do_sample": sampling, "temperature": settings.temperature if sampling else None,
               "top_p": settings.top_p if sampling else None, "top_k": None,
               "pad_token_id": pad_id}
    context, every = decode_reselection(model, settings.compile)
    with context:
        if settings.compile:  # transformers' generate compiles its decode steps given these
            compiled.compiled_forward(model, settings.compile)
            cache = compiled.static_cache(model, width + settings.max_new_tokens,
                                          len(batch) * settings.samples)
            out = model.generate(
                ids.to(device), attention_mask=mask.to(device),
                max_new_tokens=settings.max_new_tokens, num_return_sequences=settings.samples,
                compile_config=compiled.compile_config(device, settings.compile),
                **{phases.cache_argument(model): cache}, **options)
            return out[:, width:].cpu().tolist()
        return _retiring_generate(model, ids.repeat_interleave(settings.samples, 0),
                                  mask.repeat_interleave(settings.samples, 0),
                                  settings.max_new_tokens, options, ended, device, every)


def end_ids(model, tokenizer) -> set[int]:
    """The tokens that end an answer: the tokenizer's end token and those the model's
    generation config lists (transformers' generate stops a row at the latter)."""
    found = set()
    for ends in (tokenizer.eos_token_id, model.generation_config.eos_token_id):
        found |= set() if ends is None else set(ends if isinstance(ends, list) else [ends])
    return found


def _retiring_generate(model, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int,
                       options: dict, ended: Callable[[list[int]], bool], device,
                       reselect_every: int | None = None) -> list[list[int]]:
    """transformers' generate in segments of RETIRE_EVERY tokens over one KV cache; between
    segments the rows that have ended leave the batch (cache rows and the caprese blocks'
    per-sample state), so that no step is spent on finished answers (a batch would otherwise
    decode every row until its longest answer ends). With reselect_every (GRIFFIN's rho),
    segments also end every rho tokens, where phases.rescore runs the tokens decoded since
    the last reselection through the dense model and GRIFFIN selects again."""
    cache = DynamicCache(config=model.config)
    rows = list(range(ids.shape[0]))  # the original row of each row still decoding
    generated: list[list[int]] = [[] for _ in rows]
    ids, mask = ids.to(device), mask.to(device)
    dense_end = ids.shape[1]  # cache entries up to here were written by the dense model
    left = max_new_tokens
    while left > 0:
        step = min(RETIRE_EVERY, left)
        if reselect_every:
            step = min(step, reselect_every - (max_new_tokens - left) % reselect_every)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=step,
                             **{phases.cache_argument(model): cache}, **options)
        new = out[:, ids.shape[1]:]
        left -= new.shape[1]
        for row, tokens in zip(rows, new.tolist(), strict=True):
            generated[row].extend(tokens)
        keep = [position for position, row in enumerate(rows) if not ended(generated[row])]
        if not keep:
            break
        if len(keep) < len(rows):
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            phases.keep_samples(model, index)
            out, mask = out[index], mask[index]
            rows = [rows[position] for position in keep]
        ids = out
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], new.shape[1])], dim=1)
        if reselect_every and left and (max_new_tokens - left) % reselect_every == 0:
            # the last token is not in the cache yet: the next segment feeds it
            phases.rescore(model, ids[:, dense_end:-1], mask[:, :-1], cache)
            dense_end = ids.shape[1] - 1
    return generated


def _stop_at(tokens: list[int], tokenizer, stops: Sequence[str]) -> int | None:
    """How many tokens it takes for the text to hold one of `stops` (None: it never does).
    Longer prefixes decode to longer texts, so a binary search finds the shortest."""
    def holds(count: int) -> bool:
        text = tokenizer.decode(tokens[:count], skip_special_tokens=True)
        return any(stop in text for stop in stops)

    if not holds(len(tokens)):
        return None
    low, high = 1, len(tokens)
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if holds(middle) else (middle + 1, high)
    return low


def _completion(tokens: list[int], tokenizer, ends: set[int], settings) -> Completion:
    length = next((i + 1 for i, t in enumerate(tokens) if t in ends), None)
    truncated = length is None
    kept = tokens[: length or len(tokens)]
    if settings.stop:  # the tokens after a stop string are not part of the answer
        stopped = _stop_at(kept, tokenizer, settings.stop)
        if stopped is not None:
            kept, truncated = kept[:stopped], False
    text = tokenizer.decode(kept, skip_special_tokens=True)
    for stop in settings.stop:
        if stop in text:
            text = text[: text.index(stop)]
    return Completion(text, len(kept), truncated, tuple(kept))
