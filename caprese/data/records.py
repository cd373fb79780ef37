"""Rows of each data set's file as Records: one parser per file format.

Each parser takes (row, source label, row index) and returns a Record whose `answer` is the
final answer alone (GSM8K's '#### N', MATH's last \\boxed{}, a competition's number).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from caprese.extract import last_boxed
from caprese.samples import Record

DATA_ENV = "CAPRESE_DATA_DIR"


class CapreseDataError(ValueError):
    """A data set could not be found or used as asked; the message says what to do."""


def numbered_rows(path: Path, sha256: str | None = None) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file (UTF-8, a BOM allowed);
    with `sha256`, only if the file has that checksum. Errors name the file and the line."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise CapreseDataError(f"cannot read {path}: {error.strerror or error}") from error
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        raise CapreseDataError(
            f"{path} is not the expected copy (sha256 differs from {sha256}); restore it "
            f"(git checkout, or reinstall caprese) or point {DATA_ENV} at an unmodified copy"
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise CapreseDataError(
            f"{path} is not UTF-8 text (byte {error.start} cannot be decoded): save it as UTF-8"
        ) from error
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise CapreseDataError(f"{path}, line {number}: not valid JSON ({error.msg} at "
                                   f"column {error.colno})") from error
        if not isinstance(row, dict):
            raise CapreseDataError(f"{path}, line {number}: expected a JSON object {{...}} per "
                                   f"line, found a {type(row).__name__}")
        rows.append((number, row))
    return rows


def read_jsonl(path: Path, sha256: str | None = None) -> list[dict]:
    """The JSON objects of a JSONL file (see numbered_rows)."""
    return [row for _, row in numbered_rows(path, sha256)]


def _text(row: dict, *names: str) -> str:
    """The first of `names` the row has, as text; a clear error when it has none."""
    for name in names:
        value = row.get(name)
        if isinstance(value, str) and value.strip():
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise CapreseDataError(f"no {' or '.join(repr(n) for n in names)} field with text"
                           f" (fields: {', '.join(sorted(row)) or 'none'})")


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


def gsm_record(question: str, solution: str, source: str, id: str) -> Record:
    """A GSM8K-style problem: the answer follows '####'; calculator calls are dropped."""
    return Record(question, _strip_calculator(solution), gsm8k_answer(solution), source, id)


def gsm8k(row: dict, name: str, index: int) -> Record:
    return gsm_record(_text(row, "question"), _text(row, "answer"), name, f"{name}/{index}")


def math(row: dict, name: str, index: int) -> Record:
    problem = _text(row, "problem")
    solution = row.get("solution") if isinstance(row.get("solution"), str) else ""
    answer = _text(row, "answer") if row.get("answer") not in (None, "") else last_boxed(solution)
    if answer is None:
        raise CapreseDataError("no 'answer' field and no \\boxed{} answer in 'solution'")
    id = str(row.get("unique_id", f"{name}/{index}"))
    subject, level = row.get("subject") or row.get("type"), _level(row.get("level"))
    return Record(problem, solution, answer, name, id, level,
                  subject if isinstance(subject, str) else None)


def competition(row: dict, name: str, index: int) -> Record:
    """AIME/AMC rows; AMC has no worked solution and calls the problem 'question' on the Hub."""
    problem, solution = _text(row, "problem", "question"), row.get("solution") or ""
    id = f"{name}/{row.get('id', index)}"
    if isinstance(row.get("answer"), (dict, list, bool)) or row.get("answer") in (None, ""):
        raise CapreseDataError(f"no 'answer' field with a value (fields: {', '.join(sorted(row))})")
    return Record(problem, str(solution), _number(row["answer"]), name, id)


def xsum(row: dict, name: str, index: int) -> Record:
    summary = _text(row, "summary_gt")
    return Record(_text(row, "article"), summary, summary, name, f"{name}/{index}")


def xsum_one_shot(rows: Iterable[dict]) -> list[dict]:
    """Hub XSum rows (document, summary) as 1-shot prompts in the bundled file's format,
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
