"""Every data set by name: where its file is, its checksum, its Hub id, how to read it.

`load(name)` reads the copy bundled with caprese (or the folder $CAPRESE_DATA_DIR names),
checking its sha256; a set whose file is not there (a wheel leaves out the ones whose licence
forbids redistribution) comes from the Hugging Face Hub when the network answers. `load(name,
path)` reads another JSONL file and `load(name, hub_id)` a Hub data set in the same format.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from caprese.data import gsm_symbolic, records
from caprese.data.records import DATA_ENV, CapreseDataError, numbered_rows
from caprese.samples import Record

BUNDLED = Path(__file__).resolve().parent / "bundled"

SHA256 = {
    "gsm8k/train.jsonl": "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465",
    "math/train.jsonl": "fc293f008206a9c00e508b1f393151bfabc7c8978f89b476fd35562e92f91321",
    "math500/test.jsonl": "35dc41080a3680858b27fa7e0533d2d547825316fc5dafe5d316f4ccc5a06132",
    "aime24/test.jsonl": "af2b8bd2aa911b6333ad0df32f3ca05c7ae8ed10f1731f4372c8ae26990bf7ac",
    "amc23/test.jsonl": "43707e1ca784602d8479de24ee8ce36609dbebc46dd152b0b12a46611aa898a4",
    "xsum/xsum_1shot.jsonl": "0bd12d71e981f848a162e286074e2badb43c18435d73a905dc0756480f606f83",
}


@dataclass(frozen=True)
class DataSet:
    file: str  # bundled copy, relative to data_dir()
    hub: tuple[str, str | None, str]  # default Hub id, config, split
    parse: Callable[[dict, str, int], Record]
    evaluation: bool


DATASETS: dict[str, DataSet] = {
    "gsm8k": DataSet("gsm8k/train.jsonl", ("openai/gsm8k", "main", "train"), records.gsm8k,
                     False),
    "math": DataSet("math/train.jsonl", ("EleutherAI/hendrycks_math", None, "train"),
                    records.math, False),
    "math500": DataSet("math500/test.jsonl", ("HuggingFaceH4/MATH-500", None, "test"),
                       records.math, True),
    "aime24": DataSet("aime24/test.jsonl", ("HuggingFaceH4/aime_2024", None, "train"),
                      records.competition, True),
    "amc23": DataSet("amc23/test.jsonl", ("math-ai/amc23", None, "test"), records.competition,
                     True),
    "xsum": DataSet("xsum/xsum_1shot.jsonl", ("EdinburghNLP/xsum", None, "test"), records.xsum,
                    True),
}
GSM_SYMBOLIC_SETS = ("gsm-symbolic", "gsm-symbolic-all", "gsm-symbolic-test")
# Test splits of the training sets (from the Hub or a file named *test*) get a "-test" label.
EVALUATION_SETS = frozenset(
    [n if s.evaluation else f"{n}-test" for n, s in DATASETS.items()] + list(GSM_SYMBOLIC_SETS)
)
TRAINING_SOURCES = ("gsm8k", "math", "gsm-symbolic-train")


def data_dir() -> Path:
    """$CAPRESE_DATA_DIR when set, else the copies bundled with caprese."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    return BUNDLED


def _hub_rows(source: str, config: str | None, split: str) -> Iterable[dict]:
    try:
        import datasets
    except ImportError as error:
        raise CapreseDataError(
            f"{source!r} is not a local file; loading it from the Hugging Face Hub needs "
            "`pip install datasets`"
        ) from error
    try:
        return datasets.load_dataset(source, config, split=split)
    except Exception as error:  # offline, unknown id, no such split: one clear line
        raise CapreseDataError(
            f"{source!r} is not a local file, and the Hugging Face Hub could not provide it "
            f"({type(error).__name__}: {str(error)[:200]})"
        ) from error


def _default_rows(name: str, spec: DataSet) -> list[tuple[int, dict]]:
    """The local copy (checked), else the Hub; a clear error when neither is at hand."""
    path = data_dir() / spec.file
    if path.is_file():
        return numbered_rows(path, SHA256[spec.file])
    hub_id, hub_config, hub_split = spec.hub
    where = (f"{DATA_ENV} names {data_dir()}" if os.environ.get(DATA_ENV)
             else "this installation does not carry it (a wheel leaves out data sets whose "
             "licence does not allow redistribution; a clone of the repository has them all)")
    try:
        rows = _hub_rows(hub_id, hub_config, hub_split)
    except CapreseDataError as error:  # offline, no `datasets`, or the Hub refused
        raise CapreseDataError(
            f"data set {name!r}: {path} is missing ({where}), and loading {hub_id} from the "
            f"Hugging Face Hub failed ({error}). Either "
            f"give this machine network access and `pip install datasets`, or put the file "
            f"{spec.file} (sha256 {SHA256[spec.file]}) in a folder and set {DATA_ENV} to it"
        ) from error
    return _hub_numbered(records.xsum_one_shot(rows) if name == "xsum" else rows)


def _hub_numbered(rows: Iterable[dict]) -> list[tuple[int, dict]]:
    return list(enumerate(rows, 1))


def _looks_like_a_path(source: str | Path) -> bool:
    text = str(source)
    return (isinstance(source, Path) or text.endswith((".jsonl", ".json"))
            or text.startswith((".", "~", "/")) or text.count("/") > 1)


def load(
    name: str,
    source: str | Path | None = None,
    *,
    split: str | None = None,
    config: str | None = None,
) -> list[Record]:
    """Load data set `name` as Records.

    source None reads the bundled copy; a path reads that JSONL file; anything else is a Hub
    id (e.g. load("gsm8k", "openai/gsm8k", split="test") gives source label "gsm8k-test";
    load("math", "EleutherAI/hendrycks_math", config="algebra") one MATH subject).
    "gsm-symbolic" gives the originals of the evaluation templates, "gsm-symbolic-all" all 100,
    "gsm-symbolic-test" the 200-problem test set (evaluation originals and their variants).
    """
    if name == "gsm-symbolic-test":
        return gsm_symbolic.test_set()
    if name in GSM_SYMBOLIC_SETS:
        return gsm_symbolic.originals(all_templates=name == "gsm-symbolic-all")
    if name not in DATASETS:
        raise CapreseDataError(
            f"unknown data set {name!r}; choose one of: "
            f"{', '.join([*DATASETS, *GSM_SYMBOLIC_SETS])}"
        )
    spec = DATASETS[name]
    is_test = split == "test" or (source is not None and "test" in Path(source).name)
    label = f"{name}-test" if is_test and not spec.evaluation else name
    if source is None:
        rows = _default_rows(name, spec)
        where = f"{name} ({data_dir() / spec.file})"
    elif Path(source).expanduser().is_file():
        rows = numbered_rows(Path(source).expanduser())
        where = str(source)
    elif _looks_like_a_path(source):
        raise CapreseDataError(f"{source}: no such file (a task or data file must be a JSONL "
                               "file of one JSON object per line)")
    else:
        hub_id, hub_config, hub_split = spec.hub
        default = str(source) == hub_id
        rows = _hub_rows(
            str(source), config or (hub_config if default else None), split or hub_split
        )
        rows = _hub_numbered(records.xsum_one_shot(rows) if name == "xsum" else rows)
        where = str(source)
    parsed = []
    for index, (line, row) in enumerate(rows):
        try:
            parsed.append(spec.parse(row, label, index))
        except CapreseDataError as error:
            raise CapreseDataError(f"{where}, line {line}: {error}") from error
    return parsed
