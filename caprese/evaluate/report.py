"""`caprese report`: saved result JSON files -> one markdown report with PNG plots.

The table follows the paper's Table 4: one row per model variant (full, method, layer-wise
Caprese, E2E Caprese), one column group per task. Plots: accuracy with 95% intervals,
response length by difficulty level, per-layer MLP error before/after Caprese. With
`--distill`, a table of the distillation runs behind the adapters: data, cut, check, cost.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from caprese.evaluate.compare import CAPRESE_KINDS, recovery_rows, recovery_table, retention_table
from caprese.evaluate.variant import KINDS
from caprese.io import atomic_write_text, json_object_with, refuse_foreign

MARKER = "<!-- written by caprese report -->"  # how a rerun knows the file is its own


def load_results(paths: list[str | Path]) -> list[dict]:
    results = []
    for path in paths:
        try:
            result = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read result file {path}: {error}") from error
        if "task" not in result or "summary" not in result or "variant" not in result:
            raise ValueError(f"{path} is not a caprese eval result (task/variant/summary)")
        results.append(result)
    return results


def _variant_key(result: dict) -> tuple:
    variant = result["variant"]
    kind = variant.get("kind", "method")
    rank = KINDS.index(kind) if kind in KINDS else len(KINDS)
    return (variant.get("method", ""), rank, variant["label"])


def _is_math(summary: dict) -> bool:
    return "accuracy" in summary


def _cell(summary: dict) -> str:
    if all(isinstance(v, dict) for v in summary.values()):  # caprese lm-eval: task -> metrics
        return "; ".join(f"{task} {name.split(',')[0]} {value:.3f}"
                         for task, metrics in summary.items() for name, value in metrics.items()
                         if isinstance(value, float) and "stderr" not in name)
    if "kl" in summary:
        return (f"KL {summary['kl']:.3f}, top-1 {100 * summary['top1']:.1f}%, "
                f"ppl {summary['ppl_student']:.2f} (teacher {summary['ppl_teacher']:.2f})")
    if "rougeL" in summary:
        return (f"R-1/2/L {summary['rouge1']:.1f}/{summary['rouge2']:.1f}/"
                f"{summary['rougeL']:.1f} ({summary['articles']} articles)")
    if "run_accuracies" in summary:  # several runs: their mean and spread (thinking protocol)
        return (f"{100 * summary['mean_accuracy']:.1f} ± {100 * summary['accuracy_std']:.1f} "
                f"({len(summary['run_accuracies'])} runs) / {summary['mean_length']:.0f} tok")
    low, high = summary["ci95"]
    return (f"{100 * summary['accuracy']:.1f} [{100 * low:.1f}, {100 * high:.1f}]"
            f" / {summary['mean_length']:.0f} tok")


def _size(summary: dict) -> int:
    return summary.get("articles") or summary.get("problems") or 0


def table(results: list[dict]) -> str:
    tasks = sorted({r["task"] for r in results})
    rows: dict[str, dict] = defaultdict(dict)
    order: dict[str, tuple] = {}
    for r in results:
        label = r["variant"]["label"]
        kept = rows[label].get(r["task"])
        if kept is None or _size(r["summary"]) > _size(kept):  # the larger run of a repeat
            rows[label][r["task"]] = r["summary"]
        order[label] = _variant_key(r)
    math_tasks = {r["task"] for r in results if _is_math(r["summary"])}
    runs = {r["task"] for r in results if "run_accuracies" in r["summary"]}
    header = "| variant | " + " | ".join(
        (f"{t} (mean acc % ± std over runs / mean length)" if t in runs else
         f"{t} (acc % [95% CI] / mean length)") if t in math_tasks else t for t in tasks) + " |"
    lines = [header, "|---" * (len(tasks) + 1) + "|"]
    for label in sorted(rows, key=order.__getitem__):
        cells = [_cell(rows[label][t]) if t in rows[label] else "" for t in tasks]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pyplot():
    """pyplot on the file-only backend (reports are built on headless machines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, ax, path: Path, legend_size: int) -> bool:
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_accuracy(results: list[dict], path: Path) -> bool:
    plt = _pyplot()
    math_results = [r for r in results if _is_math(r["summary"])]
    if not math_results:
        return False
    tasks = sorted({r["task"] for r in math_results})
    labels = sorted({r["variant"]["label"] for r in math_results},
                    key=lambda lab: next(_variant_key(r) for r in math_results
                                         if r["variant"]["label"] == lab))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(labels) * len(tasks)), 4))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        for j, task in enumerate(tasks):
            found = [r for r in math_results
                     if r["task"] == task and r["variant"]["label"] == label]
            if not found:
                continue
            s = found[0]["summary"]
            if "mean_accuracy" in s:  # several runs: their mean ± std, as in the table
                acc, spread = 100 * s["mean_accuracy"], 100 * s["accuracy_std"]
                error = [[spread], [spread]]
            else:
                acc, (low, high) = 100 * s["accuracy"], s["ci95"]
                error = [[acc - 100 * low], [100 * high - acc]]
            ax.bar(j + i * width, acc, width, color=f"C{i}", label=label if j == 0 else None,
                   yerr=error, capsize=3)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks)
    ax.set_ylabel("accuracy (%)")
    return _save(plt, fig, ax, path, legend_size=8)


