"""Shared test utilities: generation with per-step logits, model copies, a word tokenizer."""

from __future__ import annotations

import copy
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import caprese
from tests.conftest import COMMON

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def benchmark_script(name: str):
    """A script of benchmarks/ (not a package) imported as a module."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def generate_with_logits(model, ids, steps=4, attention_mask=None, **kwargs):
    """Greedy tokens (B, S + steps) and the logits of every generated step (B, steps, V)."""
    out = model.generate(
        ids,
        attention_mask=attention_mask if attention_mask is not None else torch.ones_like(ids),
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
        **kwargs,
    )
    return out.sequences, torch.stack(out.logits, dim=1)


def attached_copy(model, **config):
    return caprese.attach(copy.deepcopy(model), caprese.CapreseConfig(**config))


def randomize_lowrank(model, seed=0, scale=0.5):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in caprese.blocks(model).values():
            block.L.copy_(torch.randn(block.L.shape, generator=generator) * scale)
            block.R.copy_(torch.randn(block.R.shape, generator=generator) * scale)


def set_fused(model, fused: bool) -> None:
    caprese.set_decode(model, fused=fused)


WORDS = ["<pad>", "<s>", "</s>", "<unk>"] + [f"t{i}" for i in range(4, COMMON["vocab_size"])]


def word_tokenizer() -> PreTrainedTokenizerFast:
    """One token per space-separated word "tN" (id N): readable, offline, matches the tiny vocab."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def kill_and_resume_job(tmp_path: Path, options: list[str], marker: str, count: int,
                        delay: str, check_killed=None) -> tuple[Path, Path]:
    """distill_job.py straight to the end, and again SIGKILLed once its run log holds `count`
    lines with `marker` (each logged step slowed by `delay` s), checked by check_killed(dir),
    then resumed. Returns (straight, resumed) run directories."""
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": str(tests), "HF_HUB_OFFLINE": "1"}
    job = [sys.executable, str(tests / "distill_job.py")]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run([*job, str(straight), *options], env=env, check=True, capture_output=True)
    process = subprocess.Popen([*job, str(killed), delay, *options], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = killed / "run_log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if log.is_file() and sum(marker in line for line in open(log)) >= count:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "adapter.safetensors").exists(), "the run finished before the kill"
    if check_killed is not None:
        check_killed(killed)
    subprocess.run([*job, str(killed), "--resume", *options], env=env, check=True,
                   capture_output=True)
    return straight, killed


class RecordedPeer:
    """Stands in for bench.peer.LlamaCppPeer: greedy tokens given in advance, fixed timings."""

    def __init__(self, tokens: list[int]) -> None:
        self.tokens = tokens

    def decode(self, prompt: list[int], gen_len: int) -> dict:
        return {"tokens": self.tokens[:gen_len], "ttft": 0.5, "steps": [0.01] * (gen_len - 1),
                "peak": None}
