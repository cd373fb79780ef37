"""GRIFFIN's reselection (rho): dense re-runs of the decoded tokens, scores added, new neurons."""

from __future__ import annotations

import pytest
import torch
from conftest import prompt_ids, tiny_model
from helpers import attached_copy, randomize_lowrank, word_tokenizer
from transformers import DynamicCache

import caprese
from caprese.bench.decode import greedy_decode
from caprese.cli import main
from caprese.generation import GenerationSettings, generate
from caprese.methods.griffin import griffin_scores

MAX_NEW = 11


def griffin(rho: int | None, rank: int | None = 8, density: float = 0.5):
    model = attached_copy(tiny_model("qwen2"), method="griffin", density=density, rank=rank,
                          reselect_every=rho)
    if rank:
        randomize_lowrank(model, scale=0.3)
    return model


def texts() -> list[str]:
    return [" ".join(f"t{4 + (7 * i + 5 * j) % 90}" for j in range(5 + 3 * i)) for i in range(3)]


def run(model, prompts: list[str], batch_size: int) -> list[tuple[int, ...]]:
    model.generation_config.eos_token_id = None  # every answer runs to MAX_NEW tokens
    settings = GenerationSettings(max_new_tokens=MAX_NEW, batch_size=batch_size)
    return [row[0].ids for row in generate(model, word_tokenizer(), prompts, settings,
                                           progress=False)]


def test_rho_zero_is_the_full_model_and_rho_past_the_end_is_griffin():
    base = tiny_model("qwen2")
    full = run(base, texts(), 3)
    assert run(griffin(0), texts(), 3) == full
    never = run(griffin(None), texts(), 3)
    assert never != full  # the method changes the text, so the checks below mean something
    assert run(griffin(MAX_NEW + 5), texts(), 3) == never
    assert run(griffin(3), texts(), 3) != never  # reselection changes what is decoded


def test_batched_equals_one_by_one():
    model = griffin(3)
    assert run(model, texts(), 3) == [run(model, [text], 1)[0] for text in texts()]


def dense_hidden(model, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """Each block's dense MLP activations z over `ids` (the original model)."""
    found = {}
    hooks = [block.mlp.down_proj.register_forward_pre_hook(
        lambda module, args, index=index: found.__setitem__(index, args[0]))
        for index, block in caprese.blocks(model).items()]
    with torch.no_grad(), caprese.teacher(model):
        model(ids)
    for hook in hooks:
        hook.remove()
    return found


@pytest.mark.parametrize("rho", [3, 4])
def test_the_lean_loop_reselects_like_generate_and_scores_all_tokens_so_far(rho):
    model = griffin(rho)
    ids = prompt_ids(1, 7)
    model.generation_config.eos_token_id = None
    run_ = greedy_decode(model, ids, MAX_NEW)
    with torch.no_grad():
        expected = generate(model, word_tokenizer(), [ids[0].tolist()],
                            GenerationSettings(max_new_tokens=MAX_NEW), progress=False)
    assert run_.tokens[0].tolist() == list(expected[0][0].ids)
    # The last reselection took every token up to the one before it: the direct scores of
    # prompt + those tokens, computed from scratch on the dense model, are the block's.
    last = (MAX_NEW - 1) // rho * rho
    sequence = torch.cat([ids, run_.tokens[:, : last - 1]], dim=1)
    for index, hidden in dense_hidden(model, sequence).items():
        block = caprese.blocks(model)[index]
        direct = griffin_scores(hidden, torch.ones(hidden.shape[:2], dtype=torch.bool))
        torch.testing.assert_close(block.scores, direct, rtol=1e-5, atol=1e-6)
        assert torch.equal(block.selection, block.method.select_top(direct))


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch, as transformers' generate numbers them."""
    return (mask.cumsum(-1) - 1).clamp_min(0)


def test_the_rescored_cache_equals_a_dense_forward_over_the_same_tokens():
    model = griffin(None)
    ids = prompt_ids(2, 6)
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0  # the second sample is left-padded
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions_of(mask),
                       cache=cache, use_cache=True).logits
        decoded = [logits[:, -1:].argmax(-1)]
        for _ in range(4):  # compressed decode steps write their own keys and values
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
            logits = model(input_ids=decoded[-1], attention_mask=mask,
                           position_ids=positions_of(mask)[:, -1:], cache=cache,
                           use_cache=True).logits
            decoded.append(logits[:, -1:].argmax(-1))
        window = torch.cat(decoded[:-1], dim=1)  # in the cache; the last one is not yet
        before = [layer.keys.clone() for layer in cache.layers]
        caprese.phases.rescore(model, window, mask, cache)
        dense = DynamicCache(config=model.config)
        with caprese.teacher(model):
            model(input_ids=torch.cat([ids, window], dim=1), attention_mask=mask,
                  position_ids=positions_of(mask), cache=dense, use_cache=True)
    assert cache.get_seq_length() == 10
    for layer, (got, want) in enumerate(zip(cache.layers, dense.layers, strict=True)):
        torch.testing.assert_close(got.keys, want.keys, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.values, want.values, rtol=1e-5, atol=1e-6)
        if layer > 0:  # the first layer's keys come before any MLP: equal either way
            assert not torch.allclose(before[layer][:, :, 6:], want.keys[:, :, 6:])


