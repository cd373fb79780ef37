"""CapreseConfig: which efficient method, where, and how large the low-rank path is.

The config is the single source of truth for an adapter: it is written as JSON beside the
adapter weights and read back by `caprese.load`, so every field must be JSON-serialisable.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

METHODS = ("griffin", "cats", "nf4", "none")
L_INITS = ("gaussian", "orthogonal")


@dataclass
class CapreseConfig:
    """How to compress the MLPs and how to compensate them.

    method:  "griffin" (per-prompt neuron selection), "cats" (per-prompt activation
             threshold), "nf4" (the MLP's weights in 4 bits, QLoRA's NormalFloat4) or
             "none" (dense MLP; the low-rank path alone, for tests).
    density: fraction of MLP neurons (griffin) or gate activations (cats) kept, in (0, 1];
             nf4 keeps every neuron and ignores it.
    rank:    r of the low-rank path x L R; None attaches the method alone.
    layers:  decoder-layer indices to modify; None = the method's default (griffin: first
             half, as in the paper; cats and none: all layers).
    init:    how L starts ("gaussian": N(0, 1/D), "orthogonal"); R always starts at zero so
             that an untrained adapter is exactly the efficient method.
    seed:    seed for L's initialisation, so that attach is reproducible.
    quantizer: a quantizing method's settings (library, format, block size), recorded by
             attach; an adapter fitted against one quantizer is refused under another.
    reselect_every: GRIFFIN's rho: every rho generated tokens, those tokens run through the
             dense model (their KV cache entries replaced by the dense model's), the neuron
             scores take them in and the neurons are selected again. None: never (the
             prompt's selection throughout); 0: every token dense (the full model).
    """

    method: str = "griffin"
    density: float = 0.5
    rank: int | None = 256
    layers: list[int] | None = None
    init: str = "gaussian"
    seed: int = 0
    fingerprint: dict[str, Any] = field(default_factory=dict)
    quantizer: dict[str, Any] | None = None
    reselect_every: int | None = None

    def __post_init__(self) -> None:
        """Strict types: a config is read from a JSON file anyone can edit."""
        if not isinstance(self.method, str) or self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if (isinstance(self.density, bool) or not isinstance(self.density, (int, float))
                or not 0.0 < self.density <= 1.0):
            raise ValueError(f"density must be in (0, 1] (a number), got {self.density!r}")
        self.density = float(self.density)
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int)
                                      or self.rank <= 0):
            raise ValueError(
                f"rank must be a positive integer (or None for the method alone), got {self.rank!r}"
            )
        if not isinstance(self.init, str) or self.init not in L_INITS:
            raise ValueError(f"unknown init {self.init!r}; choose one of {', '.join(L_INITS)}")
        if (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                or not 0 <= self.seed < 2**32):
            raise ValueError(f"seed must be an integer in [0, 2^32), got {self.seed!r}")
        if not isinstance(self.fingerprint, dict):
            raise ValueError(f"fingerprint must be a JSON object, got {self.fingerprint!r}")
        if self.reselect_every is not None:
            if (isinstance(self.reselect_every, bool) or not isinstance(self.reselect_every, int)
                    or self.reselect_every < 0):
                raise ValueError(f"reselect_every must be an integer >= 0 (0: the full model; "
                                 f"None: never), got {self.reselect_every!r}")
            if self.method != "griffin":
                raise ValueError(f"reselection (reselect_every) is GRIFFIN's: {self.method} "
                                 "selects nothing to reselect")
        if self.quantizer is not None and not isinstance(self.quantizer, dict):
            raise ValueError(f"quantizer must be a JSON object (or null), got {self.quantizer!r}")
        if self.layers is not None:
            if not isinstance(self.layers, (list, tuple)) or not all(
                    isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers):
                raise ValueError(f"layers must be a list of layer indices >= 0 (or None for the "
                                 f"method's default), got {self.layers!r}")
            if not self.layers:
                raise ValueError("layers must name at least one layer (None: the method's default)")
            self.layers = sorted(set(self.layers))

    def resolve_layers(self, num_layers: int) -> list[int]:
        """The layer indices this config modifies on a model with `num_layers` layers."""
        if self.layers is None:
            if self.method == "griffin":
                return list(range(num_layers // 2))
            return list(range(num_layers))
        bad = [i for i in self.layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(
                f"layers {bad} do not exist: the model has {num_layers} layers "
                f"(0..{num_layers - 1})"
            )
        return list(self.layers)

    def check_rank(self, hidden_size: int) -> None:
        """A rank of D or more is no longer low-rank (and costs more than a dense D x D map)."""
        if self.rank is not None and self.rank >= hidden_size:
            raise ValueError(f"rank {self.rank} must be smaller than the hidden size {hidden_size}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CapreseConfig:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("caprese config JSON must be an object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown caprese config fields {unknown}; was it written by a newer caprese?"
            )
        return cls(**data)
