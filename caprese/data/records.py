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


def read_jsonl(path: Path, sha256: str | None = None) -> list[dict]:
    """The JSON objects of a JSONL file; with `sha256`, only if the file has that checksum."""
    data = path.read_bytes()
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        raise CapreseDataError(
            f"{path} is not the expected copy (sha256 differs from {sha256}); restore it "
            f"(git checkout, or reinstall caprese) or point {DATA_ENV} at an unmodified copy"
        )
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


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
    return gsm_record(row["question"], row["answer"], name, f"{name}/{index}")


def math(row: dict, name: str, index: int) -> Record:
    answer = row.get("answer") or last_boxed(row["solution"])
    if answer is None:
        raise CapreseDataError(f"no \\boxed answer in {name} row {index}")
    id = str(row.get("unique_id", f"{name}/{index}"))
    subject, level = row.get("subject") or row.get("type"), _level(row.get("level"))
    return Record(row["problem"], row["solution"], str(answer), name, id, level, subject)


def competition(row: dict, name: str, index: int) -> Record:
    """AIME/AMC rows; AMC has no worked solution and calls the problem 'question' on the Hub."""
    problem, solution = row.get("problem") or row["question"], row.get("solution") or ""
    id = f"{name}/{row.get('id', index)}"
    return Record(problem, solution, _number(row["answer"]), name, id)


def xsum(row: dict, name: str, index: int) -> Record:
    return Record(row["article"], row["summary_gt"], row["summary_gt"], name, f"{name}/{index}")


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
