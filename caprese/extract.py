"""Reading the final answer out of a worked solution or a model's response (plain text).

Data sets use it for their reference answers (MATH's last \\boxed{}), evaluation for the
model's answer; the symbolic comparison of the two is caprese.evaluate.checker's job.
"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_TOKEN = re.compile(r"[^\s$]+")


def last_boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...} or \\fbox{...} (braces balanced); also the brace-less
    '\\boxed 5' form. None when there is none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    command = "\\boxed" if text.startswith("\\boxed", start) else "\\fbox"
    rest = text[start + len(command):].lstrip()
    if not rest.startswith("{"):  # "\boxed 5" or "\boxed $5$": the next token
        token = _TOKEN.match(rest.lstrip("$ \t\n"))
        return token.group() if token else None
    depth = 0
    for position, char in enumerate(rest):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            return rest[1:position]
    return None


def last_number(text: str) -> str | None:
    matches = _NUMBER.findall(text)
    return matches[-1].replace(",", "").rstrip(".") if matches else None
