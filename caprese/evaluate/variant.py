"""Which model variant a result belongs to: full, a method alone, or a Caprese adapter.

A Variant is a typed record that `caprese eval`, `caprese lm-eval`, the main job and the
report share: results carry it (as `variant` in the result JSON), and the report groups rows
by its kind, read from the record, never guessed from a path. A Caprese variant's stage
(layer-wise or E2E) comes from what the adapter recorded when it was written.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from caprese.adapter import attach, detach, load, read_adapter
from caprese.config import CapreseConfig

KINDS = ("full", "method", "layerwise", "e2e", "caprese")  # report order
VARIANT_METHODS = ("none", "griffin", "cats", "nf4")


@dataclass(frozen=True)
class Variant:
    """The base model (`method` "none"), a method alone, or an adapter (its saved method and
    density apply). `stage` overrides the adapter's recorded stage (adapters written before
    caprese 0.2 recorded none)."""

    model: str
    method: str = "none"
    density: float = 0.5
    adapter: str | None = None
    stage: str | None = None
    label: str | None = None

    def __post_init__(self) -> None:
        if self.method not in VARIANT_METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of "
                             f"{', '.join(VARIANT_METHODS)}")

    def describe(self) -> dict:
        """What results record: kind, method, density, rank, adapter, label."""
        if self.adapter:
            config = read_adapter(self.adapter).config
            kind = self.stage or read_adapter(self.adapter).trained.get("stage") or "caprese"
            return {"kind": kind, "method": config.method, "density": config.density,
                    "rank": config.rank, "adapter": str(self.adapter),
                    "label": self.label or f"Caprese {kind} ({config.method})"}
        if self.method == "none":
            return {"kind": "full", "method": "", "label": self.label or "full"}
        default = self.method if self.method == "nf4" else f"{self.method} {self.density:g}"
        return {"kind": "method", "method": self.method, "density": self.density,
                "label": self.label or default}


@contextlib.contextmanager
def applied(model, variant: Variant) -> Iterator[None]:
    """The loaded base model as `variant` for the duration of the block."""
    if variant.adapter:
        load(model, variant.adapter)
    elif variant.method != "none":
        attach(model, CapreseConfig(method=variant.method, density=variant.density, rank=None))
    try:
        yield
    finally:
        if variant.adapter or variant.method != "none":
            detach(model)
