"""The default recipe's safeguards: do no harm, general text kept apart from evaluation, and the
GSM-style test set kept apart from training."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model
from distill_job import tiny_samples
from helpers import randomize_lowrank, word_tokenizer

import caprese
import caprese.distillation.harm as harm
import caprese.distillation.layerwise as layerwise
from caprese import data
from caprese.capture import capture
from caprese.cli import main
from caprese.data import general, gsm_symbolic
from caprese.data.mixture import build_mixture
from caprese.distillation import DistillJob, DistillSettings, distill
from caprese.distillation.checkpoint import load_checkpoint
from caprese.distillation.harm import adapter_check, keep_helpful, path_off, rank_candidates
from caprese.distillation.stats import RegressionStats
from caprese.divergence import batch_divergence
from caprese.evaluate.tasks import EvalTask
from caprese.samples import TrainingSample, collate


def test_rank_candidates_halve_an_ordered_fit_and_always_offer_none():
    assert rank_candidates(256, ordered=True) == [256, 128, 64, 32, 16, 8, 0]
    assert rank_candidates(12, ordered=True) == [12, 0]
    assert rank_candidates(256, ordered=False) == [256, 0]


def test_a_layer_whose_path_hurts_is_dropped_and_the_others_kept(tmp_path, monkeypatch):
    """Planted: layer 1's fit is replaced by a large random map, which only adds error."""
    real = layerwise.solve_closed_form
    calls = []

    def planted(stats, rank, ridge=1e-4):
        left, right = real(stats, rank, ridge)
        calls.append(len(calls))
        if len(calls) == 2:  # the second layer
            generator = torch.Generator().manual_seed(3)
            left = torch.randn(left.shape, generator=generator)
            right = torch.randn(right.shape, generator=generator)
        return left, right

    monkeypatch.setattr(layerwise, "solve_closed_form", planted)
    model = caprese.attach(tiny_model("llama"), caprese.CapreseConfig(method="cats", rank=4))
    summary = distill(model, tiny_samples(48), tmp_path, DistillSettings(),
                      held_out=tiny_samples(16, seed=7))
    kept = summary["kept"]
    assert kept["dropped"] == [1]
    assert 0 in kept["full_rank"] + [int(k) for k in kept["reduced"]]
    blocks = caprese.blocks(model)
    assert torch.count_nonzero(blocks[1].L) == torch.count_nonzero(blocks[1].R) == 0
    assert torch.count_nonzero(blocks[0].R) > 0
    rows = summary["stages"]["layerwise"]["layers"]
    assert rows[1]["kept_rank"] == 0 and rows[1]["held_out_full_rank"] > 1.0
    assert rows[1]["held_out_after"] == pytest.approx(1.0)  # the method alone
    saved = caprese.load(tiny_model("llama"), tmp_path)  # what was written is the cut adapter
    assert torch.count_nonzero(caprese.blocks(saved)[1].R) == 0
    # a dropped layer stays dropped through E2E: its factors get zero gradients
    e2e = distill(model, tiny_samples(16), tmp_path / "e2e",
                  DistillSettings(stages=("e2e",), e2e_epochs=1, e2e_batch=8))
    assert torch.count_nonzero(caprese.blocks(model)[1].L) == 0
    assert e2e["stages"]["e2e"]["losses"]


def test_keep_helpful_picks_the_best_held_out_prefix_rank():
    model = caprese.attach(tiny_model("llama"), caprese.CapreseConfig(method="cats", rank=16))
    train, held = ({i: RegressionStats.zeros(32) for i in caprese.blocks(model)} for _ in "ab")
    for part, samples in ((train, tiny_samples(24)), (held, tiny_samples(24, seed=9))):
        for start in range(0, len(samples), 8):
            capture(model, collate(samples[start:start + 8]),
                    lambda i, x, y, part=part: part[i].add(x, y))
    for index, block in caprese.blocks(model).items():
        left, right = layerwise.solve_closed_form(train[index], 16, 1e-6)
        with torch.no_grad():
            block.L.copy_(left)
            block.R.copy_(right)
    products = {i: (b.L.detach().clone(), b.R.detach().clone())
                for i, b in caprese.blocks(model).items()}
    rows = keep_helpful(model, held, ordered=True)
    for row in rows:
        left, right = products[row["layer"]]
        errors = {k: held[row["layer"]].relative_error(left[:, :k] @ right[:k]) if k else 1.0
                  for k in (16, 8, 0)}
        assert row["held_out_kept"] == pytest.approx(min(errors.values()))
        assert row["kept_rank"] in errors