def plot_pass_at_k(results: list[dict], path: Path) -> bool:
    """Coverage: the share of problems solved by at least one of k answers, against k."""
    plt = _pyplot()
    sampled = [r for r in results if len(r["summary"].get("pass_at_k", {})) > 1]
    if not sampled:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, r in enumerate(sorted(sampled, key=_variant_key)):
        curve = r["summary"]["pass_at_k"]
        ax.plot([int(k) for k in curve], [100 * v for v in curve.values()], marker="o",
                color=f"C{i}", label=f"{r['variant']['label']} ({r['task']})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k (answers per problem)")
    ax.set_ylabel("pass@k (%)")
    return _save(plt, fig, ax, path, legend_size=8)


def plot_length_by_level(results: list[dict], path: Path) -> bool:
    plt = _pyplot()
    leveled = [r for r in results if r["summary"].get("length_by_level")]
    if not leveled:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, r in enumerate(sorted(leveled, key=_variant_key)):
        levels = r["summary"]["length_by_level"]
        ax.plot([int(k) for k in levels], list(levels.values()), marker="o", color=f"C{i}",
                label=f"{r['variant']['label']} ({r['task']})")
    ax.set_xlabel("difficulty level")
    ax.set_ylabel("mean response tokens")
    return _save(plt, fig, ax, path, legend_size=8)


def plot_layer_errors(results: list[dict], path: Path) -> bool:
    plt = _pyplot()
    fidelity = [r for r in results if r["task"] == "fidelity" and r["summary"].get("layers")]
    # (math fidelity only: the language runs would double every line)
    if not fidelity:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, r in enumerate(sorted(fidelity, key=_variant_key)):
        layers = r["summary"]["layers"]
        xs = [row["layer"] for row in layers]
        ax.plot(xs, [row["caprese_rel_error"] for row in layers], marker="o", color=f"C{i}",
                label=f"{r['variant']['label']}")
        if r["variant"].get("kind") in ("method", *CAPRESE_KINDS):
            ax.plot(xs, [row["method_rel_error"] for row in layers], linestyle="--",
                    color=f"C{i}", alpha=0.5, label=f"{r['variant']['label']}: method alone")
    ax.set_xlabel("layer")
    ax.set_ylabel("||FF - FF+|| / ||FF||")
    return _save(plt, fig, ax, path, legend_size=7)


def load_distill_runs(folders: Sequence[str | Path]) -> list[tuple[Path, dict, dict]]:
    """(folder, run.json, summary.json) of each `caprese distill` run folder (or a copy of
    those two files): what was trained, on what, what it kept and what it cost."""
    runs = []
    for folder in map(Path, folders):
        try:
            run = json.loads((folder / "run.json").read_text())
            summary = json.loads((folder / "summary.json").read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"{folder} is not a finished caprese distill run (it needs "
                             f"run.json and summary.json): {error}") from error
        if "caprese" not in run or "stages" not in summary:
            raise ValueError(f"{folder} is not a finished caprese distill run: its run.json "
                             "and summary.json are not the ones caprese distill writes")
        runs.append((folder, run, summary))
    return runs


def _kept(summary: dict, layers: int) -> str:
    kept = summary.get("kept")
    if kept is None:
        return "no cut (no held-out samples)"
    reduced = ", ".join(f"{layer}: {rank}" for layer, rank in kept.get("reduced", {}).items())
    return (f"{len(kept['full_rank'])}/{layers} full"
            + (f"; reduced {reduced}" if reduced else "")
            + (f"; dropped {kept['dropped']}" if kept["dropped"] else ""))


def _check(summary: dict, part: str) -> str:
    found = summary.get("adapter_check", {}).get(part)
    if not found:
        return ""
    return (f"{found['kl_method']:.4f} -> {found['kl_caprese']:.4f} "
            f"({100 * found['change']:+.0f}%)")


def _layer_span(layers: list[int]) -> str:
    contiguous = layers == list(range(layers[0], layers[-1] + 1))
    return f"layers {layers[0]}-{layers[-1]}" if contiguous else f"layers {layers}"


