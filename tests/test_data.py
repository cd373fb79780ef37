"""Every loader against the offline copies, answer parsing, and the training mixture."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import copy
import hashlib
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from caprese import data
from caprese.data import CapreseDataError, Record, registry
from caprese.evaluate.language import XSUM_STOP
from caprese.extract import last_boxed

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level tokenizer with a ChatML template: exact round trips, no download."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tok.chat_template = CHATML
    return tok


@pytest.mark.parametrize(
    "name, count",
    [("gsm8k", 7473), ("math", 7500), ("math500", 500), ("aime24", 30), ("amc23", 40),
     ("xsum", 1000), ("gsm-symbolic", 50), ("gsm-symbolic-all", 100)],
)  # fmt: skip
def test_counts_and_fields(name, count):
    records = data.load(name)
    assert len(records) == count
    assert len({r.id for r in records}) == count
    for r in records:
        assert r.prompt.strip() and r.source == name
        assert name == "amc23" or r.solution.strip()
    # Two MATH train solutions end in an empty \boxed{} (the copy lost their answer).
    assert sum(not r.answer.strip() for r in records) == (2 if name == "math" else 0)


def test_gsm8k_answers_and_solutions():
    first = data.load("gsm8k")[0]
    assert first.answer == "72"
    assert "<<" not in first.solution and first.solution.endswith("#### 72")
    assert data.gsm8k_answer("so 1,234 in all\n#### 1,234") == "1234"
    assert all(r.answer.lstrip("-").replace(".", "").isdigit() for r in data.load("gsm8k"))
    with pytest.raises(CapreseDataError, match="####"):
        data.gsm8k_answer("no final line")


def test_math_answers_levels_subjects():
    records = data.load("math")
    assert records[0].answer == "0" and records[0].level == 5 and records[0].subject == "Algebra"
    assert {r.level for r in records} == {1, 2, 3, 4, 5, None}  # two rows say "Level ?"
    math500 = data.load("math500")
    agree = sum(last_boxed(r.solution) == r.answer for r in math500)
    assert agree >= 0.95 * len(math500)
    assert all(1 <= r.level <= 5 and r.subject for r in math500)


def test_last_boxed():
    assert last_boxed(r"so \boxed{1} then \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"
    assert last_boxed(r"$\boxed {x^{2}}$") == "x^{2}"
    assert last_boxed(r"is $\boxed 5$") == "5"
    assert last_boxed("no box") is None
    assert last_boxed(r"\boxed{unbalanced") is None


def test_competition_answers_are_normalized():
    assert data.load("amc23")[0].answer == "27"
    aime = data.load("aime24")
    assert aime[0].answer == "204" and all(r.answer.isdigit() for r in aime)
    assert "025" not in {r.answer for r in aime}


def test_xsum_prompts_are_one_shot():
    record = data.load("xsum")[0]
    assert record.prompt.count("###") == 2
    assert record.prompt.rstrip().endswith("Summarize the above article in 1 sentences.")
    assert record.answer == record.solution
    assert XSUM_STOP == ("###",)


def test_gsm_symbolic_is_split_by_template():
    evaluation = data.load("gsm-symbolic")
    everything = data.load("gsm-symbolic-all")
    assert [r.id for r in evaluation] == [f"gsm-symbolic/{i:04d}" for i in range(50)]
    assert evaluation[0].answer == "10" and evaluation[1].answer == "140"
    assert {r.prompt for r in evaluation} < {r.prompt for r in everything}
    assert not set(data.gsm_symbolic.EVAL_TEMPLATES) & set(data.gsm_symbolic.TRAIN_TEMPLATES)


def test_gsm_symbolic_variants_are_new_problems_with_answers():
    variants = data.gsm_symbolic.variants("0050", 20, seed=5)
    assert len(variants) == 20 and {r.source for r in variants} == {"gsm-symbolic-train"}
    assert all(r.answer.lstrip("-").isdigit() and "####" in r.solution for r in variants)
    assert variants[0].id == "gsm-symbolic/0050/5-0"
    assert data.gsm_symbolic.variants("0050", 20, seed=5) == variants
    originals = {r.prompt for r in data.load("gsm-symbolic-all")}
    assert len({r.prompt for r in variants} - originals) > 10
    assert data.gsm_symbolic.variants("0004", 2)[0].source == "gsm-symbolic"


def test_offline_copy_problems_are_reported(monkeypatch, tmp_path):
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path))
    with pytest.raises(CapreseDataError, match="CAPRESE_DATA_DIR"):
        data.load("gsm8k")
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "train.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n')
    with pytest.raises(CapreseDataError, match="sha256"):
        data.load("gsm8k")
    with pytest.raises(CapreseDataError, match="unknown data set"):
        data.load("gsm9k")


def test_default_loader_reads_the_bundled_copies_and_checks_them(monkeypatch, tmp_path):
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    assert data.data_dir() == registry.BUNDLED
    assert registry.BUNDLED.is_relative_to(Path(data.__file__).parent)  # inside the package
    for name, spec in data.DATASETS.items():
        path = registry.BUNDLED / spec.file
        assert hashlib.sha256(path.read_bytes()).hexdigest() == registry.SHA256[spec.file], name
    # A changed bundled file is refused, not read.
    copy_dir = tmp_path / "bundled"
    shutil.copytree(registry.BUNDLED, copy_dir)
    with open(copy_dir / "amc23" / "test.jsonl", "a") as handle:
        handle.write('{"id": 99, "problem": "extra", "answer": "1"}\n')
    monkeypatch.setattr(registry, "BUNDLED", copy_dir)
    assert len(data.load("aime24")) == 30
    with pytest.raises(CapreseDataError, match="sha256"):
        data.load("amc23")


def test_gsm_symbolic_templates_are_bundled_unchanged():
    folder = data.gsm_symbolic.TEMPLATES
    sums = dict(reversed(line.split()) for line in (folder / "SHA256SUMS").read_text().splitlines())
    assert len(sums) == 102  # 100 templates, replacements.json and the test set's variants
    for name, digest in sums.items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name
    assert "MIT" in (folder / "LICENSE").read_text()


def test_a_missing_bundled_file_says_which_and_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    monkeypatch.setattr(registry, "BUNDLED", tmp_path)
    monkeypatch.setitem(sys.modules, "datasets", None)  # no Hub either
    with pytest.raises(CapreseDataError) as error:
        data.load("xsum")
    message = str(error.value)
    assert str(tmp_path / "xsum" / "xsum_1shot.jsonl") in message
    assert "EdinburghNLP/xsum" in message and data.DATA_ENV in message
    assert "pip install datasets" in message and registry.SHA256["xsum/xsum_1shot.jsonl"] in message


def test_a_missing_bundled_file_is_loaded_from_the_hub_when_it_answers(monkeypatch, tmp_path):
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    monkeypatch.setattr(registry, "BUNDLED", tmp_path)
    calls = []

    def load_dataset(source, config, split):
        calls.append((source, config, split))
        return [{"id": 1, "problem": "What is 1+1?", "answer": 2}]

    monkeypatch.setitem(sys.modules, "datasets", SimpleNamespace(load_dataset=load_dataset))
    (record,) = data.load("amc23")
    assert calls == [("math-ai/amc23", None, "test")]
    assert (record.prompt, record.answer, record.source) == ("What is 1+1?", "2", "amc23")


def test_nothing_reads_a_folder_beside_the_checkout():
    """A user's clone has nothing beside it: no code, test, script or CI file may look there."""
    root = Path(__file__).resolve().parents[1]
    needle = "../" + "shared"
    files = [p for folder in ("caprese", "tests", "scripts", ".ci", "benchmarks", "examples")
             for p in (root / folder).rglob("*") if p.is_file() and p.suffix != ".jsonl"]
    offenders = [str(p.relative_to(root)) for p in files
                 if needle in p.read_text(errors="ignore")]
    assert offenders == []


