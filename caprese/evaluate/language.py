"""Language retention: XSum 1-shot summaries scored with ROUGE-1/2/L (rouge-score)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from caprese.generation import BatchJournal, GenerationSettings, generate

XSUM_STOP = ("###",)  # the 1-shot file's example separator ends a summary
XSUM_MAX_NEW_TOKENS = 64


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references, strict=True)]
    return {name: 100 * statistics.fmean(s[name].fmeasure for s in scores)
            for name in ("rouge1", "rouge2", "rougeL")}


def evaluate_xsum(model, tokenizer, records: Sequence, settings: GenerationSettings,
                  journal: BatchJournal | None = None) -> dict:
    """records: caprese.data.Record with the 1-shot prompt and the reference summary.

    The prompt is the GRIFFIN 1-shot file's (no chat template) plus a newline: the file's
    worked example puts its summary on the line after "Summarize ... sentence.", and without
    the newline qwen2.5-coder-1.5b-instruct answered " ###" (an empty summary) on every
    article. Generation stops at the "###" example separator.
    """
    prompts = [r.prompt + "\n" for r in records]
    completions = generate(model, tokenizer, prompts, settings, desc="xsum", journal=journal)
    outputs = [samples[0].text.strip() for samples in completions]
    references = [r.answer for r in records]
    rows = [{"id": r.id, "output": out, "reference": ref}
            for r, out, ref in zip(records, outputs, references, strict=True)]
    lengths = [samples[0].tokens for samples in completions]
    return {"summary": {"articles": len(rows), **rouge(outputs, references),
                        "mean_length": statistics.fmean(lengths)},
            "records": rows}
