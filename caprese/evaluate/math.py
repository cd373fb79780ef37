"""Math accuracy by generation: prompt, generate, extract the final answer, verify.

Output: accuracy with a 95% Wilson interval, pass@k when several samples are drawn, mean and
median response length (also by MATH level), the truncation rate, and one record per problem.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Sequence

from caprese.evaluate.checker import Verdict, check
from caprese.evaluate.protocols import final_answer
from caprese.generation import BatchJournal, GenerationSettings, generate

GSM_STYLE = ("gsm8k", "gsm-symbolic", "gsm8k-test")


def wilson_interval(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    if total == 0:
        return (float("nan"), float("nan"))
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return (max(0.0, centre - half), min(1.0, centre + half))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al., 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def evaluate_math(model, tokenizer, records: Sequence, prompt_fn, settings: GenerationSettings,
                  task: str, journal: BatchJournal | None = None) -> dict:
    """records: caprese.data.Record; prompt_fn(tokenizer, record) -> prompt text."""
    prompts = [prompt_fn(tokenizer, r) for r in records]
    completions = generate(model, tokenizer, prompts, settings, desc=task, journal=journal)
    numeric = any(task.startswith(s) for s in GSM_STYLE)
    rows = []
    for record, prompt, samples in zip(records, prompts, completions, strict=True):
        answers = [final_answer(prompt, c.text) for c in samples]
        verdicts = [check(text, record.answer, numeric_fallback=numeric) if finished
                    else Verdict("", False, "reasoning unfinished")
                    for text, finished in answers]
        row = {
            "id": record.id, "level": record.level, "subject": record.subject,
            "prompt": prompt, "gold": record.answer,
            "outputs": [c.text for c in samples],
            "extracted": [v.extracted for v in verdicts],
            "correct": [v.correct for v in verdicts],
            "tokens": [c.tokens for c in samples],
            "truncated": [c.truncated for c in samples],
        }
        if any(not finished for _, finished in answers):
            row["unfinished_reasoning"] = [not finished for _, finished in answers]
        rows.append(row)
    return {"summary": summarize(rows, settings.samples), "records": rows}


def summarize(rows: list[dict], samples: int) -> dict:
    first_correct = sum(r["correct"][0] for r in rows)
    lengths = [t for r in rows for t in r["tokens"]]
    low, high = wilson_interval(first_correct, len(rows))
    by_level: dict = defaultdict(list)
    for r in rows:
        if r["level"] is not None:
            by_level[r["level"]].extend(r["tokens"])
    summary = {
        "problems": len(rows), "accuracy": first_correct / max(len(rows), 1),
        "ci95": [low, high],
        "mean_length": statistics.fmean(lengths) if lengths else float("nan"),
        "median_length": statistics.median(lengths) if lengths else float("nan"),
        "truncation_rate": sum(t for r in rows for t in r["truncated"]) / max(len(lengths), 1),
        "length_by_level": {str(k): statistics.fmean(v) for k, v in sorted(by_level.items())},
    }
    unfinished = [u for r in rows for u in r.get("unfinished_reasoning", [False] * samples)]
    if any(unfinished):
        summary["unfinished_reasoning_rate"] = sum(unfinished) / len(unfinished)
    if samples > 1:  # run j: every problem's j-th answer (the paper's "4 runs")
        runs = [sum(r["correct"][j] for r in rows) / max(len(rows), 1) for j in range(samples)]
        summary["run_accuracies"] = runs
        summary["mean_accuracy"] = statistics.fmean(runs)
        summary["accuracy_std"] = statistics.stdev(runs)
        summary["pass_at_k"] = {
            str(k): statistics.fmean(pass_at_k(samples, sum(r["correct"]), k) for r in rows)
            for k in sorted({k for k in (1, 2, 4, 8, 16, 32, 64, 100) if k <= samples}
                            | {samples})}
    return summary