def test_local_file_and_hub_sources(monkeypatch, tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps({"question": "What is 1+1?", "answer": "1+1=2\n#### 2"}) + "\n")
    (record,) = data.load("gsm8k", path)
    assert (record.source, record.answer) == ("gsm8k-test", "2")
    assert {"gsm8k-test", "math-test"} < data.EVALUATION_SETS

    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(CapreseDataError, match="pip install datasets"):
        data.load("gsm8k", "openai/gsm8k")

    calls = []

    def load_dataset(source, config, split):
        calls.append((source, config, split))
        return [{"document": f"doc {i}", "summary": f"sum {i}"} for i in range(3)]

    monkeypatch.setitem(sys.modules, "datasets", SimpleNamespace(load_dataset=load_dataset))
    xsum = data.load("xsum", "EdinburghNLP/xsum")
    assert calls == [("EdinburghNLP/xsum", None, "test")]
    assert len(xsum) == 2 and xsum[0].prompt.startswith("###\nArticle: doc 0")
    assert "Article: doc 1" in xsum[0].prompt and xsum[0].answer == "sum 1"


def test_mixture_sizes_boundaries_and_seed(tokenizer):
    mixture = data.build_mixture(tokenizer, sources=("gsm8k", "math"), n=200, seed=3)
    assert len(mixture) == 200 and len({s.id for s in mixture}) == 200
    assert {s.source for s in mixture} == {"gsm8k", "math"}
    records = {r.id: r for name in ("gsm8k", "math") for r in data.load(name)}
    for sample in mixture[:20]:
        record = records[sample.id]
        user = f"Please reason step by step.\n\n{record.prompt}"
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
        assert tokenizer.decode(sample.input_ids[: sample.boundary]) == prompt
        assert tokenizer.decode(sample.input_ids[sample.boundary :]) == (
            record.solution + "<|im_end|>\n"
        )
    again = data.build_mixture(tokenizer, sources=("gsm8k", "math"), n=200, seed=3)
    assert again == mixture
    other = data.build_mixture(tokenizer, sources=("gsm8k", "math"), n=200, seed=4)
    assert [s.id for s in other] != [s.id for s in mixture]


