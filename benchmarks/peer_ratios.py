"""Each variant's time per token over llama.cpp's, repeat by repeat, from decode-peer results.

On a noisy machine the medians of a few repeats move by 10-20% between runs, and a ratio of
two medians moves by more; the ratio within each repeat (the variants and the peer run in
turns in every repeat) pools across runs. Prints, per setup, each variant's per-repeat
ratios and their median over every file given.

    python benchmarks/peer_ratios.py benchmarks/results/decode_peer_epyc_zen4_bf16_compiled.json \
        benchmarks/results/decode_peer_epyc_zen4_bf16_compiled_256.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

PEER = "llama.cpp"


def repeat_ratios(results: dict) -> dict[tuple[str, str], list[float]]:
    """(setup, variant) -> TTNT / the peer's TTNT in the same repeat, for one results file."""
    ratios: dict[tuple[str, str], list[float]] = defaultdict(list)
    for setup, run in results["runs"].items():
        rows = {row["variant"]: row["runs"] for row in run["variants"]}
        if PEER not in rows:
            raise SystemExit(f"{setup}: no {PEER} row; run the bench with peer = true")
        for variant, repeats in rows.items():
            if variant != PEER:
                ratios[setup, variant] += [mine["ttnt"] / peer["ttnt"] for mine, peer
                                           in zip(repeats, rows[PEER], strict=True)]
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="benchmarks/run.py outputs")
    args = parser.parse_args()
    pooled: dict[tuple[str, str], list[float]] = defaultdict(list)
    for path in args.results:
        for key, ratios in repeat_ratios(json.loads(path.read_text())).items():
            pooled[key] += ratios
    print(f"TTNT / {PEER}'s TTNT in the same repeat, pooled over {len(args.results)} file(s)")
    print("| setup | variant | repeats | median | range | ratios |")
    print("|---|---|---|---|---|---|")
    for (setup, variant), ratios in pooled.items():
        print(f"| {setup} | {variant} | {len(ratios)} | {statistics.median(ratios):.2f} | "
              f"{min(ratios):.2f}-{max(ratios):.2f} | "
              f"{' '.join(f'{r:.2f}' for r in ratios)} |")


if __name__ == "__main__":
    main()
