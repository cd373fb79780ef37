"""`caprese report` from fixture result files: table, recovery, retention, plots, bad input."""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from caprese.cli import main
from caprese.evaluate.compare import paired_bootstrap, problem_group
from caprese.evaluate.math import summarize
from caprese.evaluate.report import build_report

FULL = {"kind": "full", "method": "", "label": "full"}
GRIFFIN = {"kind": "method", "method": "griffin", "density": 0.5, "label": "GRIFFIN"}
CAPRESE = {"kind": "layerwise", "method": "griffin", "label": "Caprese(GRIFFIN)"}


def math_result(folder, name, variant, correct_ids, problems=10):
    rows = [{"id": f"p{i}", "level": 1 + i % 2, "correct": [i in correct_ids],
             "tokens": [100 + 10 * i], "truncated": [False]} for i in range(problems)]
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = {"task": "gsm-symbolic-all", "variant": variant, "summary": summarize(rows, 1),
              "records_file": f"{name}.jsonl",
              "setup": {"command": f"caprese eval --label {name}", "weights": "w",
                        **({"machine": "Some CPU (AVX512)"} if name == "caprese" else {})}}
    path = folder / f"{name}.json"
    path.write_text(json.dumps(result))
    return path


def xsum_result(folder, name, variant, rouge_l, articles=50):
    path = folder / f"xsum{articles}-{name}.json"
    path.write_text(json.dumps({"task": "xsum", "variant": variant, "summary": {
        "articles": articles, "rouge1": rouge_l + 5, "rouge2": rouge_l - 10, "rougeL": rouge_l,
        "mean_length": 30.0}}))
    return path


def fixture_results(folder):
    return [math_result(folder, "full", FULL, set(range(8))),
            math_result(folder, "griffin", GRIFFIN, set(range(4))),
            math_result(folder, "caprese", CAPRESE, set(range(7))),
            xsum_result(folder, "full", FULL, 25.0),
            xsum_result(folder, "caprese", CAPRESE, 24.4)]


def test_paired_bootstrap_agrees_with_the_normal_interval_for_independent_problems():
    rng = random.Random(1)
    a = {f"p{i}": rng.random() < 0.7 for i in range(400)}
    b = {f"p{i}": rng.random() < 0.5 for i in range(400)}
    diff, low, high, n = paired_bootstrap(a, b, draws=4000)
    diffs = [int(a[k]) - int(b[k]) for k in a]
    half = 1.96 * statistics.stdev(diffs) / len(diffs) ** 0.5
    assert n == 400 and diff == pytest.approx(statistics.fmean(diffs))
    assert low == pytest.approx(diff - half, abs=0.01)
    assert high == pytest.approx(diff + half, abs=0.01)
    assert paired_bootstrap(a, b, draws=4000) == (diff, low, high, n)  # seeded


def test_paired_bootstrap_resamples_whole_templates():
    """Four variants of a template that always agree carry one template's worth of evidence:
    the interval must be as wide as for the originals alone, not half as wide."""
    rng = random.Random(2)
    per_template = {t: (rng.random() < 0.7, rng.random() < 0.5) for t in range(50)}
    ids = {f"gsm-symbolic/{t:04d}" + suffix: t for t in range(50)
           for suffix in ("", "/0-0", "/0-1", "/0-2")}
    a = {i: per_template[t][0] for i, t in ids.items()}
    b = {i: per_template[t][1] for i, t in ids.items()}
    originals = {i: v for i, v in a.items() if i.count("/") == 1}
    _, low, high, n = paired_bootstrap(a, b)
    _, low_1, high_1, _ = paired_bootstrap(originals, {i: b[i] for i in originals})
    assert n == 200
    assert high - low == pytest.approx(high_1 - low_1, rel=0.15)
    assert problem_group("gsm-symbolic/0007/0-2") == problem_group("gsm-symbolic/0007")
    assert problem_group("math500/3") == "math500/3"
    with pytest.raises(ValueError, match="two shared problems"):
        paired_bootstrap({"x": True}, {"y": False})


def share_verdicts() -> tuple[list[str], dict, dict, dict]:
    """Problem ids and the full, method and Caprese verdicts of a method that loses most."""
    rng = random.Random(3)
    ids = [f"gsm-symbolic/{t:04d}" + suffix for t in range(50) for suffix in ("", "/0-0")]
    full = {i: float(rng.random() < 0.8) for i in ids}
    method = {i: float(full[i] and rng.random() < 0.3) for i in ids}  # loses most of them
    caprese = {i: float(full[i] and (method[i] or rng.random() < 0.7)) for i in ids}
    return ids, full, method, caprese


