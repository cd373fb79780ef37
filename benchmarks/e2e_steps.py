"""Issue-4 evidence: how the held-out KL gap closes with the number of end-to-end steps.

distill_quality.py runs a short E2E stage (16 steps). This script starts from a layer-wise
adapter that run wrote (its --work folder keeps them: <work>/<method>-closed_form/stages/
layerwise) and trains E2E longer on the same training samples, scoring KL(teacher || student)
on the first --eval-samples held-out samples every --every steps and on all held-out samples
at the end. Prints a table and writes benchmarks/results/e2e_steps_<method>.json.

    python benchmarks/e2e_steps.py --method griffin \
        --layerwise /tmp/caprese-distill-quality/griffin-closed_form/stages/layerwise
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import caprese
from caprese.distillation.e2e import e2e_loss
from caprese.distillation.trainer import TrainSettings, train
from caprese.io import atomic_write_text
from caprese.models import weights_description

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_quality import (  # noqa: E402
    RESULTS,
    add_data_args,
    add_dtype_arg,
    dtype_name,
    load_model_for,
    mixture_split,
    scored,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--method", default="griffin")
    parser.add_argument("--layerwise", required=True, help="layer-wise adapter to start from")
    parser.add_argument("--rank", type=int, default=256, help="the --layerwise adapter's rank")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--held-out", type=int, default=200)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--objective", default="mse", choices=["mse", "kl"])
    parser.add_argument("--batch", type=int, default=16, help="sequences per step")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--every", type=int, default=25, help="score every N steps")
    parser.add_argument("--eval-samples", type=int, default=60)
    parser.add_argument("--out", help="result file (default: results/e2e_steps_<method>.json)")
    add_dtype_arg(parser)
    add_data_args(parser)
    args = parser.parse_args()

    model, tokenizer = load_model_for(args)
    pad_id = tokenizer.pad_token_id or 0
    train_set, held_out = mixture_split(tokenizer, args, args.max_length)
    caprese.attach(model, caprese.CapreseConfig(method=args.method, density=0.5, rank=args.rank))
    alone = scored(model, held_out, pad_id, 8)
    caprese.load_weights(model, args.layerwise)
    probe = held_out[:args.eval_samples]
    trajectory = []
    print(f"| step | KL on {len(probe)} held-out | top-1 % |", flush=True)

    def on_step(step: int) -> None:
        if step % args.every == 0:
            trajectory.append({"step": step, **scored(model, probe, pad_id, 8)})
            print(f"| {step} | {trajectory[-1]['kl']:.4f} | {100 * trajectory[-1]['top1']:.1f} |",
                  flush=True)

    on_step(0)  # the layer-wise start

    settings = TrainSettings("e2e", args.lr, args.epochs, args.batch, args.micro_batch,
                             0.02, 10**6, 0)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        losses = train(model, train_set, e2e_loss(model, args.objective), settings,
                       Path(run_dir), pad_id, on_step=on_step)
    seconds = time.perf_counter() - started
    final = scored(model, held_out, pad_id, 8)
    caprese.load_weights(model, args.layerwise)
    scored_layerwise = scored(model, held_out, pad_id, 8)
    gap = alone["kl"]
    report = {
        "setup": {**vars(args), "weights": weights_description(args.model),
                  "dtype": dtype_name(args), "threads": torch.get_num_threads(),
                  "steps": len(losses),
                  "train_seconds_with_scoring": seconds},
        "method_alone": alone, "layerwise": scored_layerwise, "e2e": final,
        "kl_gap_closed": {"layerwise": 1 - scored_layerwise["kl"] / gap,
                          "e2e": 1 - final["kl"] / gap},
        "trajectory": trajectory, "losses": losses,
    }
    suffix = "" if args.objective == "mse" else f"_{args.objective}"
    out = Path(args.out) if args.out else RESULTS / f"e2e_steps_{args.method}{suffix}.json"
    atomic_write_text(out, json.dumps(report, indent=2))
    print(f"\n{args.method} on {len(held_out)} held-out: alone KL {gap:.4f}; layer-wise "
          f"{scored_layerwise['kl']:.4f} ({100 * report['kl_gap_closed']['layerwise']:.1f}% "
          f"closed); + {len(losses)} E2E steps {final['kl']:.4f} "
          f"({100 * report['kl_gap_closed']['e2e']:.1f}% closed)")
    print(f"(written to {out})")


if __name__ == "__main__":
    main()
