"""Answer extraction and checking on known cases."""

from __future__ import annotations

import pytest

from caprese.evaluate.checker import check
from caprese.extract import last_boxed, last_number


def test_last_boxed_balances_braces():
    assert last_boxed(r"first \boxed{1} then \boxed{\frac{3}{4}} done") == r"\frac{3}{4}"
    assert last_boxed(r"\fbox{x^{2}}") == "x^{2}"
    assert last_boxed("no box") is None
    assert last_boxed(r"\boxed{unclosed") is None


def test_last_number_strips_commas():
    assert last_number("They paid $1,234.50 in total, so 1,234.5.") == "1234.5"
    assert last_number("nothing") is None


@pytest.mark.parametrize("response, gold, expected", [
    (r"So the answer is \boxed{\frac{1}{2}}.", "0.5", True),
    (r"\boxed{\dfrac{3}{4}}", r"\frac34", True),
    (r"The total is \boxed{1,000} dollars", "1000", True),
    (r"\boxed{5 \text{ cm}}", "5", True),
    (r"\boxed{x^2+2x+1}", "(x+1)^2", True),
    (r"\boxed{\sqrt{2}/2}", r"\frac{\sqrt{2}}{2}", True),
    (r"\boxed{7}", "8", False),
    (r"\boxed{(1,2)}", "(1,2)", True),
])
def test_math_answers(response, gold, expected):
    assert check(response, gold).correct is expected


def test_gsm_fallback_reads_the_last_number():
    response = "She has 3 + 4 = 7 apples.\nThen 7 * 2 = 14.\nThe answer is 14 apples"
    verdict = check(response, "14", numeric_fallback=True)
    assert verdict.correct and verdict.extracted == "14"
    assert not check("The answer is 15", "14", numeric_fallback=True).correct
    assert check("#### 1,250", "1250", numeric_fallback=True).correct


def test_no_answer_is_reported():
    verdict = check("I do not know.", "3")
    assert not verdict.correct and verdict.reason == "no answer"