def distill_table(runs: list[tuple[Path, dict, dict]]) -> str:
    """One row per distillation run: its setting, the do-no-harm cut and check, its cost."""
    lines = ["| run | method | training samples | rank kept (layers) | held-out KL, math: "
             "method -> Caprese | held-out KL, general | layer-wise / E2E hours "
             "| peak memory (by the end of layer-wise / E2E) |",
             "|---" * 8 + "|"]
    for folder, run, summary in runs:
        adapter, stages = run["caprese"], summary["stages"]
        hours = " / ".join(f"{stages[s]['seconds'] / 3600:.2f}" if s in stages else "-"
                           for s in ("layerwise", "e2e"))
        verdict = " **worse than the method alone**" if summary.get("worse_than_method") else ""
        memory = summary.get("peak_memory_gib")
        by_stage = " / ".join(f"{stages[s]['peak_memory_gib']:.1f}" if "peak_memory_gib"
                              in stages.get(s, {}) else "-" for s in ("layerwise", "e2e"))
        lines.append(
            f"| {folder.name} | {adapter['method']} {adapter['density']}, "
            f"{_layer_span(adapter['layers'])}, r = {adapter['rank']} "
            f"| {run['samples']} + {run['held_out']} held out (<= {run['max_length']} tokens, "
            f"{run['continuations']}, general share {run.get('general_share', 0)}) "
            f"| {_kept(summary, len(adapter['layers']))} | {_check(summary, 'math')}{verdict} "
            f"| {_check(summary, 'general')} | {hours} "
            f"| {f'{memory:.1f} GiB' if memory else ''}"
            f"{f' ({by_stage})' if by_stage != '- / -' else ''} |")
    return "\n".join(lines)


def build_report(paths: list[str | Path], out: str | Path, intro: str | Path | None = None,
                 title: str = "Caprese evaluation report",
                 distill_runs: Sequence[str | Path] = ()) -> Path:
    """intro: a markdown file whose text goes between the title and the tables (setup, notes);
    distill_runs: `caprese distill` run folders, tabled with what they kept and cost."""
    out = Path(out)
    stem = out.with_suffix("")
    refuse_foreign(out, out.is_file() and out.read_text(errors="ignore").rstrip()
                   .endswith(MARKER), "a caprese report")
    refuse_foreign(stem.with_suffix(".json"), json_object_with(stem.with_suffix(".json"),
                                                               ("recovery",)),
                   "a caprese report's JSON")
    out.parent.mkdir(parents=True, exist_ok=True)
    results = load_results(paths)
    runs = load_distill_runs(distill_runs)
    sections = [f"# {title}", ""]
    if intro:
        sections += [Path(intro).read_text().strip(), ""]
    sections += [table(results), ""]
    if runs:
        sections += ["## Distillation runs", "",
                     "What each adapter's `caprese distill` run trained on, the rank the "
                     "do-no-harm cut kept per layer, the final check on held-out generated "
                     "text (KL against the original model, the method alone -> with the path) "
                     "and the run's cost (its run.json and summary.json; a teacher-text cache "
                     "made beforehand is not counted).",
                     "", distill_table(runs), ""]
    recovery = recovery_rows(results, paths)
    if recovery:
        sections += ["## Accuracy drop recovered", "",
                     "recovered = (Caprese - method) / (full - method). Intervals: paired "
                     "bootstrap over the same problems (10,000 draws) that resamples whole "
                     "GSM-Symbolic templates (a template's variants are not independent); a "
                     "Caprese row whose interval against its method lies below 0 is marked. "
                     "The recovered share's interval comes from the same draws of all three "
                     "variants; it is given only where no draw's drop reaches 0.",
                     "", recovery_table(recovery), ""]
    retention = retention_table(results)
    if retention:
        sections += ["## Language retention (XSum 1-shot)", "", retention, ""]
    plots = [("accuracy", plot_accuracy, "Math accuracy with 95% intervals"),
             ("pass_at_k", plot_pass_at_k, "Coverage: pass@k"),
             ("length_by_level", plot_length_by_level, "Response length by difficulty level"),
             ("layer_errors", plot_layer_errors, "Per-layer relative MLP error")]
    for name, plot, title in plots:
        image = Path(f"{stem}_{name}.png")
        if plot(results, image):
            sections += [f"## {title}", "", f"![{title}]({image.name})", ""]
    sections += ["## Runs", ""]
    for r, path in zip(results, paths, strict=True):
        setup = r.get("setup", {})
        ran_on = f"; on {setup['machine']}" if setup.get("machine") else ""
        sections.append(f"- `{path}`: {r['variant']['label']} on {r['task']}; "
                        f"command: `{setup.get('command', '?')}`; {setup.get('weights', '')}"
                        + ran_on)
    atomic_write_text(out, "\n".join([*sections, "", MARKER]) + "\n")
    atomic_write_text(stem.with_suffix(".json"), json.dumps({"recovery": recovery}, indent=2))
    return out
