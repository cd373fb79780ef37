"""The llama.cpp peer: its GGUF holds exactly caprese's weights, and it decodes like us."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from caprese.bench.peer import dense_gguf  # noqa: E402


def quantized_gguf(path) -> dict[str, np.ndarray]:
    """A small GGUF with a Q8_0 tensor, an F32 one and metadata of several kinds; returns the
    tensors' dequantized values."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_token_list(["a", "b", "c"])
    writer.add_uint32("llama.block_count", 1)
    generator = np.random.default_rng(0)
    weight = generator.standard_normal((8, 64)).astype(np.float32)
    norm = generator.standard_normal(64).astype(np.float32)
    quantized = gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.ffn_up.weight", quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.ffn_norm.weight", norm)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    dequantized = gguf.quants.dequantize(quantized, gguf.GGMLQuantizationType.Q8_0)
    return {"blk.0.ffn_up.weight": dequantized, "blk.0.ffn_norm.weight": norm}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_gguf_holds_the_weights_caprese_loads(tmp_path, dtype):
    expected = quantized_gguf(tmp_path / "q8.gguf")
    dense_gguf(tmp_path / "q8.gguf", tmp_path / "dense.gguf", dtype)
    reader = gguf.GGUFReader(tmp_path / "dense.gguf")
    assert reader.fields["general.name"].contents() == "tiny"
    assert reader.fields["tokenizer.ggml.tokens"].contents() == ["a", "b", "c"]
    assert reader.fields["llama.block_count"].contents() == 1
    file_type = gguf.LlamaFileType.ALL_F32 if dtype == torch.float32 else \
        gguf.LlamaFileType.MOSTLY_BF16
    assert reader.fields["general.file_type"].contents() == file_type
    for tensor in reader.tensors:  # vectors stay f32, as llama.cpp's converter keeps them
        vector = len(tensor.shape) == 1
        raw = "F32" if dtype == torch.float32 or vector else "BF16"
        assert tensor.tensor_type.name == raw
        caprese_values = torch.tensor(expected[tensor.name]).to(torch.bfloat16)  # as loaded
        stored = torch.tensor(np.asarray(tensor.data).copy())
        if raw == "BF16":
            stored = stored.view(torch.int16).view(torch.bfloat16)
        assert torch.equal(stored.reshape(caprese_values.shape).float(), caprese_values.float())


def test_dense_gguf_refuses_other_dtypes(tmp_path):
    quantized_gguf(tmp_path / "q8.gguf")
    with pytest.raises(ValueError, match="float16"):
        dense_gguf(tmp_path / "q8.gguf", tmp_path / "dense.gguf", torch.float16)
    assert not (tmp_path / "dense.gguf").exists()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="benchmark-only extra: pip install 'caprese[peer]'")
def test_the_peer_decodes_the_same_tokens_as_the_full_model():
    """smollm2-135m in fp32 through llama.cpp and through caprese's bench, one run."""
    from caprese.bench.latency import run_bench
    from caprese.bench.peer import LlamaCppPeer, peer_gguf
    from caprese.models import load_model

    name = "smollm2-135m-instruct"
    model, _ = load_model(name, dtype="fp32")
    with LlamaCppPeer(peer_gguf(name, torch.float32), 2, 64) as peer:
        result = run_bench(model, ["full"], prompt_len=24, gen_len=12, repeats=1, peer=peer)
    rows = {r["variant"]: r for r in result["variants"]}
    assert rows["llama.cpp"]["tokens_agree"] >= 0.9
    assert rows["llama.cpp"]["ttnt"] > 0 and rows["llama.cpp"]["bytes_per_token"] == \
        rows["full"]["bytes_per_token"]


@pytest.mark.parametrize("flags, message", [
    (["--model", "TINY"], "needs a built-in model"),
    (["--model", "smollm2-135m-instruct", "--batch", "2"], "is timed at --batch 1"),
])
def test_bench_refuses_a_peer_it_cannot_compare(tiny_dir, capsys, flags, message):
    """Refused before any model loads, with what to do instead."""
    from caprese.cli import main

    flags = [str(tiny_dir) if flag == "TINY" else flag for flag in flags]
    assert main(["bench", "--peer", "llama.cpp", *flags]) == 2
    assert message in capsys.readouterr().err
