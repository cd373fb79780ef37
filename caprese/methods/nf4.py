"""4-bit weights as the efficient method: QLoRA's NormalFloat4 (NF4) through bitsandbytes.

FFhat is the MLP with its three weight matrices quantized to NF4 (blocks of 64 weights share
one absmax), computed in the model's dtype after dequantization. Nothing is selected per
prompt: the prompt still runs the dense weights (prefill is dense in every method), so the
4-bit copy sits beside them, about 28% of the MLP's bf16 bytes (4 bits per weight plus a
float32 absmax per block). There is no fused decode form: L cannot ride along as extra
columns of a 4-bit W1, so the low-rank path is added as its own product.

Why bitsandbytes: it is QLoRA's own implementation of NF4 (the quantizer the paper's 4-bit
setting refers to), kept up to date for CPUs and GPUs, with quantize/dequantize/matmul as
public functions. Its CPU decode dequantizes before multiplying, so it is not faster than
bf16 there; accuracy, not CPU speed, is what this method is for.
"""

from __future__ import annotations

import torch
from torch import nn

from caprese.methods.base import Method

SETTINGS = {"library": "bitsandbytes", "quant_type": "nf4", "blocksize": 64}


def _bitsandbytes():
    try:
        import bitsandbytes
        import bitsandbytes.functional
    except ImportError as error:
        raise RuntimeError("the nf4 method needs bitsandbytes: pip install 'caprese[quant]' "
                           "(or pip install bitsandbytes)") from error
    return bitsandbytes


class QuantizedLinear:
    """One nn.Linear's weight in NF4 (its bias kept as it is)."""

    def __init__(self, linear: nn.Linear) -> None:
        self.bnb = _bitsandbytes()  # imported once, not at every decode step
        self.packed, self.state = self.bnb.functional.quantize_4bit(
            linear.weight.detach(), blocksize=SETTINGS["blocksize"],
            quant_type=SETTINGS["quant_type"])
        self.bias = linear.bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.bnb.matmul_4bit(x, self.packed.t(), quant_state=self.state, bias=self.bias)

    def dequantized(self) -> torch.Tensor:
        """The weight the 4-bit product multiplies by (for tests and references)."""
        return self.bnb.functional.dequantize_4bit(self.packed, self.state)

    def nbytes(self) -> int:
        """Bytes of the 4-bit copy: packed weights and per-block absmax."""
        return self.packed.nbytes + self.state.absmax.nbytes


class QuantizedMLP:
    """A gated MLP with NF4 weights: down(act(gate(x)) * up(x))."""

    def __init__(self, mlp: nn.Module) -> None:
        self.act_fn = mlp.act_fn
        self.gate = QuantizedLinear(mlp.gate_proj)
        self.up = QuantizedLinear(mlp.up_proj)
        self.down = QuantizedLinear(mlp.down_proj)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act_fn(self.gate(x)) * self.up(x))

    def nbytes(self) -> int:
        return self.gate.nbytes() + self.up.nbytes() + self.down.nbytes()


class Nf4(Method):
    name = "nf4"
    quantizer = SETTINGS

    def select(self, act_gate, hidden, valid) -> None:
        return None

    def streams(self, dtype: torch.dtype) -> bool:
        return True  # nothing is selected

    def accumulate(self, stream, act_gate, hidden, valid) -> None:
        return None

    def finish(self, stream) -> tuple[None, None]:
        return None, None

    def keep_mask(self, state, act_gate: torch.Tensor) -> None:
        return None

    def replacement(self, mlp: nn.Module) -> QuantizedMLP:
        return QuantizedMLP(mlp)
