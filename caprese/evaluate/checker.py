"""Answer extraction and checking for math evaluation.

math-verify parses the model's final answer (the last \\boxed{} first) and compares it with
the gold answer symbolically. Its own timeout uses SIGALRM, which only works on the main
thread, so it runs with its timeouts off inside a worker thread that we time ourselves.
GSM8K-style answers fall back to the last number in the response when nothing parses.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from caprese.extract import last_boxed, last_number


@dataclass(frozen=True)
class Verdict:
    extracted: str  # what was read as the model's answer ("" when nothing was found)
    correct: bool
    reason: str = ""  # "timeout" or "no answer" when the check could not run


def _numbers_equal(a: str, b: str) -> bool:
    try:
        return abs(float(a.replace(",", "")) - float(b.replace(",", ""))) < 1e-6
    except ValueError:
        return False


def _math_verify(gold: str, response: str) -> tuple[str, bool]:
    from math_verify import parse, verify

    gold_parsed = parse(f"${gold}$", parsing_timeout=None)
    boxed = last_boxed(response)
    answer = parse(f"\\boxed{{{boxed}}}" if boxed is not None else response, parsing_timeout=None)
    if not answer:
        return "", False
    extracted = str(answer[-1]) if boxed is None else boxed
    return extracted, bool(verify(gold_parsed, answer, timeout_seconds=None))


def check(
    response: str, gold: str, numeric_fallback: bool = False, timeout: float = 10.0
) -> Verdict:
    """Is the model's final answer in `response` equal to `gold`?"""
    result: list[tuple[str, bool]] = []
    # A daemon thread per check: one that hangs (sympy on a pathological answer) is left
    # behind without blocking the checks after it.
    worker = threading.Thread(
        target=lambda: result.append(_math_verify(gold, response)), daemon=True
    )
    worker.start()
    worker.join(timeout)
    if not result:
        return Verdict("", False, "timeout")
    extracted, correct = result[0]
    if correct:
        return Verdict(extracted, True)
    if numeric_fallback and last_boxed(response) is None:
        number = last_number(response)
        if number is not None:
            return Verdict(number, _numbers_equal(number, gold))
    return Verdict(extracted, False, "" if extracted else "no answer")