def test_the_recovered_share_has_an_interval_only_where_the_drop_stays_above_zero():
    from caprese.evaluate.compare import recovered_interval

    ids, full, method, caprese = share_verdicts()
    low, high = recovered_interval(full, method, caprese, draws=2000)
    share = (sum(caprese.values()) - sum(method.values())) / (
        sum(full.values()) - sum(method.values()))
    assert 0 < low < share < high < 1
    assert recovered_interval(full, method, caprese, draws=2000) == [low, high]  # seeded
    same = {i: full[i] for i in ids[:4]}  # a drop of 0 in every draw
    assert recovered_interval(same, same, same, draws=100) is None


SHARE_SCRIPT = """
from test_report import share_verdicts
from caprese.evaluate.compare import recovered_interval
print(recovered_interval(*share_verdicts()[1:], draws=500))
"""


def test_the_recovered_share_is_the_same_in_every_process():
    """A report regenerated from the same files gives the same intervals: Python's string
    hashes (and so a set's order) change with each process's hash seed."""
    outputs = {subprocess.run([sys.executable, "-c", SHARE_SCRIPT], check=True, text=True,
                              capture_output=True, cwd=Path(__file__).parent,
                              env={**os.environ, "PYTHONHASHSEED": seed}
                              ).stdout for seed in ("1", "2", "3")}
    assert len(outputs) == 1, outputs


def test_report_has_the_table_recovery_retention_and_plots(tmp_path):
    paths = fixture_results(tmp_path)
    (tmp_path / "intro.md").write_text("Setup: a fixture.\n")
    report = build_report(paths, tmp_path / "report.md", intro=tmp_path / "intro.md",
                          title="Fixture results")
    text = report.read_text()
    assert text.startswith("# Fixture results\n\nSetup: a fixture.\n")
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    labels = [row.split("|")[1].strip() for row in rows[1:4]]
    assert labels == ["full", "GRIFFIN", "Caprese(GRIFFIN)"]  # Table 4 order
    assert "80.0 [" in text and "40.0 [" in text and "70.0 [" in text
    recovery = json.loads((tmp_path / "report.json").read_text())["recovery"]
    assert len(recovery) == 1
    assert recovery[0]["recovered"] == pytest.approx(0.75)
    assert recovery[0]["drop_significant"] is True
    assert recovery[0]["versus_method"] == pytest.approx(0.3)
    assert recovery[0]["significantly_below_method"] is False
    assert "| 75% |" in text
    assert "| Caprese(GRIFFIN) | 50 | 29.40 | 14.40 | 24.40 | -0.60 |" in text
    assert (tmp_path / "report_accuracy.png").stat().st_size > 1000
    assert (tmp_path / "report_length_by_level.png").stat().st_size > 1000
    assert "caprese eval --label griffin`; w\n" in text  # no machine recorded: none shown
    assert "caprese eval --label caprese`; w; on Some CPU (AVX512)\n" in text


def test_xsum_runs_compare_only_with_the_full_run_on_the_same_articles(tmp_path):
    paths = [xsum_result(tmp_path, "full", FULL, 25.0, articles=16),
             xsum_result(tmp_path, "caprese", CAPRESE, 24.4, articles=16),
             xsum_result(tmp_path, "full", FULL, 20.0, articles=200),
             xsum_result(tmp_path, "caprese", CAPRESE, 20.5, articles=200),
             xsum_result(tmp_path, "griffin", GRIFFIN, 21.0, articles=200)]
    text = build_report(paths, tmp_path / "report.md").read_text()
    assert "| Caprese(GRIFFIN) | 200 | 25.50 | 10.50 | 20.50 | +0.50 |" in text
    assert "| Caprese(GRIFFIN) | 16 | 29.40 | 14.40 | 24.40 | -0.60 |" in text
    assert "| GRIFFIN | 200 | 26.00 | 11.00 | 21.00 | +1.00 |" in text
    # the main table shows the larger run of each variant
    assert "R-1/2/L 25.5/10.5/20.5 (200 articles)" in text and "(16 articles)" not in text
    lone = build_report(paths[:2] + paths[4:], tmp_path / "lone.md").read_text()
    assert "| GRIFFIN | 200 | 26.00 | 11.00 | 21.00 | n/a (no full run on these articles) |" \
        in lone


def test_a_caprese_row_significantly_below_its_method_is_flagged(tmp_path):
    paths = [math_result(tmp_path, "full", FULL, set(range(10))),
             math_result(tmp_path, "griffin", GRIFFIN, set(range(9))),
             math_result(tmp_path, "caprese", CAPRESE, set())]
    text = build_report(paths, tmp_path / "report.md").read_text()
    recovery = json.loads((tmp_path / "report.json").read_text())["recovery"]
    assert recovery[0]["significantly_below_method"] is True
    assert recovery[0]["versus_method_ci95"][1] < 0
    assert "significantly below the method**" in text


