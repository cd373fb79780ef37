"""Adapter life cycle: save/load, detach, teacher, training surface, and bad input."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import prompt_ids, tiny_model
from helpers import attached_copy, generate_with_logits, randomize_lowrank

import caprese
from caprese.io import atomic_write_text, sha256_file
from caprese.version import ADAPTER_FORMAT


def trained(family="llama", method="griffin"):
    base = tiny_model(family)
    model = attached_copy(base, method=method, density=0.5, rank=8)
    randomize_lowrank(model, scale=0.3)
    return base, model


@pytest.mark.parametrize("method", ["griffin", "cats"])
def test_save_then_load_reproduces_outputs_bit_for_bit(family, method, tmp_path):
    base, model = trained(family, method)
    caprese.save(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter.safetensors", "caprese_config.json"]
    loaded = caprese.load(copy.deepcopy(base), tmp_path / "adapter")
    assert caprese.config_of(loaded) == caprese.config_of(model)
    ids = prompt_ids()
    with torch.no_grad():
        tokens, logits = generate_with_logits(model, ids)
        tokens2, logits2 = generate_with_logits(loaded, ids)
    assert torch.equal(tokens, tokens2) and torch.equal(logits, logits2)


def test_a_bf16_file_gives_a_bf16_model_the_float32_files_outputs(tmp_path):
    base = tiny_model("llama").to(torch.bfloat16)
    model = attached_copy(base, method="griffin", density=0.5, rank=8)  # L, R in float32
    randomize_lowrank(model, scale=0.3)
    caprese.save(model, tmp_path / "fp32")
    caprese.save(model, tmp_path / "bf16", dtype=torch.bfloat16)
    size = {name: (tmp_path / name / "adapter.safetensors").stat().st_size
            for name in ("fp32", "bf16")}
    assert size["bf16"] < 0.6 * size["fp32"]
    ids = prompt_ids()
    outputs = []
    for name in ("fp32", "bf16"):
        loaded = caprese.load(copy.deepcopy(base), tmp_path / name)
        with torch.no_grad():
            outputs.append(generate_with_logits(loaded, ids))
    assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1])


def test_detach_restores_modules_and_outputs():
    base = tiny_model("qwen3")
    originals = [layer.mlp for layer in base.model.layers]
    ids = prompt_ids()
    for name, param in base.named_parameters():
        param.requires_grad_(name.endswith("norm.weight"))
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    with torch.no_grad():
        before = generate_with_logits(base, ids)[1]
    caprese.attach(base, caprese.CapreseConfig(method="cats", rank=8))
    randomize_lowrank(base)
    caprese.detach(base)
    assert [layer.mlp for layer in base.model.layers] == originals
    assert not hasattr(base, "_caprese") and "generate" not in vars(base)
    assert {n: p.requires_grad for n, p in base.named_parameters()} == flags
    with torch.no_grad():
        assert torch.equal(generate_with_logits(base, ids)[1], before)


def test_teacher_is_the_original_model(family):
    base, model = trained(family)
    ids = prompt_ids()
    with torch.no_grad():
        expected_tokens, expected = generate_with_logits(base, ids)
        student = generate_with_logits(model, ids)[1]
        with caprese.teacher(model):
            tokens, logits = generate_with_logits(model, ids)
            with caprese.split(model, [5, 5]):  # teacher wins over split as well
                split_logits = model(tokens).logits
    assert torch.equal(tokens, expected_tokens) and torch.equal(logits, expected)
    assert torch.equal(split_logits, base(tokens).logits)
    assert not torch.allclose(student, expected, atol=1e-3)


def test_only_L_and_R_train_and_base_weights_stay_put():
    base, model = trained("gemma3_text", "cats")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith((".L", ".R")) for n in trainable)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tokens = prompt_ids(2, 12)
    for _ in range(2):
        with caprese.split(model, [6, 8]):
            loss = model(tokens).logits[:, 6:].pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert any(block.R.abs().sum() > 0 for block in caprese.blocks(model).values())


def test_bad_configs_get_specific_errors():
    with pytest.raises(ValueError, match="density must be in"):
        caprese.CapreseConfig(density=0.0)
    with pytest.raises(ValueError, match="density must be in"):
        caprese.CapreseConfig(density=1.5)
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        caprese.CapreseConfig(rank=0)
    with pytest.raises(ValueError, match="unknown method 'teal'"):
        caprese.CapreseConfig(method="teal")
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="rank 32 must be smaller than the hidden size 32"):
        caprese.attach(model, caprese.CapreseConfig(rank=32))
    with pytest.raises(ValueError, match=r"layers \[7\] do not exist"):
        caprese.attach(model, caprese.CapreseConfig(layers=[0, 7]))
    assert not hasattr(model, "_caprese")  # a refused attach changes nothing
    caprese.attach(model, caprese.CapreseConfig(rank=4))
    with pytest.raises(ValueError, match="already attached"):
        caprese.attach(model, caprese.CapreseConfig(rank=4))


def test_unsupported_model_names_the_supported_ones():
    import transformers

    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)
    with pytest.raises(caprese.UnsupportedModelError, match="supports gated-MLP families.*llama"):
        caprese.attach(transformers.GPT2LMHeadModel(config), caprese.CapreseConfig())


def test_mismatched_adapter_says_what_differs(tmp_path):
    _, model = trained("llama")
    caprese.save(model, tmp_path)
    other = tiny_model("llama", intermediate_size=48)
    with pytest.raises(caprese.AdapterError, match="intermediate_size: adapter 64, model 48"):
        caprese.load(other, tmp_path)
    with pytest.raises(caprese.AdapterError, match="architecture: adapter 'LlamaForCausalLM'"):
        caprese.load(tiny_model("mistral"), tmp_path)
    assert not hasattr(other, "_caprese")


def test_corrupt_or_truncated_adapter_fails_clearly(tmp_path):
    base, model = trained("llama")
    caprese.save(model, tmp_path)
    weights = tmp_path / "adapter.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(caprese.AdapterError, match="corrupt, truncated"):
        caprese.load(copy.deepcopy(base), tmp_path)
    weights.unlink()
    with pytest.raises(caprese.AdapterError, match="directory is incomplete"):
        caprese.load(copy.deepcopy(base), tmp_path)
    (tmp_path / "caprese_config.json").write_text("{not json")
    with pytest.raises(caprese.AdapterError, match="not a valid caprese config"):
        caprese.load(copy.deepcopy(base), tmp_path)
    with pytest.raises(caprese.AdapterError, match="not found: is .* a caprese adapter"):
        caprese.load(copy.deepcopy(base), tmp_path / "missing")


def test_garbage_with_matching_checksum_is_still_refused(tmp_path):
    import hashlib

    base, model = trained("llama")
    caprese.save(model, tmp_path)
    garbage = b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}"
    (tmp_path / "adapter.safetensors").write_bytes(garbage)
    config = json.loads((tmp_path / "caprese_config.json").read_text())
    config["weights_sha256"] = hashlib.sha256(garbage).hexdigest()
    (tmp_path / "caprese_config.json").write_text(json.dumps(config))
    target = copy.deepcopy(base)
    with pytest.raises(caprese.AdapterError, match="not a readable safetensors file"):
        caprese.load(target, tmp_path)
    assert not hasattr(target, "_caprese")


def test_save_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    _, model = trained("llama")
    caprese.save(model, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    randomize_lowrank(model, seed=5)

    def failing_save(tensors, path, metadata=None):
        open(path, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("caprese.adapter.save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        caprese.save(model, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_an_atomic_write_makes_its_folder_and_leaves_nothing_else(tmp_path):
    target = tmp_path / "new" / "deeper" / "result.json"
    atomic_write_text(target, "{}")
    atomic_write_text(target, "[]")  # over its own file
    assert target.read_text() == "[]"
    assert list(target.parent.iterdir()) == [target]


def test_decode_without_prefill_and_cacheless_generation_are_refused():
    _, model = trained("llama")
    with pytest.raises(RuntimeError, match="decode before prefill"):
        with torch.no_grad(), caprese.forced_phase(model, caprese.Phase.DECODE):
            model(prompt_ids())
    with pytest.raises(ValueError, match="needs the KV cache"):
        model.generate(prompt_ids(), max_new_tokens=2, use_cache=False)


def test_deepcopy_of_an_attached_model_is_independent():
    """The copy's phase hook, blocks and generate are its own: changing the copy's path
    changes only the copy's generations, and the copy keeps the cache-less guard."""
    _, model = trained("llama")
    twin = copy.deepcopy(model)
    ids = prompt_ids()
    with torch.no_grad():
        logits = generate_with_logits(model, ids, steps=4)[1]
        assert torch.equal(generate_with_logits(twin, ids, steps=4)[1], logits)
        for block in caprese.blocks(twin).values():
            block.R.mul_(-20.0)
        changed = generate_with_logits(twin, ids, steps=4)[1]
        assert not torch.allclose(changed, logits)
        assert torch.equal(generate_with_logits(model, ids, steps=4)[1], logits)
        with caprese.split(twin, [ids.shape[1] - 2] * len(ids)):  # the copy's state
            twin(ids)
        assert caprese.phases.state_of(twin).phase is caprese.Phase.SPLIT
        assert caprese.phases.state_of(model).phase is not caprese.Phase.SPLIT
    with pytest.raises(ValueError, match="needs the KV cache"):
        twin.generate(ids, max_new_tokens=2, use_cache=False)
    caprese.detach(twin)
    assert torch.equal(generate_with_logits(model, ids, steps=4)[1], logits)


