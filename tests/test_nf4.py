"""The 4-bit method (NF4 through bitsandbytes): the same phases, distillation and adapters."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import prompt_ids, tiny_model
from distill_job import tiny_samples
from helpers import attached_copy, generate_with_logits, randomize_lowrank

import caprese
from caprese.adapter import AdapterError
from caprese.distillation import DistillSettings, distill
from caprese.methods.nf4 import SETTINGS

pytest.importorskip("bitsandbytes")  # the `quant` extra (in dev and CI installs)


def dequantized_mlp(block, x: torch.Tensor) -> torch.Tensor:
    """The MLP on the dequantized NF4 weights, in plain PyTorch."""
    quantized = block.replacement
    gate = x @ quantized.gate.dequantized().t()
    up = x @ quantized.up.dequantized().t()
    return (block.mlp.act_fn(gate) * up) @ quantized.down.dequantized().t()


def test_prefill_is_dense_and_decode_runs_the_4bit_mlp_plus_the_path(family):
    base = tiny_model(family)
    model = attached_copy(base, method="nf4", rank=8)
    randomize_lowrank(model, scale=0.3)
    ids = prompt_ids()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)  # the prompt: dense weights
        for block in caprese.blocks(model).values():  # no fused layout is built for it
            assert block.fast is None and not block._moved
        x = torch.randn(2, 1, base.config.hidden_size)
        with caprese.forced_phase(model, caprese.Phase.DECODE):
            for block in caprese.blocks(model).values():
                expected = dequantized_mlp(block, x) + x @ block.L @ block.R
                torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)
                dense = block.mlp(x)
                assert not torch.allclose(block(x) - x @ block.L @ block.R, dense)  # 4-bit


def test_split_equals_step_by_step_generation_and_zero_R_the_method(family):
    model = attached_copy(tiny_model(family), method="nf4", rank=8)
    alone = attached_copy(tiny_model(family), method="nf4", rank=None)
    ids = prompt_ids(length=9)
    with torch.no_grad():
        tokens, zero_logits = generate_with_logits(model, ids, steps=5)
        ref_tokens, ref_logits = generate_with_logits(alone, ids, steps=5)
        assert torch.equal(tokens, ref_tokens)
        torch.testing.assert_close(zero_logits, ref_logits, rtol=1e-5, atol=1e-5)
        randomize_lowrank(model, scale=0.3)
        tokens, step_logits = generate_with_logits(model, ids, steps=5)
        with caprese.split(model, [9, 9]):
            logits = model(tokens).logits
    torch.testing.assert_close(logits[:, 8:-1], step_logits, rtol=1e-4, atol=1e-4)


def test_the_4bit_copy_is_a_quarter_of_the_mlp_bytes():
    model = attached_copy(tiny_model("llama").to(torch.bfloat16), method="nf4", rank=None)
    for block in caprese.blocks(model).values():
        weights = sum(getattr(block.mlp, name).weight.numel()
                      for name in ("gate_proj", "up_proj", "down_proj"))
        # 4 bits per weight plus one float32 absmax per block of 64 weights
        assert block.replacement.nbytes() == weights // 2 + weights // SETTINGS["blocksize"] * 4


def test_distillation_fits_the_4bit_residual(tmp_path):
    model = caprese.attach(tiny_model("qwen2"), caprese.CapreseConfig(method="nf4", rank=8))
    summary = distill(model, tiny_samples(48), tmp_path, DistillSettings(stages=("layerwise",)),
                      held_out=tiny_samples(12, seed=3))
    check = summary["adapter_check"]["math"]
    assert check["kl_caprese"] < check["kl_method"]
    config = json.loads((tmp_path / "caprese_config.json").read_text())
    assert config["method"] == "nf4" and config["quantizer"] == SETTINGS


def test_an_adapter_fitted_against_another_quantizer_is_refused(tmp_path):
    model = attached_copy(tiny_model("llama"), method="nf4", rank=4)
    randomize_lowrank(model)
    caprese.save(model, tmp_path / "adapter")
    loaded = caprese.load(tiny_model("llama"), tmp_path / "adapter")
    assert caprese.config_of(loaded).quantizer == SETTINGS
    path = tmp_path / "adapter" / "caprese_config.json"
    record = json.loads(path.read_text())
    record["quantizer"] = {**SETTINGS, "blocksize": 128}
    path.write_text(json.dumps(record))
    with pytest.raises(AdapterError, match="fitted against the quantizer .*blocksize.*128"):
        caprese.load(tiny_model("llama"), tmp_path / "adapter")
