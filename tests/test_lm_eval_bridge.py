"""The lm-evaluation-harness bridge on a tiny model with small local tasks (no downloads)."""

from __future__ import annotations

import json

import lm_eval
import pytest
import torch
from lm_eval.tasks import TaskManager

import caprese
from caprese.cli import main
from caprese.evaluate.lm_eval_bridge import CapreseLM
from caprese.phases import cache_argument
from tests.conftest import tiny_model
from tests.helpers import WORDS, randomize_lowrank, word_tokenizer


def caprese_model():
    model = caprese.attach(tiny_model("llama"), caprese.CapreseConfig(method="griffin",
                                                                      density=0.5, rank=4))
    randomize_lowrank(model, scale=0.3)
    return model


def decoded_loglikelihood(model, context: list[int], continuation: list[int]) -> float:
    """The generation path: prefill the context with a KV cache, then decode token by token."""
    name = cache_argument(model)  # `cache` in recent transformers, `past_key_values` before
    with torch.no_grad():
        out = model(torch.tensor([context]), use_cache=True)
        logits, cache, total = out.logits[0, -1], getattr(out, name), 0.0
        for token in continuation:
            total += float(logits.float().log_softmax(-1)[token])
            out = model(torch.tensor([[token]]), **{name: cache}, use_cache=True)
            logits, cache = out.logits[0, -1], getattr(out, name)
    return total


def words(ids) -> str:
    return " ".join(WORDS[i] for i in ids)


def test_loglikelihood_scores_the_continuation_as_decode():
    model, generator = caprese_model(), torch.Generator().manual_seed(3)
    lm = CapreseLM(model, word_tokenizer(), batch_size=3)
    pairs = [(torch.randint(4, 96, (n,), generator=generator).tolist(),
              torch.randint(4, 96, (m,), generator=generator).tolist())
             for n, m in [(7, 5), (4, 1), (9, 3), (5, 6)]]
    got = lm._loglikelihood_tokens([(None, c, t) for c, t in pairs], disable_tqdm=True)
    for (context, continuation), (score, _) in zip(pairs, got, strict=True):
        assert score == pytest.approx(decoded_loglikelihood(model, context, continuation),
                                      abs=1e-4)
    # lm-eval's own backend (one cache-less forward = all prefill) would score differently.
    context, continuation = pairs[0]
    with torch.no_grad():
        dense = model(torch.tensor([context + continuation]), use_cache=False).logits[0]
    dense_score = float(dense[len(context) - 1:-1].float().log_softmax(-1)
                        .gather(1, torch.tensor(continuation)[:, None]).sum())
    assert abs(got[0][0] - dense_score) > 1e-3


def write_tasks(folder) -> None:
    generator = torch.Generator().manual_seed(5)
    rows = [{"query": words(torch.randint(4, 96, (6,), generator=generator).tolist()),
             "choices": [words(torch.randint(4, 96, (k,), generator=generator).tolist())
                         for k in (1, 2, 3)], "gold": i % 3, "answer": "t9"} for i in range(6)]
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
              "test_split: test\ndoc_to_text: '{{query}}'\n")
    (folder / "tiny_choice.yaml").write_text(
        "task: tiny_choice\noutput_type: multiple_choice\n" + common +
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{gold}}'\nmetric_list:\n"
        "  - metric: acc\n")
    (folder / "tiny_gen.yaml").write_text(
        "task: tiny_gen\noutput_type: generate_until\n" + common +
        "doc_to_target: '{{answer}}'\ngeneration_kwargs:\n  until: ['t50']\n"
        "  max_gen_toks: 4\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n")


def test_simple_evaluate_runs_local_tasks_through_the_phases(tmp_path):
    write_tasks(tmp_path)
    model, tokenizer = caprese_model(), word_tokenizer()
    output = lm_eval.simple_evaluate(
        model=CapreseLM(model, tokenizer, batch_size=4), tasks=["tiny_choice", "tiny_gen"],
        task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True)
    docs = [json.loads(line) for line in (tmp_path / "docs.jsonl").read_text().splitlines()]
    ids = tokenizer.convert_tokens_to_ids
    expected_acc = sum(
        max(range(3), key=lambda k: decoded_loglikelihood(
            model, ids(d["query"].split()), ids(d["choices"][k].split()))) == d["gold"]
        for d in docs) / len(docs)
    assert output["results"]["tiny_choice"]["acc,none"] == pytest.approx(expected_acc)
    for sample in output["samples"]["tiny_gen"]:
        prompt = torch.tensor([ids(sample["doc"]["query"].split())])
        tokens = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4,
                                do_sample=False, pad_token_id=0)[0, prompt.shape[1]:]
        text = tokenizer.decode(tokens, skip_special_tokens=True).split("t50")[0]
        assert sample["resps"][0][0] == text


def test_cli_writes_results_for_a_saved_model(tmp_path):
    write_tasks(tmp_path)
    folder = tmp_path / "model"
    tiny_model("llama").save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    out = tmp_path / "results.json"
    code = main(["lm-eval", "--model", str(folder), "--method", "griffin", "--dtype", "fp32",
                 "--tasks", "tiny_choice", "--include-path", str(tmp_path), "--out", str(out)])
    assert code == 0
    record = json.loads(out.read_text())
    assert record["variant"]["method"] == "griffin"
    assert 0.0 <= record["summary"]["tiny_choice"]["acc,none"] <= 1.0
    assert record["setup"]["command"].startswith("caprese lm-eval --model")
    assert main(["lm-eval", "--model", str(folder), "--tasks", "tiny_choice",
                 "--include-path", str(tmp_path / "missing"), "--out", str(out)]) == 2


def test_generation_tasks_reselect_like_the_lean_decode_loop(tmp_path):
    from caprese.bench.decode import greedy_decode
    from caprese.generation import end_ids

    write_tasks(tmp_path)
    longer = (tmp_path / "tiny_gen.yaml").read_text().replace("tiny_gen", "tiny_gen_long")
    (tmp_path / "tiny_gen_long.yaml").write_text(longer.replace("max_gen_toks: 4",
                                                                "max_gen_toks: 12"))
    model, tokenizer = caprese_model(), word_tokenizer()
    caprese.set_reselection(model, 2)  # GRIFFIN's rho: dense re-run and new neurons every 2
    output = lm_eval.simple_evaluate(
        model=CapreseLM(model, tokenizer, batch_size=4), tasks=["tiny_gen_long"],
        task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True)
    ids = tokenizer.convert_tokens_to_ids
    changed = 0
    for sample in output["samples"]["tiny_gen_long"]:
        prompt = torch.tensor([ids(sample["doc"]["query"].split())])
        tokens = greedy_decode(model, prompt, 12, static_cache=False).tokens[0]
        ends = [i for i, t in enumerate(tokens.tolist()) if t in end_ids(model, tokenizer)]
        text = tokenizer.decode(tokens[: ends[0] if ends else None],
                                skip_special_tokens=True).split("t50")[0]
        assert sample["resps"][0][0] == text
        caprese.set_reselection(model, None)
        changed += not torch.equal(greedy_decode(model, prompt, 12).tokens[0], tokens)
        caprese.set_reselection(model, 2)
    assert changed  # reselection changed some answers: the comparison above means something
