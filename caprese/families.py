"""Where each supported model family keeps its gated MLPs.

A gated MLP computes FF(x) = down(act(gate(x)) * up(x)). Every family below names the three
projections gate_proj / up_proj / down_proj and the activation act_fn; what differs is where
the decoder layers live. Adding a family is one entry in FAMILIES.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Family:
    layers_path: str  # attribute path from the causal-LM module to its list of decoder layers
    mlp_attr: str = "mlp"


FAMILIES: dict[str, Family] = {
    "llama": Family("model.layers"),
    "mistral": Family("model.layers"),
    "qwen2": Family("model.layers"),
    "qwen3": Family("model.layers"),
    "gemma2": Family("model.layers"),
    "gemma3_text": Family("model.layers"),
    "gemma3": Family("model.language_model.layers"),
}


class UnsupportedModelError(ValueError):
    """The model is not a supported family with a gated MLP."""


def family_of(config) -> Family:
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported; caprese supports gated-MLP families "
            f"{', '.join(sorted(FAMILIES))} (add one to caprese/families.py)"
        )
    return FAMILIES[model_type]


def text_config(config):
    """The decoder's config (multimodal Gemma 3 nests it under text_config)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    node = model
    for name in family_of(model.config).layers_path.split("."):
        node = getattr(node, name)
    return node


def mlp_of(model: nn.Module, layer_index: int) -> nn.Module:
    return getattr(decoder_layers(model)[layer_index], family_of(model.config).mlp_attr)


def set_mlp(model: nn.Module, layer_index: int, module: nn.Module) -> None:
    setattr(decoder_layers(model)[layer_index], family_of(model.config).mlp_attr, module)


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