def test_recovery_without_records_has_no_interval(tmp_path):
    paths = fixture_results(tmp_path)[:3]
    (tmp_path / "griffin.jsonl").unlink()
    build_report(paths, tmp_path / "report.md")
    recovery = json.loads((tmp_path / "report.json").read_text())["recovery"]
    assert recovery[0]["drop_ci95"] is None and recovery[0]["versus_method_ci95"] is None
    assert "n/a (no per-problem records)" in (tmp_path / "report.md").read_text()


def test_report_shows_lm_eval_results(tmp_path):
    path = tmp_path / "lm.json"
    path.write_text(json.dumps({"task": "lm-eval:tiny", "variant": FULL, "summary": {
        "tiny": {"alias": "tiny", "acc,none": 0.625, "acc_stderr,none": 0.1}}}))
    text = build_report([path], tmp_path / "report.md").read_text()
    assert "tiny acc 0.625" in text and "stderr" not in text


def test_bad_result_file_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hello": 1}))
    assert main(["report", str(bad), "--out", str(tmp_path / "r.md")]) == 2
    assert "is not a caprese eval result" in capsys.readouterr().err
    assert not (tmp_path / "r.md").exists()


def test_runs_are_compared_by_their_mean_over_samples(tmp_path):
    """With several samples per problem (the thinking protocol), the recovery table pairs
    each problem's share of correct samples, and its accuracies are the means over runs."""
    def sampled(name, variant, correct):  # correct: problem -> verdicts of its 4 samples
        rows = [{"id": f"p{i}", "level": None, "correct": verdict, "tokens": [50] * 4,
                 "truncated": [False] * 4} for i, verdict in enumerate(correct)]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"task": "aime24", "variant": variant,
                                    "summary": summarize(rows, 4),
                                    "records_file": f"{name}.jsonl", "setup": {}}))
        return path

    first_wrong = [False, True, True, True]  # the first sample alone would say 0%
    paths = [sampled("full", FULL, [first_wrong] * 8 + [[True] * 4] * 2),
             sampled("griffin", GRIFFIN, [[False] * 4] * 10),
             sampled("caprese", CAPRESE, [[False, False, True, True]] * 10)]
    report = build_report(paths, tmp_path / "report.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| aime24 | GRIFFIN"))
    cells = [cell.strip() for cell in row.split("|")[1:-1]]
    assert cells[3:6] == ["80.0", "0.0", "50.0"]  # means over the 4 runs
    assert cells[6].startswith("80.0 [") and cells[7].startswith("+50.0 [50.0, 50.0]")
    assert cells[8].startswith("62% [")  # the recovered share and its interval


def paired_rows(folder, variants: dict[str, tuple[dict, set[int]]]) -> list[tuple[str, str]]:
    """The (method, Caprese) pairs of the report over the full model and these runs."""
    paths = [math_result(folder, "full", FULL, set(range(8)))]
    paths += [math_result(folder, name, variant, correct)
              for name, (variant, correct) in variants.items()]
    build_report(paths, folder / "report.md")
    recovery = json.loads((folder / "report.json").read_text())["recovery"]
    return sorted((r["method"], r["caprese"]) for r in recovery)


def test_a_caprese_row_pairs_only_with_its_own_density(tmp_path):
    low = {**GRIFFIN, "density": 0.3, "label": "GRIFFIN-0.3"}
    assert paired_rows(tmp_path, {
        "griffin": (GRIFFIN, set(range(6))),
        "griffin-low": (low, set(range(2))),
        "caprese": ({**CAPRESE, "density": 0.5}, set(range(7))),
        "caprese-low": ({**CAPRESE, "density": 0.3, "label": "Caprese(GRIFFIN-0.3)"},
                        set(range(5)))}) == [
        ("GRIFFIN", "Caprese(GRIFFIN)"), ("GRIFFIN-0.3", "Caprese(GRIFFIN-0.3)")]


def test_a_caprese_row_pairs_only_with_its_own_reselection(tmp_path):
    """Results record GRIFFIN's rho only when set: a GRIFFIN run without it is "never", and a
    Caprese row with rho = 32 pairs with GRIFFIN at rho = 32 only."""
    assert paired_rows(tmp_path, {
        "griffin": (GRIFFIN, set(range(4))),
        "griffin-32": ({**GRIFFIN, "reselect_every": 32, "label": "GRIFFIN rho=32"},
                       set(range(6))),
        "caprese": ({**CAPRESE, "density": 0.5}, set(range(7))),
        "caprese-32": ({**CAPRESE, "density": 0.5, "reselect_every": 32,
                        "label": "Caprese rho=32"}, set(range(7)))}) == [
        ("GRIFFIN", "Caprese(GRIFFIN)"), ("GRIFFIN rho=32", "Caprese rho=32")]
