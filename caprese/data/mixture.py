"""The distillation training mixture: distinct problems, never an evaluation problem.

Samples are drawn with a seed from the training sets, written as the evaluation prompt (the
chat-templated question) followed by the reference solution, and refused when they carry an
evaluation label or an evaluation question's text.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

from caprese.data import gsm_symbolic
from caprese.data.records import CapreseDataError
from caprese.data.registry import EVALUATION_SETS, TRAINING_SOURCES, load
from caprese.prompts import templated
from caprese.samples import Record, TrainingSample, truncate

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Sets whose questions a training record must not repeat (by normalised text).
LEAK_CHECKED = ("math500", "aime24", "amc23", "gsm-symbolic-all", "gsm-symbolic-test")


def _normalize(text: str) -> str:
    return " ".join(text.lower().split())


def _distinct(records: list[Record]) -> list[Record]:
    """Drop records whose question repeats an earlier one (keeps the first)."""
    kept: dict[str, Record] = {}
    for record in records:
        kept.setdefault(_normalize(record.prompt), record)
    return list(kept.values())


def _refuse_evaluation(records: Sequence[Record]) -> None:
    """Refuse records labelled as, or with the question of, an evaluation problem."""
    labelled = sorted({r.source for r in records} & EVALUATION_SETS)
    if labelled:
        raise CapreseDataError(
            f"{', '.join(labelled)}: evaluation data cannot be training input; "
            f"train on {', '.join(TRAINING_SOURCES)}"
        )
    evaluation = {_normalize(r.prompt) for name in LEAK_CHECKED for r in load(name)}
    leaked = [r for r in records if _normalize(r.prompt) in evaluation]
    if leaked:
        raise CapreseDataError(
            f"{len(leaked)} training records are evaluation problems (first: "
            f"{leaked[0].id} from {leaked[0].source}); remove them"
        )


def training_pool(
    sources: Sequence[str] = TRAINING_SOURCES, n: int = 0, seed: int = 0
) -> list[Record]:
    """Every distinct candidate record of `sources`.

    "gsm-symbolic-train" stands for generated variants of the training templates (never the
    originals, which are GSM8K test problems); it adds just enough to hold n records.
    """
    refused = sorted(set(sources) & EVALUATION_SETS)
    unknown = sorted(set(sources) - set(TRAINING_SOURCES) - EVALUATION_SETS)
    if refused or unknown:
        raise CapreseDataError(
            f"cannot train on {', '.join(refused + unknown)}"
            f"{' (evaluation data)' if refused else ''}; choose from {', '.join(TRAINING_SOURCES)}"
        )
    pool = _distinct([r for s in sources if s != "gsm-symbolic-train" for r in load(s)])
    if "gsm-symbolic-train" in sources and len(pool) < n:
        # Variants repeat now and then, so ask for a quarter more than the shortfall.
        shortfall = math.ceil(1.25 * (n - len(pool)) / len(gsm_symbolic.TRAIN_TEMPLATES))
        pool = _distinct(pool + gsm_symbolic.training_variants(shortfall, seed))
    return pool


def build_mixture(
    tokenizer: PreTrainedTokenizerBase,
    sources: Sequence[str] = TRAINING_SOURCES,
    n: int = 20_000,
    seed: int = 0,
    extra: Sequence[Record] = (),
) -> list[TrainingSample]:
    """Draw n distinct training samples (the paper uses 20K) from `sources` plus `extra`.

    Each prompt is "Please reason step by step." + the question in the tokenizer's chat
    template; the continuation is the reference solution turn. The same seed gives the same
    mixture. Evaluation data is refused, by label and by question text.
    """
    pool = _distinct(list(extra) + training_pool(sources, n - len(extra), seed))
    _refuse_evaluation(pool)
    if len(pool) < n:
        raise CapreseDataError(
            f"only {len(pool)} samples in {list(sources)}; ask for fewer or "
            "add 'gsm-symbolic-train', which generates variants to fill up"
        )
    chosen = random.Random(seed).sample(pool, n)
    texts = [templated(tokenizer, r) for r in chosen]
    prompts = tokenizer([p for p, _ in texts], add_special_tokens=False)["input_ids"]
    continuations = tokenizer([c for _, c in texts], add_special_tokens=False)["input_ids"]
    return [
        TrainingSample(tuple(p) + tuple(c), len(p), r.source, r.id)
        for p, c, r in zip(prompts, continuations, chosen, strict=True)
    ]


def training_split(tokenizer: PreTrainedTokenizerBase, sources: Sequence[str], samples: int,
                   held_out: int, seed: int, max_length: int | None
                   ) -> tuple[list[TrainingSample], list[TrainingSample]]:
    """Disjoint train and held-out samples drawn from one seeded mixture.

    Prompts longer than max_length are dropped, so a few extra samples (an eighth, plus 8)
    are drawn to keep the requested counts.
    """
    wanted = samples + held_out
    mixture = truncate(build_mixture(tokenizer, sources, n=wanted + wanted // 8 + 8, seed=seed),
                       max_length)
    if len(mixture) < wanted:
        raise CapreseDataError(f"only {len(mixture)} samples fit in --max-length {max_length}; "
                               "raise it or ask for fewer samples")
    return mixture[:samples], mixture[samples:wanted]