def test_reselection_is_griffins_and_is_checked():
    with pytest.raises(ValueError, match="reselection .* is GRIFFIN's: cats"):
        caprese.CapreseConfig(method="cats", reselect_every=32)
    with pytest.raises(ValueError, match="reselect_every must be an integer >= 0"):
        caprese.CapreseConfig(method="griffin", reselect_every=-1)
    model = griffin(4)
    settings = GenerationSettings(max_new_tokens=4, compile="inductor")
    with pytest.raises(ValueError, match="cannot reselect"):
        generate(model, word_tokenizer(), ["t5 t6"], settings, progress=False)


def test_eval_and_bench_take_rho(tmp_path, tiny_dir, capsys):
    import json

    from caprese.bench.latency import parse_variant, run_bench

    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"problem": f"t{i} t{i + 1}", "answer": str(i)}) + "\n"
                            for i in range(4, 8)))
    out = tmp_path / "rho.json"
    assert main(["eval", "--model", str(tiny_dir), "--method", "griffin", "--reselect-every",
                 "2", "--task", str(task), "--max-new-tokens", "6", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["variant"]["reselect_every"] == 2
    assert main(["eval", "--model", str(tiny_dir), "--method", "cats", "--reselect-every", "2",
                 "--task", str(task), "--out", str(tmp_path / "cats.json")]) == 2
    assert "GRIFFIN's" in capsys.readouterr().err
    result = run_bench(tiny_model("llama"), ["griffin", "griffin@2", "caprese@3"],
                       prompt_len=8, gen_len=7, repeats=1, rank=4)
    rows = {r["variant"]: r for r in result["variants"]}
    assert rows["griffin@2"]["bytes_per_token"] > rows["griffin"]["bytes_per_token"]
    for bad in ("cats@2", "full@2", "griffin@x"):
        with pytest.raises(ValueError, match="RHO"):
            parse_variant(bad)


def test_results_record_the_rho_an_adapter_was_saved_with(tmp_path):
    """A report pairs a Caprese row with the GRIFFIN run of the same rho, so an adapter's own
    rho is recorded, and --reselect-every overrides it."""
    from caprese.evaluate.variant import Variant

    caprese.save(griffin(32, rank=4), tmp_path / "a")
    assert Variant("m", adapter=str(tmp_path / "a")).describe()["reselect_every"] == 32
    assert Variant("m", adapter=str(tmp_path / "a"),
                   reselect_every=8).describe()["reselect_every"] == 8
    caprese.save(griffin(None, rank=4), tmp_path / "b")
    assert "reselect_every" not in Variant("m", adapter=str(tmp_path / "b")).describe()
