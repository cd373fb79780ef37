"""Tiny random-weight models of every supported family, built from configs (no download)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    # Triton's kernels run on the CPU through its interpreter (tests/test_kernels_triton.py).
    # The switch must be set before anything imports triton: torch._dynamo does, so a test
    # module importing it, collected first, would otherwise leave the kernels compiled-only.
    os.environ.setdefault("TRITON_INTERPRET", "1")
import transformers  # noqa: E402

COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

FAMILY_CONFIGS = {
    "llama": (transformers.LlamaConfig, {}),
    "mistral": (transformers.MistralConfig, {"sliding_window": None}),
    "qwen2": (transformers.Qwen2Config, {}),
    "qwen3": (transformers.Qwen3Config, {}),
    "gemma2": (transformers.Gemma2Config, {"sliding_window": 16}),
    "gemma3_text": (transformers.Gemma3TextConfig, {"sliding_window": 16}),
}
FAMILIES = list(FAMILY_CONFIGS)


def tiny_model(family: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    config_class, extra = FAMILY_CONFIGS[family]
    config = config_class(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.eval()
    # Random init leaves the MLP outputs tiny next to the residual stream; scale them up so
    # that compressing the MLP changes the logits visibly.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "mlp" in name:
                param.mul_(4.0)
    return model


def pytest_collection_modifyitems(config, items):
    """The longest tests (marked slow) first: split between workers (pytest-xdist), a long
    test handed out last would hold up the end of the run alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


def prompt_ids(batch: int = 2, length: int = 10, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, COMMON["vocab_size"], (batch, length), generator=generator)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny Llama model and the word tokenizer saved as a model folder (what --model takes)."""
    from helpers import word_tokenizer  # helpers imports this module

    folder = tmp_path_factory.mktemp("tiny") / "model"
    tiny_model("llama").save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder
