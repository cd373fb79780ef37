"""Teacher-written continuations: the dense model's own greedy text, cached and resumable."""

from __future__ import annotations

import copy

import pytest
import torch

import caprese
import caprese.distillation.teacher_text as teacher_text
from caprese.distillation.run import claim_run_dir
from caprese.distillation.teacher_text import teacher_continuations
from caprese.samples import TrainingSample
from tests.conftest import tiny_model
from tests.helpers import randomize_lowrank, word_tokenizer

MAX_LENGTH = 20


def samples(count: int = 5) -> list[TrainingSample]:
    generator = torch.Generator().manual_seed(4)
    out = []
    for i in range(count):
        boundary = 4 + i
        ids = torch.randint(4, 96, (boundary + 6,), generator=generator).tolist()
        out.append(TrainingSample(tuple(ids), boundary, "gsm8k", f"gsm8k/{i}"))
    return out


def dense_greedy(model, sample: TrainingSample) -> list[int]:
    """One prompt at a time, the original model, transformers' own generate."""
    prompt = torch.tensor([sample.input_ids[: sample.boundary]])
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=MAX_LENGTH - sample.boundary,
                             do_sample=False, pad_token_id=0, eos_token_id=2)
    generated = out[0, sample.boundary:].tolist()
    return generated[: generated.index(2) + 1] if 2 in generated else generated


@pytest.fixture
def models():
    original = tiny_model("llama")
    attached = caprese.attach(copy.deepcopy(original),
                              caprese.CapreseConfig(method="griffin", density=0.5, rank=4))
    randomize_lowrank(attached, scale=0.5)  # the compressed model writes other text
    return original, attached


def test_continuations_are_the_dense_models_greedy_text_batched_like_one_by_one(models, tmp_path):
    original, attached = models
    given = samples()
    got = teacher_continuations(attached, word_tokenizer(), given, MAX_LENGTH,
                                tmp_path / "cache.jsonl", batch_size=3)
    assert [s.id for s in got] == [s.id for s in given]
    for before, after in zip(given, got, strict=True):
        assert after.boundary == before.boundary
        assert after.input_ids[: after.boundary] == before.input_ids[: before.boundary]
        assert list(after.input_ids[after.boundary:]) == dense_greedy(original, before)
        assert len(after.input_ids) <= MAX_LENGTH
    # not the compressed model's text: the split phase would have decoded something else
    assert any(list(a.input_ids) != list(b.input_ids) for a, b in zip(got, given, strict=True))


def test_a_rerun_reads_the_cache_and_regenerates_only_a_torn_line(models, tmp_path, monkeypatch):
    _, attached = models
    cache = tmp_path / "cache.jsonl"
    first = teacher_continuations(attached, word_tokenizer(), samples(), MAX_LENGTH, cache,
                                  batch_size=2)
    lines = cache.read_text().splitlines()
    cache.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])

    generated = []
    real = teacher_text.generate

    def counting(model, tokenizer, prompts, settings, **kwargs):
        generated.extend(prompts)
        return real(model, tokenizer, prompts, settings, **kwargs)

    monkeypatch.setattr(teacher_text, "generate", counting)
    again = teacher_continuations(attached, word_tokenizer(), samples(), MAX_LENGTH, cache,
                                  batch_size=2)
    assert len(generated) == 1 and again == first
    generated.clear()
    assert teacher_continuations(attached, word_tokenizer(), samples(), MAX_LENGTH, cache) == first
    assert generated == []


def test_a_changed_prompt_or_budget_is_not_served_from_the_cache(models, tmp_path):
    _, attached = models
    cache = tmp_path / "cache.jsonl"
    teacher_continuations(attached, word_tokenizer(), samples(2), MAX_LENGTH, cache)
    changed = [TrainingSample((5,) + s.input_ids[1:], s.boundary, s.source, s.id)
               for s in samples(2)]
    teacher_continuations(attached, word_tokenizer(), changed, MAX_LENGTH, cache)
    assert len(cache.read_text().splitlines()) == 4
    teacher_continuations(attached, word_tokenizer(), changed, MAX_LENGTH + 4, cache)
    assert len(cache.read_text().splitlines()) == 6  # another budget: generated again


def test_an_existing_run_is_refused_before_any_generation(tmp_path):
    (tmp_path / "run.json").write_text('{"caprese": {}, "settings": {}}')
    with pytest.raises(ValueError, match="--resume"):
        claim_run_dir(tmp_path, resume=False)
    claim_run_dir(tmp_path, resume=True)
    claim_run_dir(tmp_path / "new", resume=False)


def test_runs_share_one_cache_file_and_a_foreign_file_is_refused(tmp_path, tiny_dir, monkeypatch,
                                                                   capsys):
    from caprese.cli import main

    cache = tmp_path / "shared" / "teacher_text.jsonl"
    args = ["distill", "--model", str(tiny_dir), "--rank", "4", "--data", "gsm8k",
            "--samples", "8", "--held-out", "4", "--max-length", "96", "--stages", "layerwise",
            "--teacher-text", str(cache)]
    assert main([*args, "--method", "griffin", "--out", str(tmp_path / "griffin")]) == 0
    written = cache.read_text()
    assert len(written.splitlines()) == 6 + 3  # 3/4 of train and held-out are math prompts
    assert not (tmp_path / "griffin" / "teacher_text.jsonl").exists()

    def no_generation(*args, **kwargs):
        raise AssertionError("the shared cache held every prompt: nothing to generate")

    monkeypatch.setattr(teacher_text, "generate", no_generation)
    assert main([*args, "--method", "cats", "--out", str(tmp_path / "cats")]) == 0
    assert cache.read_text() == written

    foreign = tmp_path / "notes.jsonl"
    foreign.write_text('{"note": "mine"}\n{"note": "also mine"}\n')
    capsys.readouterr()
    assert main([*args[:-1], str(foreign), "--method", "cats", "--out",
                 str(tmp_path / "other")]) == 2
    assert "not a teacher-text cache" in capsys.readouterr().err
    assert foreign.read_text() == '{"note": "mine"}\n{"note": "also mine"}\n'
