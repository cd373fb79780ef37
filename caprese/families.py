"""Which model families caprese supports, and where they keep their gated MLPs.

A gated MLP computes FF(x) = down(act(gate(x)) * up(x)). Every family below names the three
projections gate_proj / up_proj / down_proj and the activation act_fn, keeps its decoder
layers in `model.get_decoder().layers` and each layer's MLP in `layer.mlp`. Adding a family
that follows these names is one entry in FAMILIES (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import torch
from torch import nn

FAMILIES = frozenset({
    "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text",
    "gemma3",  # multimodal Gemma 3: get_decoder() is its language model
})


class UnsupportedModelError(ValueError):
    """The model is not a supported family with a gated MLP."""


def check_family(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported; caprese supports gated-MLP families "
            f"{', '.join(sorted(FAMILIES))} (add one to caprese/families.py)"
        )


def text_config(config):
    """The decoder's config (multimodal Gemma 3 nests it under text_config)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def decoder(model: nn.Module) -> nn.Module:
    """The transformer stack without the LM head: where the phase hook sits."""
    check_family(model.config)
    return model.get_decoder()


# Positions whose full-vocabulary logits exist at once: a few fp32 copies of (rows, vocab)
# live together, about 0.6 GB each for 1024 rows of a 152K vocabulary; without the cap a
# batch of long language texts took over 20 GB.
LOGIT_ROWS = 1024  # callers pass at most this many rows to logits()


def logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head on final hidden states, as the model's forward computes it: Gemma 2
    soft-caps its logits (cap * tanh(logits / cap)), which the bare head does not."""
    out = model.get_output_embeddings()(hidden)
    cap = getattr(text_config(model.config), "final_logit_softcapping", None)
    return out if cap is None else torch.tanh(out / cap) * cap


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return decoder(model).layers


def mlp_of(model: nn.Module, layer_index: int) -> nn.Module:
    return decoder_layers(model)[layer_index].mlp


def set_mlp(model: nn.Module, layer_index: int, module: nn.Module) -> None:
    decoder_layers(model)[layer_index].mlp = module


def check_gated_mlp(mlp: nn.Module, layer_index: int) -> None:
    missing = [n for n in ("gate_proj", "up_proj", "down_proj", "act_fn") if not hasattr(mlp, n)]
    if missing:
        raise UnsupportedModelError(
            f"layer {layer_index}: {type(mlp).__name__} has no {', '.join(missing)}; "
            "caprese needs a gated MLP (gate_proj, up_proj, down_proj, act_fn)"
        )


def fingerprint(config) -> dict:
    """What an adapter must match: the base architecture, not its weights."""
    text = text_config(config)
    return {
        "model_type": config.model_type,
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers,
    }