def test_mixture_without_chat_template_uses_plain_text(tokenizer):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    record = Record("What is 2+2?", "2+2=4\n#### 4", "4", "mine", "mine/0")
    (sample,) = data.build_mixture(plain, sources=(), n=1, extra=[record])
    prompt = plain.decode(sample.input_ids[: sample.boundary])
    assert prompt == "Please reason step by step.\n\nWhat is 2+2?\n\n"
    assert plain.decode(sample.input_ids[sample.boundary :]) == "2+2=4\n#### 4<|im_end|>"


def test_mixture_has_no_evaluation_problems(tokenizer):
    pool = data.training_pool(("gsm8k", "math"))
    evaluation = {r.prompt for n in ("math500", "aime24", "amc23", "gsm-symbolic-all")
                  for r in data.load(n)}  # fmt: skip
    assert len(pool) == 7473 + 7499  # one MATH problem appears twice
    assert not {r.prompt for r in pool} & evaluation


@pytest.mark.parametrize(
    "source", ["math500", "aime24", "amc23", "gsm-symbolic", "gsm-symbolic-all", "xsum"]
)
def test_mixture_refuses_evaluation_sets(tokenizer, source):
    with pytest.raises(CapreseDataError, match="evaluation"):
        data.build_mixture(tokenizer, sources=("gsm8k", source), n=10)


def test_mixture_refuses_relabelled_or_test_records(tokenizer, tmp_path):
    leaked = data.load("math500")[0]
    relabelled = Record(leaked.prompt, leaked.solution, leaked.answer, "math", "mine/1")
    with pytest.raises(CapreseDataError, match="evaluation problems"):
        data.build_mixture(tokenizer, sources=("gsm8k",), n=10, extra=[relabelled])
    test_record = Record("A new question?", "#### 3", "3", "gsm8k-test", "gsm8k-test/0")
    with pytest.raises(CapreseDataError, match="gsm8k-test"):
        data.build_mixture(tokenizer, sources=("gsm8k",), n=10, extra=[test_record])


def test_mixture_errors(tokenizer):
    with pytest.raises(CapreseDataError, match="cannot train on gsm9k"):
        data.build_mixture(tokenizer, sources=("gsm9k",), n=10)
    mine = [Record(f"question {i}", "#### 1", "1", "mine", f"mine/{i}") for i in range(30)]
    with pytest.raises(CapreseDataError, match="only 30 samples.*gsm-symbolic-train"):
        data.build_mixture(tokenizer, sources=(), n=31, extra=mine)
    assert len(data.build_mixture(tokenizer, sources=(), n=30, extra=mine)) == 30


def test_gsm_symbolic_train_variants_fill_the_mixture(tokenizer, monkeypatch, tmp_path):
    monkeypatch.setenv("CAPRESE_CACHE", str(tmp_path))
    generated = []

    def variants(template, n, seed=0):
        generated.append((template, n, seed))
        return [Record(f"Variant {i} of {template}?", f"#### {i}", str(i), "gsm-symbolic-train",
                       f"gsm-symbolic/{template}/{seed}-{i}") for i in range(n)]  # fmt: skip

    monkeypatch.setattr(data.gsm_symbolic, "variants", variants)
    mixture = data.build_mixture(tokenizer, sources=("gsm-symbolic-train",), n=60, seed=1)
    assert len(mixture) == 60 and {s.source for s in mixture} == {"gsm-symbolic-train"}
    assert {t for t, _, _ in generated} == set(data.gsm_symbolic.TRAIN_TEMPLATES)
    assert {(n, seed) for _, n, seed in generated} == {(2, 1)}  # ceil(1.25 * 60 / 50)
    generated.clear()
    assert data.build_mixture(tokenizer, sources=("gsm-symbolic-train",), n=60, seed=1) == mixture
    assert generated == []  # served from the cache


def test_xsum_generation_starts_on_the_line_after_the_instruction(monkeypatch):
    """The 1-shot example's summary follows its instruction on a new line; the query must
    end the same way or a model continues the pattern with the separator (empty summary)."""
    from caprese.evaluate import language
    from caprese.generation import Completion, GenerationSettings

    seen = []

    def fake_generate(model, tokenizer, prompts, settings, desc="", journal=None):
        seen.extend(prompts)
        return [[Completion("A summary.", 3, False)] for _ in prompts]

    monkeypatch.setattr(language, "generate", fake_generate)
    records = data.load("xsum")[:2]
    result = language.evaluate_xsum(None, None, records, GenerationSettings())
    assert seen == [r.prompt + "\n" for r in records]
    assert records[0].prompt.endswith("in 1 sentences.")  # the file's own ending
    assert result["summary"]["articles"] == 2
