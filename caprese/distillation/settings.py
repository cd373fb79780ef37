"""Every knob of a distillation run, with the paper's values where it states them."""

from __future__ import annotations

from dataclasses import dataclass

from caprese.samples import at_least

STAGES = ("layerwise", "e2e")
OBJECTIVES = ("mse", "kl")  # E2E: the paper's last-hidden-state MSE, or KL of the logits
SOLVERS = ("closed_form", "sgd", "closed_form+sgd", "sequential")


@dataclass
class TrainSettings:
    """One Adam stage (layer-wise SGD or end-to-end)."""

    name: str  # checkpoint and log name: "sgd" or "e2e"
    lr: float
    epochs: int
    batch_size: int
    micro_batch: int
    warmup: float = 0.02
    checkpoint_every: int = 50
    seed: int = 0
    min_warmup_steps: int = 5
    checkpoint_minutes: float = 10.0


@dataclass
class DistillSettings:
    """Every knob of a run. Defaults follow the paper where it says something."""

    stages: tuple[str, ...] = ("layerwise",)
    solver: str = "closed_form"
    ridge: float = 1e-4  # lambda = ridge * trace(C) / D
    capture_batch: int = 8  # sequences per teacher pass when collecting statistics
    sgd_lr: float = 1e-3
    sgd_batch: int = 128
    sgd_epochs: int = 20
    # E2E: one epoch at 2e-4, the run that recovered 92% of GRIFFIN's drop on the 1.5B model
    # (benchmarks/results/results_1p5b/REPORT.md); a second epoch at 1e-4 lowered its
    # accuracy (45 -> 35 of 100), and an epoch of 600 sequences is 38 steps, ~47 min on a
    # 2-core AMX CPU, ~6 h without AMX.
    e2e_lr: float = 2e-4
    e2e_objective: str = "mse"  # the paper's hidden-state MSE, or "kl" on the logits
    e2e_batch: int = 16
    e2e_epochs: int = 1
    e2e_samples: int | None = None  # E2E on the first N training samples (None: all)
    micro_batch: int = 4  # sequences per forward for SGD and E2E (gradient accumulation)
    warmup: float = 0.02  # fraction of each Adam stage's steps
    min_warmup_steps: int = 5  # short runs still warm up (see trainer.lr_factor)
    gradient_checkpointing: bool = False
    checkpoint_every: int = 50  # steps or statistics batches between checkpoints ...
    checkpoint_minutes: float = 10.0  # ... or minutes, whichever comes first
    seed: int = 0

    def __post_init__(self) -> None:
        self.stages = tuple(self.stages)
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown or not self.stages:
            raise ValueError(f"stages must be drawn from {', '.join(STAGES)}, got {self.stages}")
        if self.solver not in SOLVERS:
            raise ValueError(f"unknown solver {self.solver!r}; choose one of {', '.join(SOLVERS)}")
        for name in ("capture_batch", "sgd_batch", "e2e_batch", "micro_batch", "checkpoint_every",
                     "sgd_epochs", "e2e_epochs"):
            at_least(name, getattr(self, name), 1)
        at_least("seed", self.seed, 0)
        if self.e2e_samples is not None:
            at_least("e2e_samples", self.e2e_samples, 1, "(None: all)")
        for name in ("ridge", "sgd_lr", "e2e_lr", "checkpoint_minutes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
                    or value == float("inf"):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if self.e2e_objective not in OBJECTIVES:
            raise ValueError(
                f"e2e_objective must be one of {OBJECTIVES}, got {self.e2e_objective!r}"
            )
        if not 0 <= self.warmup < 1 or self.min_warmup_steps < 0:
            raise ValueError(
                "warmup is a fraction of the steps in [0, 1) and min_warmup_steps is at least 0, "
                f"got {self.warmup} and {self.min_warmup_steps}"
            )

    def train_settings(self, stage: str) -> TrainSettings:
        """The Adam loop's settings for layer-wise SGD ("sgd") or the E2E stage ("e2e")."""
        lr, epochs, batch = ((self.sgd_lr, self.sgd_epochs, self.sgd_batch) if stage == "sgd"
                             else (self.e2e_lr, self.e2e_epochs, self.e2e_batch))
        return TrainSettings(stage, lr, epochs, batch, self.micro_batch, self.warmup,
                             self.checkpoint_every, self.seed, self.min_warmup_steps,
                             self.checkpoint_minutes)
