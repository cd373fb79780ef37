"""One teacher pass per batch gives every layer's regression data at once.

Layer-wise distillation fits, for each layer i separately,
    Y_i = FF_i(x) - FFhat_i(x)  ~  x L_i R_i      on continuation tokens,
with x the layer's input in the ORIGINAL model (no error propagation between layers). A
CAPTURE forward is dense, so every block sees original inputs; each block computes its
sample's selection from the prompt positions and reports x and the activations its method
drops. Y_i = dropped @ W2^T (the down bias cancels in the difference).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from caprese.distillation.batches import Batch
from caprese.families import decoder
from caprese.phases import Phase, split

LayerCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


@torch.no_grad()
def capture(model: torch.nn.Module, batch: Batch, on_layer: LayerCallback) -> None:
    """Run `batch` through the original model; call on_layer(i, X_i, Y_i) for every block."""

    def observer(block, x, dropped):
        on_layer(block.layer_index, x, dropped @ block.mlp.down_proj.weight.t())

    device = next(model.parameters()).device
    batch = batch.to(device)
    with split(model, batch.boundary, Phase.CAPTURE, observer):
        # The decoder stack alone: the LM head is not needed and is costly for big vocabularies.
        decoder(model)(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        )


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