def test_adapter_check_compares_with_the_method_alone_and_restores_the_path():
    model = caprese.attach(tiny_model("llama"), caprese.CapreseConfig(method="griffin", rank=4))
    randomize_lowrank(model, scale=2.0)  # a path that can only hurt
    before = {i: b.R.detach().clone() for i, b in caprese.blocks(model).items()}
    held = tiny_samples(8, seed=5)
    check = adapter_check(model, held, batch_size=4)
    assert check["worse_than_method"] is True
    assert check["math"]["kl_caprese"] > check["math"]["kl_method"] > 0
    for index, block in caprese.blocks(model).items():
        assert torch.equal(block.R, before[index])
    with path_off(model):  # R = 0 is the efficient method: the same KL as with a zero path
        alone = batch_divergence(model, collate(held[:4]))
    zero = caprese.attach(tiny_model("llama"), caprese.CapreseConfig(method="griffin", rank=4))
    assert batch_divergence(zero, collate(held[:4]))["kl"] == pytest.approx(alone["kl"])


def test_a_killed_adapter_check_resumes_to_the_same_verdict(tmp_path, monkeypatch):
    """One teacher pass per batch serves both students; the sums are checkpointed (here after
    every batch: minutes ~ 0) and a rerun scores only the batches after the checkpoint."""
    model = caprese.attach(tiny_model("llama"), caprese.CapreseConfig(method="cats", rank=4))
    randomize_lowrank(model, scale=0.5)
    held = tiny_samples(6, seed=5) + [TrainingSample(s.input_ids, s.boundary, general.SOURCE)
                                      for s in tiny_samples(6, seed=6)]
    straight = adapter_check(model, held, batch_size=4)
    assert set(straight) == {"math", "general", "worse_than_method"}
    real_teacher, calls = harm.teacher_hidden, []

    def dies_on_the_third_batch(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_teacher(*args)

    monkeypatch.setattr(harm, "teacher_hidden", dies_on_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        adapter_check(model, held, 4, run_dir=tmp_path, checkpoint_minutes=1e-9)
    assert load_checkpoint(tmp_path / "checkpoints", harm.CHECK)[1]["batches"] == 2
    calls.clear()
    resumed = adapter_check(model, held, 4, run_dir=tmp_path, checkpoint_minutes=1e-9)
    assert len(calls) == 2  # math: 2 batches, general: 2 batches; two were saved
    assert resumed == straight


def test_only_the_last_stage_is_checked_against_the_method(tmp_path):
    model = caprese.attach(tiny_model("llama"), caprese.CapreseConfig(method="cats", rank=4))
    summary = distill(model, tiny_samples(16), tmp_path, DistillSettings(
        stages=("layerwise", "e2e"), e2e_batch=8), held_out=tiny_samples(4, seed=3))
    assert "adapter_check" not in summary["stages"]["layerwise"]
    assert summary["adapter_check"] == summary["stages"]["e2e"]["adapter_check"]
    assert not list((tmp_path / "checkpoints").glob(f"{harm.CHECK}*"))  # removed at the end


def test_general_text_is_drawn_from_articles_500_to_999_only():
    articles = general.training_articles(500, seed=0)
    numbers = sorted(int(r.id.rsplit("/", 1)[1]) for r in articles)
    assert numbers == list(range(500, 1000))
    assert all(r.source == general.SOURCE and "Summarize" not in r.prompt for r in articles)
    reserved_bodies = {general.article_body(r) for r in general.reserved(data.load("xsum"))}
    assert not reserved_bodies & {r.prompt for r in articles}
    with pytest.raises(data.CapreseDataError, match="at most"):
        general.training_articles(501, seed=0)


def test_language_evaluations_read_only_the_reserved_articles():
    for task in ("xsum", "fidelity-language"):
        ids = [int(r.id.rsplit("/", 1)[1]) for r in EvalTask(task).records()]
        assert ids == list(range(500))
        with pytest.raises(ValueError, match="reserved XSum articles"):
            EvalTask(task, limit=501)
    plain = EvalTask("fidelity-language", limit=1).records()[0].prompt
    assert not plain.startswith("###") and "Summarize" not in plain


def test_the_default_job_mixes_in_general_text_and_never_a_reserved_article(tmp_path):
    job = DistillJob(caprese.CapreseConfig(method="cats", rank=4), samples=40, held_out=8)
    assert job.continuations == "teacher" and 0 < job.general_share < 1
    assert DistillJob(job.caprese, samples=40, held_out=8, general_share=0.25).counts() == \
        (30, 6, 10, 2)
    with pytest.raises(ValueError, match="general_share"):
        DistillJob(job.caprese, general_share=1.0)


def test_the_test_set_is_200_evaluation_problems_and_no_training_question():
    problems = data.load("gsm-symbolic-test")
    assert len(problems) >= 200
    templates = [r.id.split("/")[1] for r in problems]
    assert set(templates) == set(gsm_symbolic.EVAL_TEMPLATES)
    assert not set(templates) & set(gsm_symbolic.TRAIN_TEMPLATES)
    originals = [r for r in problems if r.id.count("/") == 1]
    assert len(originals) == 50 and len(problems) - len(originals) >= 150

    def normal(text):
        return " ".join(text.lower().split())

    questions = [normal(r.prompt) for r in problems]
    assert len(set(questions)) == len(questions)
    training = {normal(r.prompt) for name in ("gsm8k", "math") for r in data.load(name)}
    training |= {normal(r.prompt) for r in data.load("gsm-symbolic-all")
                 if r.id.split("/")[1] in gsm_symbolic.TRAIN_TEMPLATES}
    assert not training & set(questions)
    assert all(r.answer.strip() for r in problems)


def test_the_test_set_cannot_be_trained_on():
    leaked = data.load("gsm-symbolic-test")[60]
    extra = [data.Record(leaked.prompt, "x", "x", "gsm8k", "gsm8k/planted")]
    with pytest.raises(data.CapreseDataError, match="evaluation problems"):
        build_mixture(word_tokenizer(), ["gsm8k"], n=10, extra=extra)


def test_a_distilled_run_records_the_share_and_reports_against_the_method(tmp_path):
    model = caprese.attach(tiny_model("llama"), caprese.CapreseConfig(method="cats", rank=4))
    summary = distill(model, tiny_samples(32), tmp_path, DistillSettings(),
                      held_out=tiny_samples(8, seed=3))
    check = summary["adapter_check"]
    assert set(check) == {"math", "worse_than_method"}
    assert summary["worse_than_method"] == check["worse_than_method"]
    assert json.loads((tmp_path / "summary.json").read_text())["kept"] == summary["kept"]


def test_distill_prints_what_it_kept_and_how_it_compares_with_the_method(tmp_path, tiny_dir,
                                                                          capsys):
    assert main(["distill", "--model", str(tiny_dir), "--method", "cats", "--rank", "4",
                 "--data", "gsm8k", "--samples", "16", "--held-out", "8", "--max-length", "96",
                 "--stages", "layerwise", "--out", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr()
    out = printed.out + printed.err  # a WARNING (worse than the method) goes to stderr
    assert "kept their full rank" in out and "than CATS alone on held-out text" in out
    assert "math KL" in out and "general KL" in out  # a quarter of the held-out is general
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert (run["continuations"], run["general_share"], run["samples"]) == ("teacher", 0.25, 16)


def full_math_result(folder):
    """A minimal `caprese eval` result for a report to table beside the distill runs."""
    result = folder / "math.json"
    result.write_text(json.dumps({"task": "gsm8k", "variant": {"kind": "full", "label": "full"},
                                  "summary": {"accuracy": 0.5, "ci95": [0.2, 0.8],
                                              "mean_length": 10.0}}))
    return result


def test_the_report_tables_a_distill_run_as_its_summary_says(tmp_path, tiny_dir):
    run = tmp_path / "cats-run"
    assert main(["distill", "--model", str(tiny_dir), "--method", "cats", "--rank", "4",
                 "--data", "gsm8k", "--samples", "16", "--held-out", "8", "--max-length", "96",
                 "--stages", "layerwise", "--out", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    result = full_math_result(tmp_path)
    assert main(["report", str(result), "--out", str(tmp_path / "r.md"),
                 "--distill", str(run)]) == 0
    text = (tmp_path / "r.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| cats-run |"))
    cells = [cell.strip() for cell in row.split("|")[1:-1]]
    assert cells[1].startswith("cats ") and "r = 4" in cells[1]
    assert cells[2].startswith("16 + 8 held out (<= 96 tokens")
    kept, check = summary["kept"], summary["adapter_check"]["math"]
    assert cells[3].startswith(f"{len(kept['full_rank'])}/")
    assert cells[4].startswith(f"{check['kl_method']:.4f} -> {check['kl_caprese']:.4f}")
    assert ("worse than the method alone" in cells[4]) == summary["worse_than_method"]
    assert cells[6].startswith(f"{summary['stages']['layerwise']['seconds'] / 3600:.2f} / -")
    stage_peak = summary["stages"]["layerwise"]["peak_memory_gib"]  # which stage needs it
    assert 0 < stage_peak <= summary["peak_memory_gib"]
    assert cells[7] == f"{summary['peak_memory_gib']:.1f} GiB ({stage_peak:.1f} / -)"


def test_a_folder_that_is_not_a_distill_run_is_a_clear_report_error(tmp_path, capsys):
    result = full_math_result(tmp_path)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "run.json").write_text("{}")
    (tmp_path / "foreign").mkdir()
    for name in ("run.json", "summary.json"):
        (tmp_path / "foreign" / name).write_text('{"hello": 1}')
    for folder in (tmp_path / "missing", tmp_path / "half", tmp_path / "foreign"):
        assert main(["report", str(result), "--out", str(tmp_path / "r.md"),
                     "--distill", str(folder)]) == 2
        assert "is not a finished caprese distill run" in capsys.readouterr().err
    assert not (tmp_path / "r.md").exists()
