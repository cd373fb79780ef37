"""CATS (Lee et al., 2024) as used by Caprese: a per-prompt, per-layer activation threshold.

Gate activations with |act(x Wg)| <= tau are zeroed for generated tokens. There is no
calibration set: tau is the (1 - density) quantile of |act(x Wg)| over all of the prompt's
(token, neuron) entries, so each sample in a batch gets its own threshold. The gate stays
dense; only the up/down work of the dropped entries is saved.
"""

from __future__ import annotations

import torch

from caprese.kernels import cpu
from caprese.methods.base import Method


def cats_threshold(act_gate: torch.Tensor, valid: torch.Tensor, density: float) -> torch.Tensor:
    """tau per sample (B,): the 'lower' (1 - density) quantile of |act| over valid entries.

    It is set at every prompt, so it is part of time to first token. 16-bit activations have
    only 2^15 magnitudes: a histogram of them gives the exact order statistic (on the CPU a
    kernel counts them in place: 10 ms per layer of the 1.5B model at 2048 bf16 tokens).
    fp32 ones go to a kernel that reads them in place (kernels/cpu.py), elsewhere to
    kthvalue (torch.quantile refuses inputs above 16M entries, and a 2K-token prompt of a
    14B model has 18M).
    """
    if act_gate.dtype in SIXTEEN_BIT:
        if act_gate.device.type != "cpu":
            return sorted_threshold(act_gate, valid, density)
        counts = abs_histograms(act_gate, valid)
        return threshold_from_counts(counts, density).to(torch.int16).view(act_gate.dtype)
    taus = []
    for sample_act, sample_valid in zip(act_gate, valid, strict=True):
        count = int(sample_valid.sum()) * sample_act.shape[-1]
        if count == 0:
            raise ValueError("CATS needs at least one prompt token per sample to set tau")
        rank = int((1.0 - density) * (count - 1))  # 0-based index of the quantile
        tau = cpu.abs_order_statistic(sample_act, sample_valid, rank)
        if tau is None:
            tau = sample_act[sample_valid].abs().flatten().kthvalue(rank + 1).values
        taus.append(tau)
    return torch.stack(taus)


def threshold_from_counts(counts: torch.Tensor, density: float) -> torch.Tensor:
    """(B,) the bit pattern of the 'lower' (1 - density) quantile from (B, 2^15) counts of
    16-bit magnitude patterns: for non-negative floats the bit pattern, read as an integer,
    orders like the value, so the quantile is the first pattern whose running count passes
    its rank."""
    ranks = quantile_ranks(counts.sum(dim=-1), density)
    return torch.searchsorted(counts.cumsum(-1), (ranks + 1)[:, None])[:, 0]


def quantile_ranks(totals: torch.Tensor, density: float) -> torch.Tensor:
    """(B,) 0-based index of the 'lower' (1 - density) quantile among each sample's `totals`
    valid entries."""
    if (totals == 0).any():
        raise ValueError("CATS needs at least one prompt token per sample to set tau")
    return ((1.0 - density) * (totals - 1).double()).long()


SIXTEEN_BIT = (torch.bfloat16, torch.float16)  # 2^15 magnitudes: an exact histogram


def sorted_threshold(act_gate: torch.Tensor, valid: torch.Tensor, density: float
                     ) -> torch.Tensor:
    """cats_threshold for 16-bit activations off the CPU: each sample's magnitude patterns
    sorted (a radix sort on a GPU), padding placed last, the quantile read at its rank.

    Only the empty-prompt check waits for the device. torch.bincount reads the largest value
    back to size its output, boolean indexing reads the count back, and a 2^15-bin histogram
    makes every thread add into the same few hot bins of global memory."""
    ranks = quantile_ranks(valid.sum(dim=-1) * act_gate.shape[-1], density)
    patterns = act_gate.abs().view(torch.int16)  # non-negative: integers order like values
    patterns = patterns.masked_fill(~valid[..., None], torch.iinfo(torch.int16).max)
    ordered = patterns.flatten(1).sort(dim=-1).values
    return ordered.gather(1, ranks[:, None])[:, 0].view(act_gate.dtype)


def abs_histograms(act_gate: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, 2^15) counts of each 16-bit magnitude pattern of |act| over valid positions: a
    prompt's chunks add up, and the counts give CATS' threshold exactly."""
    counts = []
    for sample_act, sample_valid in zip(act_gate, valid, strict=True):
        sample_counts = cpu.abs_histogram(sample_act, sample_valid)
        if sample_counts is None:
            bits = sample_act[sample_valid].abs().flatten().view(torch.int16).long()
            sample_counts = torch.bincount(bits, minlength=1 << 15)
        counts.append(sample_counts)
    return torch.stack(counts)


class Cats(Method):
    name = "cats"
    reads_down_rows = True

    def select(self, act_gate: torch.Tensor, hidden, valid: torch.Tensor) -> torch.Tensor | None:
        if self.density >= 1.0:
            return None
        return cats_threshold(act_gate, valid, self.density)

    def streams(self, dtype: torch.dtype) -> bool:
        """In 16 bits the magnitudes fit a histogram; an fp32 quantile needs every value."""
        return dtype in SIXTEEN_BIT or self.density >= 1.0

    def accumulate(self, stream, act_gate, hidden, valid) -> tuple | None:
        """(dtype, counts): the threshold comes out in the activations' dtype."""
        if self.density >= 1.0:
            return None
        counts = abs_histograms(act_gate, valid)
        return (act_gate.dtype, counts if stream is None else stream[1] + counts)

    def finish(self, stream: tuple | None) -> tuple[None, torch.Tensor | None]:
        if stream is None:
            return None, None
        dtype, counts = stream
        return None, threshold_from_counts(counts, self.density).to(torch.int16).view(dtype)

    def keep_mask(self, state, act_gate: torch.Tensor) -> torch.Tensor | None:
        if state is None:
            return None
        return (act_gate.abs() > state[:, None, None]).to(act_gate.dtype)

    def gate_threshold(self, state):
        return state
