"""What handing the heap back after every E2E micro-batch costs in time, and what it saves.

caprese.heap.release() (glibc's malloc_trim) runs after each E2E micro-batch so that the
stage's resident memory stays near its live tensors instead of growing with the heap's
holes. The pages it hands back are taken again, zeroed by the kernel, by the next micro-batch:
that is its cost. Here one process runs E2E micro-batches (forward and backward of the real
loss, caprese.distillation.e2e) in blocks that alternate between the two modes: "release"
trims after each micro-batch (timed with the trim), "keep" does not. Both modes see the same
sequence lengths in the same order within a round. The first micro-batch of each block is not
timed (it pays for the mode before it). Each round gives the ratio of the two median
micro-batch times; the table gives the median of those ratios and the resident memory each
mode ended its blocks with. Sequences are random tokens with prompt and continuation lengths
drawn like the teacher text's (the cost of a step does not depend on which tokens they are).

    python benchmarks/heap_release.py --model qwen2.5-coder-1.5b-instruct --method cats \\
        --out benchmarks/results/heap_release_zen5.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

import caprese
from caprese import heap
from caprese.bench.memory import rss_bytes
from caprese.distillation.e2e import e2e_loss
from caprese.io import atomic_write_text
from caprese.kernels.cpu import machine
from caprese.models import load_model
from caprese.samples import Sample, collate

MODES = ("keep", "release")


def micro_batches(rounds: int, per_block: int, size: int, vocab: int, seed: int,
                  prompt: tuple[int, int], continuation: tuple[int, int]) -> list[list[Sample]]:
    """The micro-batches of one block of each round (both modes run the same ones)."""
    rng = random.Random(seed)
    blocks = []
    for _ in range(rounds * per_block):
        batch = []
        for _ in range(size):
            n_prompt, n_cont = rng.randint(*prompt), rng.randint(*continuation)
            ids = tuple(rng.randrange(vocab) for _ in range(n_prompt + n_cont))
            batch.append(Sample(ids, n_prompt))
        blocks.append(batch)
    return blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--method", default="cats")
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--micro-batch", type=int, default=4, help="sequences per micro-batch")
    parser.add_argument("--per-block", type=int, default=3,
                        help="micro-batches per block; the first of each is not timed")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompt", type=int, nargs=2, default=(60, 200),
                        help="prompt lengths drawn from this range (tokens)")
    parser.add_argument("--continuation", type=int, nargs=2, default=(100, 450),
                        help="continuation lengths drawn from this range (tokens)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    caprese.attach(model, caprese.CapreseConfig(method=args.method, density=args.density,
                                                rank=args.rank))
    loss_fn = e2e_loss(model, "mse")
    pad_id = tokenizer.pad_token_id or 0
    batches = micro_batches(args.rounds, args.per_block, args.micro_batch,
                            model.config.vocab_size, args.seed, args.prompt, args.continuation)
    rows = []
    for round_index in range(args.rounds):
        mine = batches[round_index * args.per_block : (round_index + 1) * args.per_block]
        order = MODES if round_index % 2 == 0 else MODES[::-1]
        result = {"round": round_index}
        for mode in order:
            seconds = []
            for position, chunk in enumerate(mine):
                tokens = sum(len(s.input_ids) - s.boundary for s in chunk)
                started = time.perf_counter()
                loss_fn(collate(chunk, pad_id), 1.0 / tokens)
                if mode == "release":
                    heap.release()
                if position > 0:
                    seconds.append(time.perf_counter() - started)
                model.zero_grad(set_to_none=True)
            result[f"{mode}_s"] = statistics.median(seconds)
            result[f"{mode}_resident_gib"] = rss_bytes() / 2**30
        result["ratio"] = result["release_s"] / result["keep_s"]
        rows.append(result)
        print(f"round {round_index}: keep {result['keep_s']:.3g} s, release "
              f"{result['release_s']:.3g} s, ratio {result['ratio']:.3f}", flush=True)

    summary = {
        "machine": machine(),
        "model": args.model,
        "method": args.method,
        "density": args.density,
        "rank": args.rank,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "micro_batch": args.micro_batch,
        "per_block": args.per_block,
        "prompt_lengths": list(args.prompt),
        "continuation_lengths": list(args.continuation),
        "median_ratio_release_over_keep": statistics.median(r["ratio"] for r in rows),
        "rounds": rows,
    }
    print(f"\n{summary['model']} {summary['method']} {summary['dtype']}, micro-batch "
          f"{args.micro_batch}, {summary['threads']} threads, {summary['machine']}")
    print("| mode | median s per micro-batch (rounds) | resident after its blocks, GiB |")
    print("|---|---|---|")
    for mode in MODES:
        times = ", ".join(f"{r[f'{mode}_s']:.3g}" for r in rows)
        memory = ", ".join(f"{r[f'{mode}_resident_gib']:.1f}" for r in rows)
        print(f"| {mode} | {times} | {memory} |")
    print(f"median of the rounds' ratios release / keep: "
          f"{summary['median_ratio_release_over_keep']:.3f}")
    if args.out:
        atomic_write_text(args.out, json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
