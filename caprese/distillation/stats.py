"""The layer-wise least squares' sufficient statistics, accumulated in float64.

For layer i, Y = FF(x) - FFhat(x) ~ x L R over continuation tokens (caprese.capture gives
X and Y per batch): X^T X, X^T Y and sum(Y^2) hold everything the closed form and the
residual errors need, in O(D^2) memory whatever the number of tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from caprese import distributed


@dataclass
class RegressionStats:
    """Sufficient statistics of one layer's least squares, accumulated in float64.

    Everything the closed form and the residual errors need, in O(D^2) memory whatever the
    number of tokens.
    """

    xx: torch.Tensor  # X^T X, (D, D)
    xy: torch.Tensor  # X^T Y, (D, D)
    yy: torch.Tensor  # sum of Y^2, scalar
    tokens: int = 0

    @classmethod
    def zeros(cls, hidden: int) -> RegressionStats:
        return cls(
            torch.zeros(hidden, hidden, dtype=torch.float64),
            torch.zeros(hidden, hidden, dtype=torch.float64),
            torch.zeros((), dtype=torch.float64),
        )

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        # One float32 product per batch (fast), summed across batches in float64.
        x, y = x.float(), y.float()
        self.xx += (x.t() @ x).to(device=self.xx.device, dtype=torch.float64)
        self.xy += (x.t() @ y).to(device=self.xy.device, dtype=torch.float64)
        self.yy += y.double().pow(2).sum().cpu()
        self.tokens += x.shape[0]

    def relative_error(self, product: torch.Tensor | None) -> float:
        """||Y - X W|| / ||Y|| for W = L R (None: W = 0, the method alone)."""
        if self.tokens == 0 or self.yy <= 0:
            return float("nan")
        if product is None:
            return 1.0
        w = product.double().to(self.xx.device)
        residual = self.yy - 2 * (w * self.xy).sum() + (w * (self.xx @ w)).sum()
        return float(residual.clamp_min(0).div(self.yy).sqrt())

    def all_reduced(self) -> RegressionStats:
        """The sums over every rank of a torchrun group (itself in one process)."""
        if distributed.world_size() == 1:
            return self
        tokens = torch.tensor(self.tokens, dtype=torch.float64)
        parts = [self.xx.clone(), self.xy.clone(), self.yy.clone(), tokens]
        for part in parts:
            distributed.all_reduce_sum_(part)
        return RegressionStats(parts[0], parts[1], parts[2], int(parts[3]))

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}.xx": self.xx,
            f"{prefix}.xy": self.xy,
            f"{prefix}.yy": self.yy,
            f"{prefix}.tokens": torch.tensor(self.tokens),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str) -> RegressionStats:
        return cls(
            tensors[f"{prefix}.xx"],
            tensors[f"{prefix}.xy"],
            tensors[f"{prefix}.yy"],
            int(tensors[f"{prefix}.tokens"]),
        )
