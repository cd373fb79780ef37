"""Issue-4 probe: do adapters fitted on short sequences hold on longer ones?

distill_quality.py fits on samples cut at --max-length tokens (256). This script scores its
layer-wise closed-form adapters (its --work folder keeps them) on held-out samples of the
same seed-0 GSM8K + MATH mixture cut at --score-length tokens instead, next to the method
alone. The longer cut drops fewer prompts, so the split shifts; held-out samples whose
prompt is in the short run's training set are left out. Prints a table and writes
benchmarks/results/length_transfer.json.

    python benchmarks/length_transfer.py --score-length 1024
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import caprese
from caprese.io import atomic_write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_quality import RESULTS, add_setup_args, load_setup, mixture_split, scored  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_setup_args(parser)
    parser.add_argument("--score-length", type=int, default=1024)
    parser.add_argument("--work", default="/tmp/caprese-distill-quality",
                        help="distill_quality.py's work folder")
    parser.add_argument("--out", default=str(RESULTS / "length_transfer.json"))
    args = parser.parse_args()

    model, tokenizer, train, _, setup = load_setup(args)
    pad_id = tokenizer.pad_token_id or 0
    trained_prompts = {tuple(s.input_ids[:s.boundary]) for s in train}
    _, long_held_out = mixture_split(tokenizer, args, args.score_length)
    held_out = [s for s in long_held_out
                if tuple(s.input_ids[:s.boundary]) not in trained_prompts]
    report = {"setup": {**setup, "scored_samples": len(held_out),
                        "scored_continuation_tokens": sum(len(s.input_ids) - s.boundary
                                                          for s in held_out)},
              "methods": {}}
    print(f"| method | alone KL | closed form KL | gap closed | ({len(held_out)} samples "
          f"cut at {args.score_length} tokens) |", flush=True)
    for method in args.methods.split(","):
        caprese.attach(model, caprese.CapreseConfig(method=method, density=args.density,
                                                    rank=args.rank))
        alone = scored(model, held_out, pad_id, args.batch_size)
        caprese.load_weights(model, Path(args.work) / f"{method}-closed_form/stages/layerwise")
        fitted = scored(model, held_out, pad_id, args.batch_size)
        caprese.detach(model)
        closed = 1 - fitted["kl"] / alone["kl"]
        report["methods"][method] = {"alone": alone, "closed_form": fitted, "kl_gap_closed": closed}
        atomic_write_text(Path(args.out), json.dumps(report, indent=2))
        print(f"| {method} | {alone['kl']:.4f} | {fitted['kl']:.4f} | {100 * closed:.1f}% |",
              flush=True)
    print(f"(written to {args.out})")


if __name__ == "__main__":
    main()
