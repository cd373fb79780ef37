"""Per-prompt work of the methods, one layer of qwen2.5-coder-1.5b's shape, timed alone.

What each prompt adds to time to first token, against the way it was done before:
CATS' threshold (torch's kthvalue vs the CPU kernel), GRIFFIN's neuron scores (normalised
columns vs one weighted sum of squares) and GRIFFIN's gather of one matrix (strided columns
of W2, fresh memory, reused memory). Random fp32 values of the layer's shapes; median of 7.

    python benchmarks/per_prompt_work.py
"""

from __future__ import annotations

import statistics
import time

import torch

from caprese.kernels import cpu
from caprese.methods.griffin import griffin_scores

HIDDEN, D_FF = 1536, 8960  # qwen2.5-coder-1.5b


def median_ms(function, repeats: int = 7) -> float:
    function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def normalised_column_scores(hidden: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """GRIFFIN's scores as first written: normalise each token's row, then column norms."""
    z = hidden.float()
    z = z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (z * valid[..., None]).norm(dim=1)


def per_token_rows(tokens: int, generator: torch.Generator) -> list[tuple[str, float]]:
    """The work that grows with the prompt: CATS' threshold and GRIFFIN's scores."""
    act = torch.randn(tokens, D_FF, generator=generator)
    valid = torch.ones(tokens, dtype=torch.bool)
    rank = act.numel() // 2
    return [
        (f"CATS threshold, {tokens} tokens: kthvalue",
         median_ms(lambda: act.abs().flatten().kthvalue(rank + 1).values)),
        (f"CATS threshold, {tokens} tokens: kernel",
         median_ms(lambda: cpu.abs_order_statistic(act, valid, rank))),
        (f"GRIFFIN scores, {tokens} tokens: normalised columns",
         median_ms(lambda: normalised_column_scores(act[None], valid[None]))),
        (f"GRIFFIN scores, {tokens} tokens: weighted sum",
         median_ms(lambda: griffin_scores(act[None], valid[None]))),
    ]


def main() -> None:
    torch.set_num_threads(2)
    generator = torch.Generator().manual_seed(0)
    rows = per_token_rows(256, generator) + per_token_rows(2048, generator)
    down = torch.randn(HIDDEN, D_FF, generator=generator)
    down_rows = down.t().contiguous()
    kept = torch.randperm(D_FF, generator=generator)[: D_FF // 2].sort().values
    out = torch.empty(D_FF // 2, HIDDEN)
    rows.append(("GRIFFIN gather, one matrix: columns of W2",
                 median_ms(lambda: down.t()[kept])))
    rows.append(("GRIFFIN gather, one matrix: rows of W2^T, fresh memory",
                 median_ms(lambda: torch.index_select(down_rows, 0, kept))))
    rows.append(("GRIFFIN gather, one matrix: rows of W2^T, reused memory",
                 median_ms(lambda: torch.index_select(down_rows, 0, kept, out=out))))
    print("| per-prompt work, one layer | ms |\n|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.1f} |")


if __name__ == "__main__":
    main()
