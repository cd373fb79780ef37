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

from caprese.adapter import attach, detach, load, read_adapter, set_reselection
from caprese.config import CapreseConfig
from caprese.phases import use_decode_kernels

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
    reselect_every: int | None = None  # GRIFFIN's rho (None: never), the adapter's too
    # single decode tokens by caprese's CPU kernels (phases.use_decode_kernels): bf16 on a
    # CPU, where PyTorch's one-token products are slow; rounds apart from PyTorch's products
    cpu_kernels: bool = False

    def __post_init__(self) -> None:
        if self.method not in VARIANT_METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of "
                             f"{', '.join(VARIANT_METHODS)}")

    def describe(self) -> dict:
        """What results record: kind, method, density, rank, adapter (its folder and the
        digest of its weights: which adapter a result measured, wherever it lies now), label
        (and rho, and whether the CPU kernels decode)."""
        rho = {} if self.reselect_every is None else {"reselect_every": self.reselect_every}
        kernels = {"cpu_kernels": True} if self.cpu_kernels else {}
        if self.adapter:
            info = read_adapter(self.adapter)
            config = info.config
            if rho:
                CapreseConfig(method=config.method, reselect_every=self.reselect_every)
            elif config.reselect_every is not None:  # the adapter's own rho applies
                rho = {"reselect_every": config.reselect_every}
            kind = self.stage or info.trained.get("stage") or "caprese"
            return {"kind": kind, "method": config.method, "density": config.density,
                    "rank": config.rank, "adapter": str(self.adapter),
                    "adapter_sha256": info.weights_sha256, **rho, **kernels,
                    "label": self.label or f"Caprese {kind} ({config.method})"}
        if self.method == "none":
            if rho:
                raise ValueError("reselect_every is GRIFFIN's: the full model has no selection")
            return {"kind": "full", "method": "", **kernels, "label": self.label or "full"}
        self.config()  # a bad combination is refused before any model loads
        default = self.method if self.method == "nf4" else f"{self.method} {self.density:g}"
        return {"kind": "method", "method": self.method, "density": self.density, **rho,
                **kernels, "label": self.label or default}

    def config(self) -> CapreseConfig:
        """The method alone's config."""
        return CapreseConfig(method=self.method, density=self.density, rank=None,
                             reselect_every=self.reselect_every)


@contextlib.contextmanager
def applied(model, variant: Variant) -> Iterator[None]:
    """The loaded base model as `variant` for the duration of the block."""
    if variant.cpu_kernels and (device := next(model.parameters()).device).type != "cpu":
        raise ValueError(f"the CPU kernels decode on the CPU; this model is on {device}: drop "
                         "--cpu-kernels (on a GPU, --compile makes decode steps fast)")
    if variant.adapter:
        load(model, variant.adapter)
        if variant.reselect_every is not None:
            set_reselection(model, variant.reselect_every)
    elif variant.method != "none":
        attach(model, variant.config())
    if variant.cpu_kernels:
        use_decode_kernels(model)
    try:
        yield
    finally:
        if variant.cpu_kernels:
            use_decode_kernels(model, False)
        if variant.adapter or variant.method != "none":
            detach(model)
