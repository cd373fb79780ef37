"""Ready-made adapters: the default-recipe adapters of built-in models, shipped with caprese.

A user evaluates or serves them without distilling: wherever an adapter folder is taken
(`--adapter`, `caprese.load`), `builtin:MODEL/METHOD` names the folder
caprese/models/adapters/MODEL/METHOD/ (`caprese models list` shows which exist). They are
product artifacts: the numbers in docs/RESULTS.md were measured on these very files.
"""

from __future__ import annotations

import os
from pathlib import Path

from caprese.models.builtin import CapreseModelError

PREFIX = "builtin:"
FOLDER = Path(__file__).parent / "adapters"


def list_ready() -> list[str]:
    """The names (MODEL/METHOD) of the shipped adapters."""
    if not FOLDER.is_dir():
        return []
    return sorted(f"{model.name}/{method.name}" for model in FOLDER.iterdir() if model.is_dir()
                  for method in model.iterdir() if method.is_dir())


def resolve(adapter: str | os.PathLike) -> Path:
    """The folder an adapter argument names: `builtin:MODEL/METHOD` or a folder path."""
    text = os.fspath(adapter)
    if not text.startswith(PREFIX):
        return Path(text)
    name = text[len(PREFIX):].strip("/")
    ready = list_ready()
    if name not in ready:  # also keeps the name inside FOLDER (no "..")
        there = ", ".join(PREFIX + r for r in ready) or "none in this installation"
        raise CapreseModelError(f"no ready-made adapter {text!r}; there are: {there}. Name "
                                "one of them, or an adapter folder that `caprese distill` wrote")
    return FOLDER / name