def test_lm_head_input_gets_standard_strides_for_one_prompt():
    """A (1, 1, D) slice counts as contiguous but keeps its strides, which sends frozen
    weights down PyTorch's slow copy-the-weight path; attach hands the head a real copy."""
    from caprese.adapter import standard_strides

    model = caprese.attach(tiny_model("llama"), caprese.CapreseConfig(method="griffin", rank=4))
    seen = []
    model.get_output_embeddings().register_forward_pre_hook(
        lambda module, args: seen.append((args[0].shape, args[0].stride())))
    ids = prompt_ids(1, 10)
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                       do_sample=False, pad_token_id=0)
    assert len(seen) == 3
    assert all(stride == standard_strides(shape) for shape, stride in seen)
    assert standard_strides((1, 1, 32)) == (32, 32, 1)


FIXTURES = Path(__file__).resolve().parent / "fixtures"


def test_an_adapter_of_format_1_still_loads_and_generates_as_it_did():
    """tests/fixtures/adapter-format1 was saved by caprese 0.1 (no version fields); the tokens
    are what 0.1 generated with it."""
    info = caprese.read_adapter(FIXTURES / "adapter-format1")
    assert (info.format, info.caprese_version, info.trained) == (1, None, {})
    model = caprese.load(tiny_model("llama"), FIXTURES / "adapter-format1")
    ids = prompt_ids()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                             do_sample=False, pad_token_id=0)
    assert out[:, 10:].tolist() == [[44, 64, 37, 69, 74, 69], [10, 80, 70, 35, 10, 80]]


def test_saved_adapters_record_format_version_and_stage(tmp_path):
    model = attached_copy(tiny_model("llama"), method="cats", density=0.5, rank=4)
    caprese.save(model, tmp_path / "a", trained={"stage": "e2e"})
    record = json.loads((tmp_path / "a" / "caprese_config.json").read_text())
    assert record["format"] == ADAPTER_FORMAT == 2
    assert record["caprese_version"] == caprese.__version__
    info = caprese.read_adapter(tmp_path / "a")
    assert info.trained == {"stage": "e2e"} and info.config.method == "cats"
    from caprese.evaluate.variant import Variant

    described = Variant("m", adapter=str(tmp_path / "a")).describe()
    assert described["kind"] == "e2e"
    # a result names the adapter it measured by its weights, not only by a folder's name
    assert described["adapter_sha256"] == sha256_file(tmp_path / "a" / "adapter.safetensors")
    record["format"] = ADAPTER_FORMAT + 1
    (tmp_path / "a" / "caprese_config.json").write_text(json.dumps(record))
    with pytest.raises(caprese.AdapterError, match="upgrade caprese"):
        caprese.load(tiny_model("llama"), tmp_path / "a")
