"""Variant against variant on the same problems: accuracy drop, recovery, language retention.

The paper's claim is relative: Caprese wins back most of what the efficient method loses.
So the report states, per method and math task, the method's drop from the full model and
each Caprese variant's difference from its method, with paired 95% intervals (same problems,
per-problem verdicts), and the share of the drop each Caprese variant recovers:
(Caprese - method) / (full - method).

Intervals come from a paired bootstrap that resamples whole groups of problems: variants of
one GSM-Symbolic template share their structure, so their verdicts are not independent and
resampling them one by one would give intervals too narrow. Problems of other sets form a
group each.
"""

from __future__ import annotations

import gzip
import json
import random
from collections import defaultdict
from pathlib import Path

from caprese.evaluate.variant import KINDS

CAPRESE_KINDS = KINDS[2:]  # layerwise, e2e, caprese (an adapter of unrecorded stage)


def accuracy(summary: dict) -> float:
    """The accuracy a comparison uses: the mean over runs when several samples were drawn
    per problem (the thinking protocol's 4 runs), else the greedy answer's."""
    return summary.get("mean_accuracy", summary["accuracy"])


def verdicts(result: dict, path: str | Path) -> dict[str, float] | None:
    """Per-problem scores from the records file beside a result JSON (or its gzip-compressed
    copy, FILE.gz, as results kept in a repository are): the share of the problem's samples
    answered correctly (1 or 0 for one sample), so that their mean is accuracy()."""
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
    return {str(row["id"]): sum(map(bool, row["correct"])) / len(row["correct"]) for row in rows}


BOOTSTRAP_DRAWS = 10_000


def problem_group(problem_id: str) -> str:
    """The resampling unit of a problem: its GSM-Symbolic template ("gsm-symbolic/0007" for
    the original and every variant "gsm-symbolic/0007/0-2"), else the problem itself."""
    parts = problem_id.split("/")
    return "/".join(parts[:2]) if parts[0] == "gsm-symbolic" and len(parts) > 1 else problem_id


def _grouped(scores: dict[str, float]) -> dict[str, list[float]]:
    groups: dict[str, list[float]] = defaultdict(list)
    for key, value in scores.items():
        groups[problem_group(key)].append(value)
    return groups


def _resampled(groups: list, draws: int, seed: int):
    """Each bootstrap draw: as many groups as there are, drawn with replacement. Seeded, so a
    report is reproducible."""
    rng = random.Random(seed)
    for _ in range(draws):
        yield rng.choices(groups, k=len(groups))


def _percentiles(values: list[float]) -> tuple[float, float]:
    values = sorted(values)
    return values[int(0.025 * len(values))], values[int(0.975 * len(values)) - 1]


def paired_bootstrap(a: dict[str, float], b: dict[str, float], draws: int = BOOTSTRAP_DRAWS,
                     seed: int = 0) -> tuple[float, float, float, int]:
    """mean(a - b) over shared problems with a 95% percentile interval from a bootstrap over
    problem groups (problem_group): (diff, low, high, n)."""
    shared = sorted(a.keys() & b.keys())
    if len(shared) < 2:
        raise ValueError("a paired difference needs at least two shared problems")
    groups = _grouped({key: float(a[key]) - float(b[key]) for key in shared})
    sums = [(sum(diffs), len(diffs)) for diffs in groups.values()]
    means = [sum(d for d, _ in drawn) / sum(n for _, n in drawn)
             for drawn in _resampled(sums, draws, seed)]
    low, high = _percentiles(means)
    return sum(d for d, _ in sums) / len(shared), low, high, len(shared)


# What makes two variants the same efficient method: a Caprese row pairs only with its own
# method's run (CATS at 0.3 is not CATS at 0.5). A key one result lacks (older files) is not
# compared, except GRIFFIN's rho: results record it only when set, so a missing one is "never".
METHOD_KEYS = ("method", "density")


def same_method(first: dict, second: dict) -> bool:
    return (all(first[key] == second[key] for key in METHOD_KEYS
                if key in first and key in second)
            and first.get("reselect_every") == second.get("reselect_every"))


