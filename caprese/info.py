"""Parameter budget of a model under a method and Caprese, from its config.

The model is built on the meta device, so a 14B configuration costs no memory and no
download of weights. "Active parameters per decode token" counts the weights a generated
token multiplies with: every decoder layer plus the LM head (the embedding is a lookup).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from caprese.config import CapreseConfig
from caprese.families import check_family, decoder_layers, text_config


@dataclass
class Budget:
    model_type: str
    layers: int
    hidden_size: int
    intermediate_size: int
    total_params: int
    method: str
    density: float
    rank: int | None
    method_layers: list[int]
    caprese_params: int
    caprese_share: float  # of the base model's parameters
    active_full: int
    active_method: int
    active_caprese: int


def load_config(model: str) -> transformers.PretrainedConfig:
    """A config from a config.json file, a model folder, or a Hub id (no weights)."""
    path = Path(model).expanduser()
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} is not a JSON config: {error}") from error
        if not isinstance(data, dict) or "model_type" not in data:
            raise ValueError(f"{path} has no model_type: is it a transformers config.json?")
        return transformers.AutoConfig.for_model(**data)
    if path.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: is it a model folder?")
    if not path.exists() and (model.startswith((".", "/", "~")) or model.endswith(".json")):
        raise FileNotFoundError(f"{model}: no such file or folder")
    try:
        return transformers.AutoConfig.from_pretrained(model)
    except OSError as error:
        raise FileNotFoundError(f"could not load a config for {model!r}: not a local file or "
                                f"folder, and the Hugging Face Hub could not provide it") from error


def budget(config: transformers.PretrainedConfig, caprese: CapreseConfig) -> Budget:
    check_family(config)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    text = text_config(config)
    d, d_ff = text.hidden_size, text.intermediate_size
    layers = decoder_layers(model)
    chosen = caprese.resolve_layers(len(layers))
    caprese.check_rank(d)

    total = sum(p.numel() for p in model.parameters())
    active_full = sum(p.numel() for p in layers.parameters())
    active_full += sum(p.numel() for p in model.get_output_embeddings().parameters())
    mlp = 3 * d * d_ff
    # nf4 reads every weight, in 4 bits: it saves bytes, not parameters (bench counts bytes)
    saved = {"griffin": mlp, "cats": 2 * d * d_ff, "nf4": 0, "none": 0}[caprese.method]
    active_method = active_full - round(len(chosen) * saved * (1.0 - caprese.density))
    path = 0 if caprese.rank is None else 2 * d * caprese.rank * len(chosen)
    return Budget(
        model_type=config.model_type,
        layers=len(layers),
        hidden_size=d,
        intermediate_size=d_ff,
        total_params=total,
        method=caprese.method,
        density=caprese.density,
        rank=caprese.rank,
        method_layers=chosen,
        caprese_params=path,
        caprese_share=path / total,
        active_full=active_full,
        active_method=active_method,
        active_caprese=active_method + path,
    )


def _layer_ranges(layers: list[int]) -> str:
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])
    return ",".join(map(str, layers))


def format_budget(b: Budget) -> str:
    def millions(n: int) -> str:
        return f"{n / 1e6:,.1f}M"

    rows = [
        ("model type", b.model_type),
        ("layers / D / D_FF", f"{b.layers} / {b.hidden_size} / {b.intermediate_size}"),
        ("parameters", millions(b.total_params)),
        ("method", (b.method if b.method == "nf4" else f"{b.method}, density {b.density:g}")
         + f", layers {_layer_ranges(b.method_layers)}"),
        ("Caprese rank", "none (method alone)" if b.rank is None else str(b.rank)),
        (
            "Caprese parameters",
            f"{millions(b.caprese_params)} ({100 * b.caprese_share:.2f}% of the model; "
            f"2*D*r = {millions(2 * b.hidden_size * (b.rank or 0))} per layer)",
        ),
        ("active params / decode token", ""),
        ("  full", millions(b.active_full)),
        ("  method", f"{millions(b.active_method)} ({100 * b.active_method / b.active_full:.1f}%)"),
        (
            "  Caprese",
            f"{millions(b.active_caprese)} ({100 * b.active_caprese / b.active_full:.1f}%)",
        ),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}".rstrip() for name, value in rows)
