"""Teacher-written continuations: distill on the text the model itself decodes.

Teacher forcing on reference solutions fits the low-rank path to human-written text, while
at inference the path sees the model's own chain of thought (longer, in its own style). With
`caprese distill --continuations teacher` every training prompt's continuation is replaced by
the original model's greedy output for that prompt (sequence-level distillation), so the fit
lands on the text that decoding visits. Generating is the costly part (one greedy decode per
sample), so each output is appended to a cache file as soon as its batch is done: an
interrupted run regenerates only what is missing, and a torn last line is ignored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from caprese import distributed
from caprese.generation import GenerationSettings, generate
from caprese.io import append_log
from caprese.phases import teacher
from caprese.samples import TrainingSample

CACHE_FILE = "teacher_text.jsonl"


def _key(sample: TrainingSample, max_length: int) -> str:
    """A cached output is reused only for the very same prompt ids and length budget."""
    prompt = list(sample.input_ids[: sample.boundary])
    digest = hashlib.sha256(json.dumps([prompt, max_length]).encode())
    return f"{sample.id}:{digest.hexdigest()[:16]}"


def _record(line: str) -> tuple[str, list[int]] | None:
    """A cache line's (key, ids), or None for anything else (a line cut short by a kill)."""
    try:
        record = json.loads(line)
        key, ids = record["key"], record["ids"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
    if isinstance(key, str) and isinstance(ids, list) and ids \
            and all(isinstance(i, int) for i in ids):
        return key, ids
    return None


def check_cache(path: Path) -> None:
    """Refuse a cache file that caprese did not write: a run appends to it, and caprese never
    writes into files it did not write. Only the last line may be torn (a kill)."""
    if not path.exists():
        return
    if not path.is_file():
        raise ValueError(f"teacher-text cache {path} is not a file: name a .jsonl file")
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        lines = ["not text"]
    if any(_record(line) is None for line in lines[:-1]) or (
            len(lines) == 1 and _record(lines[0]) is None):
        raise ValueError(f"{path} is not a teacher-text cache written by caprese distill: "
                         "name another file (or none, for one in the run folder)")


def _read_cache(path: Path) -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    if not path.is_file():
        return found
    for line in path.read_text().splitlines():
        record = _record(line)
        if record is not None:  # else a line cut short by a kill: generated again
            found[record[0]] = record[1]
    return found


def teacher_continuations(
    model,
    tokenizer,
    samples: Sequence[TrainingSample],
    max_length: int,
    cache: Path,
    batch_size: int = 8,
) -> list[TrainingSample]:
    """`samples` with each continuation replaced by the dense model's greedy output (ending
    at its end-of-sequence token, or cut at max_length tokens in all)."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    done = _read_cache(cache)
    # Batches of similar prompt lengths waste little on padding.
    missing = sorted((s for s in samples if _key(s, max_length) not in done),
                     key=lambda s: s.boundary)
    chunks = [missing[start : start + batch_size] for start in range(0, len(missing), batch_size)]
    progress = tqdm(total=len(samples), initial=len(samples) - len(missing),
                    desc="teacher text", unit="sample", disable=not distributed.is_main())
    for round_ in distributed.rounds(len(chunks)):  # under torchrun: a batch per rank a round
        index = round_ * distributed.world_size() + distributed.rank()
        lines = _generate_lines(model, tokenizer, chunks[index], max_length) \
            if index < len(chunks) else []
        for _, batch_lines in distributed.gather([(index, lines)]):
            for line in batch_lines:
                if distributed.is_main():
                    append_log(cache, line)
                done[line["key"]] = line["ids"]
            progress.update(len(batch_lines))
    progress.close()
    return [_with_continuation(s, done[_key(s, max_length)], max_length) for s in samples]


def _generate_lines(model, tokenizer, chunk: Sequence[TrainingSample], max_length: int
                    ) -> list[dict]:
    """The cache lines of one batch: the dense model's greedy continuation of each prompt,
    up to max_length tokens in all for the shortest prompt of the batch."""
    prompts = [s.input_ids[: s.boundary] for s in chunk]
    budget = max_length - min(len(p) for p in prompts)
    settings = GenerationSettings(max_new_tokens=budget, batch_size=len(chunk))
    with teacher(model):
        outputs = generate(model, tokenizer, prompts, settings, progress=False, shard=False)
    return [{"key": _key(s, max_length), "ids": list(out[0].ids)}
            for s, out in zip(chunk, outputs, strict=True)]


def _with_continuation(sample: TrainingSample, ids: list[int], max_length: int) -> TrainingSample:
    prompt = list(sample.input_ids[: sample.boundary])
    return dataclasses.replace(sample, input_ids=tuple((prompt + ids)[:max_length]))