def recovered_interval(full: dict[str, float], method: dict[str, float],
                       caprese: dict[str, float], draws: int = BOOTSTRAP_DRAWS,
                       seed: int = 0) -> list[float] | None:
    """95% interval of the recovered share, (Caprese - method) / (full - method), from the
    same resampling of problem groups, all three variants drawn together. None when some
    draw's drop is 0 or below: the share is then undefined, and the interval unbounded."""
    # sorted: a set of strings iterates in an order that changes with each process's hash
    # seed, and the groups' order decides which ones each seeded draw picks
    shared = sorted(full.keys() & method.keys() & caprese.keys())
    gained = _grouped({key: float(caprese[key]) - float(method[key]) for key in shared})
    lost = _grouped({key: float(full[key]) - float(method[key]) for key in shared})
    sums = [(sum(gained[group]), sum(lost[group])) for group in gained]
    shares = []
    for drawn in _resampled(sums, draws, seed):
        drop = sum(d for _, d in drawn)
        if drop <= 0:
            return None
        shares.append(sum(g for g, _ in drawn) / drop)
    return list(_percentiles(shares))


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
        full_accuracy = accuracy(full[0][0]["summary"])
        for method_result, method_path in entries:
            variant = method_result["variant"]
            if variant.get("kind") != "method":
                continue
            method_accuracy = accuracy(method_result["summary"])
            method_verdicts = verdicts(method_result, method_path)
            drop = None
            if full_verdicts and method_verdicts:
                drop = paired_bootstrap(full_verdicts, method_verdicts)
            for caprese_result, caprese_path in entries:
                caprese_variant = caprese_result["variant"]
                if (caprese_variant.get("kind") not in CAPRESE_KINDS
                        or not same_method(caprese_variant, variant)):
                    continue
                caprese_verdicts = verdicts(caprese_result, caprese_path)
                versus = None
                if method_verdicts and caprese_verdicts:
                    versus = paired_bootstrap(caprese_verdicts, method_verdicts)
                gap = full_accuracy - method_accuracy
                share = None
                if drop is not None and drop[1] > 0 and caprese_verdicts:
                    share = recovered_interval(full_verdicts, method_verdicts, caprese_verdicts)
                caprese_accuracy = accuracy(caprese_result["summary"])
                gained = caprese_accuracy - method_accuracy
                rows.append({
                    "task": task, "method": variant["label"], "caprese": caprese_variant["label"],
                    "full": full_accuracy, "method_accuracy": method_accuracy,
                    "caprese_accuracy": caprese_accuracy,
                    "drop": gap, "drop_ci95": None if drop is None else [drop[1], drop[2]],
                    "drop_significant": None if drop is None else drop[1] > 0,
                    "versus_method": gained,
                    "versus_method_ci95": None if versus is None else [versus[1], versus[2]],
                    "significantly_below_method": None if versus is None else versus[2] < 0,
                    "recovered": gained / gap if gap > 0 else None,
                    "recovered_ci95": share,
                })
    return rows


def _interval(ci: list[float] | None) -> str:
    return ("n/a (no per-problem records)" if ci is None
            else f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]")


def recovery_table(rows: list[dict]) -> str:
    lines = ["| task | method | Caprese | full | method | Caprese | drop [paired 95% CI] "
             "| Caprese - method [paired 95% CI] | recovered |", "|---" * 9 + "|"]
    for r in rows:
        recovered = ("n/a (no drop)" if r["recovered"] is None
                     else f"{100 * r['recovered']:.0f}%")
        if r.get("recovered_ci95"):
            recovered += " [{:.0f}, {:.0f}]".format(*(100 * x for x in r["recovered_ci95"]))
        if r["drop_significant"] is False:
            recovered += " (drop within its interval)"
        versus = f"{100 * r['versus_method']:+.1f} {_interval(r['versus_method_ci95'])}"
        if r["significantly_below_method"]:
            versus = f"**{versus}: significantly below the method**"
        lines.append(f"| {r['task']} | {r['method']} | {r['caprese']} | {100 * r['full']:.1f} "
                     f"| {100 * r['method_accuracy']:.1f} | {100 * r['caprese_accuracy']:.1f} "
                     f"| {100 * r['drop']:.1f} {_interval(r['drop_ci95'])} | {versus} "
                     f"| {recovered} |")
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
