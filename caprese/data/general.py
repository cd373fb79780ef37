"""General text for distillation: news articles, so the path does not learn a math-only fix.

A path fitted on math text alone also acts on every other input, and can make plain text
worse than the efficient method alone does. Mixing in a share of general text keeps the fit
honest there. The articles come from the bundled XSum file, split once and for all:
articles 0-499 are reserved for the language evaluations (xsum, fidelity-language) and are
never training input; articles 500-999 may be trained on, as plain text (the article body,
without the 1-shot prompt around it).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from caprese.data.records import CapreseDataError
from caprese.data.registry import load
from caprese.prompts import teacher_forced
from caprese.samples import Record, TrainingSample, truncate

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

RESERVED_ARTICLES = range(0, 500)  # the language evaluations' articles
TRAINING_ARTICLES = range(500, 1000)
SOURCE = "xsum-train"
PROMPT_TOKENS = 64  # an article's first tokens: the prompt that sets the method's selection


def article_body(record: Record) -> str:
    """The article a bundled XSum prompt asks to summarise (after its worked example)."""
    body = record.prompt.rsplit("Article: ", 1)[-1]
    return body.rsplit("\n\nSummarize the above article", 1)[0].strip()


def reserved(records: list[Record]) -> list[Record]:
    """The evaluation articles of the bundled XSum file (its first 500)."""
    return records[: len(RESERVED_ARTICLES)]


def training_articles(n: int, seed: int) -> list[Record]:
    """n training articles (bodies only) drawn with `seed` from articles 500-999."""
    articles = load("xsum")
    pool = [articles[i] for i in TRAINING_ARTICLES if i < len(articles)]
    if n > len(pool):
        raise CapreseDataError(f"only {len(pool)} general-text training articles (XSum "
                               f"500-999); ask for at most that many, got {n}")
    chosen = random.Random(seed).sample(pool, n)
    return [Record(article_body(r), "", "", SOURCE, f"{SOURCE}/{r.id.rsplit('/', 1)[-1]}")
            for r in chosen]


def general_split(tokenizer: PreTrainedTokenizerBase, samples: int, held_out: int, seed: int,
                  max_length: int | None) -> tuple[list[TrainingSample], list[TrainingSample]]:
    """Disjoint train and held-out plain-text samples: each article's first tokens are the
    prompt (they set the method's selection), the rest is trained on, as in fidelity-language."""
    records = training_articles(samples + held_out, seed)
    length = max_length or 1024
    chosen = teacher_forced(tokenizer, records, language=True, max_length=length,
                            prompt_tokens=min(PROMPT_TOKENS, length // 4))
    chosen = truncate(chosen, max_length)
    return chosen[:samples], chosen[samples:]
