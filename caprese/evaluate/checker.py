"""Is a response's final answer the gold one? math-verify, with a bound that always holds.

math-verify parses the model's final answer (the last \\boxed{} first) and compares it with
the gold answer symbolically. Sympy can take forever on a hostile answer (10^{10^{10^{10}}}
is big-integer arithmetic that holds the GIL), and a thread cannot be stopped, so the
comparison runs in a worker process that is killed and replaced when it overruns: `check`
returns within `timeout` seconds (plus a worker's start, about a second, the first time and
after a kill) whatever the input. Answers no math checker should evaluate (power towers,
huge literals) are refused before they reach it. GSM8K-style answers fall back to the last
number in the response when nothing parses.
"""

from __future__ import annotations

import logging
import multiprocessing
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass

from caprese.extract import last_boxed, last_number

MAX_ANSWER_CHARS = 1000  # a final answer longer than this is not an answer
MAX_DIGITS = 100  # integer literals beyond this are refused (sympy would expand them)
MAX_EXPONENT = 10_000  # a literal power a^b with b beyond this is refused
# a number raised to a power that is itself a power of a number: 10^{10^{10}}, 2^3^4
_POWER_TOWER = re.compile(r"\^\s*\{?\s*\d+(?:\.\d+)?\s*\}?\s*(?:\^|\*\*)")
_EXPONENT = re.compile(r"\^\s*\{?\s*(\d+)")
_FACTORIAL = re.compile(r"(\d+)\s*!")


@dataclass(frozen=True)
class Verdict:
    extracted: str  # what was read as the model's answer ("" when nothing was found)
    correct: bool
    reason: str = ""  # why nothing could be checked: "timeout", "refused: ...", "error: ..."


def _numbers_equal(a: str, b: str) -> bool:
    try:
        return abs(float(a.replace(",", "")) - float(b.replace(",", ""))) < 1e-6
    except (ValueError, OverflowError):
        return False


def refusal(answer: str) -> str | None:
    """Why an answer is too costly to evaluate symbolically, or None."""
    if len(answer) > MAX_ANSWER_CHARS:
        return f"longer than {MAX_ANSWER_CHARS} characters"
    if _POWER_TOWER.search(answer):
        return "a number to a power of a number to a power"
    if any(len(run) > MAX_DIGITS for run in re.findall(r"\d+", answer)):
        return f"a number of more than {MAX_DIGITS} digits"
    if any(int(e) > MAX_EXPONENT for e in _EXPONENT.findall(answer)):
        return f"an exponent above {MAX_EXPONENT}"
    if any(int(n) > 1000 for n in _FACTORIAL.findall(answer)):
        return "a factorial above 1000!"
    return None


def math_verify(gold: str, response: str) -> tuple[str, bool]:
    """(extracted answer, equal to gold?) by math-verify, with its own timeouts off (they
    use SIGALRM, which only works on a main thread; the worker process is the bound)."""
    from math_verify import parse, verify

    gold_parsed = parse(f"${gold}$", parsing_timeout=None)
    boxed = last_boxed(response)
    answer = parse(f"\\boxed{{{boxed}}}" if boxed is not None else response, parsing_timeout=None)
    if not answer:
        return "", False
    extracted = str(answer[-1]) if boxed is None else boxed
    return extracted, bool(verify(gold_parsed, answer, timeout_seconds=None))


def _serve(connection, parent_end, compare: Callable[[str, str], tuple[str, bool]]) -> None:
    """The worker: compare each (gold, response) it receives, until its parent is gone."""
    parent_end.close()  # a forked copy of the parent's end would keep the pipe open forever
    # math-verify warns at every call that its own timeouts are off: the process is the bound
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    while True:
        try:
            gold, response = connection.recv()
        except EOFError:  # the parent exited (or was killed): so does the worker
            return
        try:
            connection.send(("ok", *compare(gold, response)))
        except Exception as error:  # a parser crash is a verdict, not the worker's end
            connection.send(("error", f"{type(error).__name__}: {error}"[:200], False))


class BoundedChecker:
    """math-verify in a worker process that is replaced when it overruns."""

    def __init__(self, compare: Callable[[str, str], tuple[str, bool]] = math_verify) -> None:
        self.compare = compare
        self.process = None
        self.connection = None
        self._lock = threading.Lock()

    def _start(self) -> None:
        # fork: the worker only runs sympy, and starts in milliseconds with the parent's
        # imports; spawn where fork does not exist.
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, self.connection,
                                                            self.compare), daemon=True)
        self.process.start()
        child.close()

    def _stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.join()
        self.process = self.connection = None

    def ask(self, gold: str, response: str, timeout: float) -> tuple | None:
        """The worker's reply, or None after `timeout` seconds (the worker is then killed)."""
        with self._lock:
            if self.process is None or not self.process.is_alive():
                self._start()
            self.connection.send((gold, response))
            if self.connection.poll(timeout):
                try:
                    return self.connection.recv()
                except EOFError:  # the worker died (out of memory, ...)
                    self._stop()
                    return ("error", "the checker process died", False)
            self._stop()
            return None

    def close(self) -> None:
        with self._lock:
            self._stop()


_default = BoundedChecker()


def check(response: str, gold: str, numeric_fallback: bool = False, timeout: float = 10.0,
          checker: BoundedChecker | None = None) -> Verdict:
    """Is the model's final answer in `response` equal to `gold`? Returns within `timeout`."""
    boxed = last_boxed(response)
    refused = refusal(boxed if boxed is not None else response[-MAX_ANSWER_CHARS:])
    if refused is None:
        reply = (checker or _default).ask(gold, response, timeout)
        if reply is None:
            return Verdict("", False, "timeout")
        status, extracted, correct = reply
        if status == "ok" and correct:
            return Verdict(extracted, True)
        reason = "" if status == "ok" else extracted
        extracted = extracted if status == "ok" else ""
    else:
        reason, extracted = f"refused: {refused}", ""
    if numeric_fallback and boxed is None:
        number = last_number(response)
        if number is not None and refusal(number) is None:
            return Verdict(number, _numbers_equal(number, gold))
    return Verdict(extracted, False, reason or ("" if extracted else "no answer"))
