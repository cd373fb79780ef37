"""Capture: one teacher pass per batch gives every layer's regression data at once.

Layer-wise distillation fits, for each layer i separately,
    Y_i = FF_i(x) - FFhat_i(x)  ~  x L_i R_i      on continuation tokens,
with x the layer's input in the ORIGINAL model (no error propagation between layers). A
CAPTURE forward is dense, so every block sees original inputs; each block computes its
sample's selection from the prompt positions and reports x and Y_i (for a masking method the
dropped activations times W2; for a quantizing one the dense output minus the 4-bit one).
The pass stops after the last Caprese block: the layers above it feed no regression (with
the paper's first-half GRIFFIN that halves the cost of every statistics pass).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from caprese.adapter import blocks
from caprese.block import Phase
from caprese.families import decoder
from caprese.phases import split
from caprese.samples import Batch

LayerCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


@torch.no_grad()
def capture(model: torch.nn.Module, batch: Batch, on_layer: LayerCallback) -> None:
    """Run `batch` through the original model; call on_layer(i, X_i, Y_i) for every block."""

    def observer(block, x, residual):
        on_layer(block.layer_index, x, residual)

    device = next(model.parameters()).device
    batch = batch.to(device)
    layers = blocks(model)
    stop = layers[max(layers)].register_forward_hook(_stop_pass)
    try:
        with split(model, batch.boundary, Phase.CAPTURE, observer):
            # The decoder stack alone: the LM head is not needed and is costly for big
            # vocabularies.
            decoder(model)(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
            )
    except _PassComplete:
        pass
    finally:
        stop.remove()


class _PassComplete(Exception):
    """Raised by the last Caprese block's hook: everything the capture needs is reported."""


def _stop_pass(module, args, output) -> None:
    raise _PassComplete
