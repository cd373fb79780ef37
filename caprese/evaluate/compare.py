"""Variant against variant on the same problems: accuracy drop, recovery, language retention.

The paper's claim is relative: Caprese wins back most of what the efficient method loses.
So the report states, per method and math task, the method's drop from the full model with
a paired 95% interval (same problems, per-problem verdicts), and the share of it that each
Caprese variant recovers: (Caprese - method) / (full - method).
"""

from __future__ import annotations

import gzip
import json
import math
import statistics
from pathlib import Path

from caprese.evaluate.variant import KINDS

CAPRESE_KINDS = KINDS[2:]  # layerwise, e2e, caprese (an adapter of unrecorded stage)


def verdicts(result: dict, path: str | Path) -> dict[str, bool] | None:
    """Per-problem first-sample verdicts from the records file beside a result JSON (or its
    gzip-compressed copy, FILE.gz, as results kept in a repository are)."""
    if not result.get("records_file"):
        return None
    records = Path(path).with_name(result["records_file"])
    packed = records.with_name(records.name + ".gz")
    if records.is_file():
        text = records.read_text()
    elif packed.is_file():
        text = gzip.decompress(packed.read_bytes()).decode()
    else:
        return None
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return {str(row["id"]): bool(row["correct"][0]) for row in rows}


def paired_difference(a: dict[str, bool], b: dict[str, bool]) -> tuple[float, float, float, int]:
    """mean(a - b) over shared problems with a normal 95% interval: (diff, low, high, n)."""
    shared = sorted(a.keys() & b.keys())
    diffs = [int(a[k]) - int(b[k]) for k in shared]
    if len(diffs) < 2:
        raise ValueError("a paired difference needs at least two shared problems")
    mean = statistics.fmean(diffs)
    half = 1.96 * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return mean, mean - half, mean + half, len(diffs)


def recovery_rows(results: list[dict], paths: list[str | Path]) -> list[dict]:
    """One row per (math task, Caprese variant) that has both a full and a method-alone run."""
    rows = []
    by_task: dict[str, list[tuple[dict, str | Path]]] = {}
    for result, path in zip(results, paths, strict=True):
        if "accuracy" in result["summary"]:
            by_task.setdefault(result["task"], []).append((result, path))
    for task, entries in sorted(by_task.items()):
        full = [e for e in entries if e[0]["variant"].get("kind") == "full"]
        if not full:
            continue
        full_verdicts = verdicts(*full[0])
        full_accuracy = full[0][0]["summary"]["accuracy"]
        for method_result, method_path in entries:
            variant = method_result["variant"]
            if variant.get("kind") != "method":
                continue
            method_accuracy = method_result["summary"]["accuracy"]
            method_verdicts = verdicts(method_result, method_path)
            drop = None
            if full_verdicts and method_verdicts:
                drop = paired_difference(full_verdicts, method_verdicts)
            for caprese_result, _ in entries:
                caprese_variant = caprese_result["variant"]
                if (caprese_variant.get("kind") not in CAPRESE_KINDS
                        or caprese_variant.get("method") != variant.get("method")):
                    continue
                gap = full_accuracy - method_accuracy
                gained = caprese_result["summary"]["accuracy"] - method_accuracy
                rows.append({
                    "task": task, "method": variant["label"], "caprese": caprese_variant["label"],
                    "full": full_accuracy, "method_accuracy": method_accuracy,
                    "caprese_accuracy": caprese_result["summary"]["accuracy"],
                    "drop": gap, "drop_ci95": None if drop is None else [drop[1], drop[2]],
                    "drop_significant": None if drop is None else drop[1] > 0,
                    "recovered": gained / gap if gap > 0 else None,
                })
    return rows


def recovery_table(rows: list[dict]) -> str:
    lines = ["| task | method | Caprese | full | method | Caprese | drop [paired 95% CI] "
             "| recovered |", "|---" * 8 + "|"]
    for r in rows:
        ci = ("n/a (no per-problem records)" if r["drop_ci95"] is None else
              f"[{100 * r['drop_ci95'][0]:.1f}, {100 * r['drop_ci95'][1]:.1f}]")
        recovered = ("n/a (no drop)" if r["recovered"] is None
                     else f"{100 * r['recovered']:.0f}%")
        if r["drop_significant"] is False:
            recovered += " (drop within its interval)"
        lines.append(f"| {r['task']} | {r['method']} | {r['caprese']} | {100 * r['full']:.1f} "
                     f"| {100 * r['method_accuracy']:.1f} | {100 * r['caprese_accuracy']:.1f} "
                     f"| {100 * r['drop']:.1f} {ci} | {recovered} |")
    return "\n".join(lines)


def retention_table(results: list[dict]) -> str | None:
    """ROUGE of every XSum run against the full model's on the same articles (points;
    negative = worse). Runs of different lengths are never compared: --limit N takes the
    first N articles, so only equal counts share their articles."""
    xsum = sorted((r for r in results if "rougeL" in r["summary"]),
                  key=lambda r: -r["summary"]["articles"])
    full = {r["summary"]["articles"]: r["summary"] for r in xsum
            if r["variant"].get("kind") == "full"}
    if not full or len(xsum) < 2:
        return None
    lines = ["| variant | articles | ROUGE-1 | ROUGE-2 | ROUGE-L | ROUGE-L vs full |",
             "|---" * 6 + "|"]
    for r in xsum:
        s = r["summary"]
        base = full.get(s["articles"])
        delta = "n/a (no full run on these articles)" if base is None else \
            f"{s['rougeL'] - base['rougeL']:+.2f}"
        lines.append(f"| {r['variant']['label']} | {s['articles']} | {s['rouge1']:.2f} | "
                     f"{s['rouge2']:.2f} | {s['rougeL']:.2f} | {delta} |")
    return "\n".join(lines)
