"""Fidelity: how closely the Caprese model follows the original, one forward per sample.

- KL(teacher || student) and top-1 agreement of the next-token distributions on
  continuation tokens, teacher-forced (split phase), so no generation is needed;
- perplexity of the actual text under the teacher and the student (language retention on
  plain text);
- per-layer relative MLP error ||FF(x) - FF+(x)|| / ||FF(x)|| on the original model's inputs,
  for the method alone (L R = 0) and with the low-rank path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from caprese import distributed, heap
from caprese.adapter import blocks
from caprese.capture import capture
from caprese.divergence import batch_divergence
from caprese.samples import Sample, collate


@torch.no_grad()
def fidelity(
    model: torch.nn.Module,
    samples: Sequence[Sample],
    batch_size: int = 4,
    pad_id: int = 0,
    progress: bool = True,
    layer_errors: bool = True,
) -> dict:
    device = next(model.parameters()).device
    parts: list[tuple[int, dict]] = []  # per batch: each chunk's sums, in order

    starts = range(0, len(samples), batch_size)
    for index, start in enumerate(tqdm(starts, desc="fidelity", unit="batch",
                                       disable=not progress or not distributed.is_main())):
        if distributed.mine(index):  # under torchrun: whole batches, batch i on rank i % N
            batch = collate(samples[start : start + batch_size], pad_id).to(device)
            parts.append((index, _batch_sums(model, batch, layer_errors)))
            heap.release()
    kl_sum, agree, tokens = 0.0, 0, 0
    nll = torch.zeros(2, dtype=torch.float64)  # teacher, student: -log p(actual next token)
    layer_sums = {i: torch.zeros(3, dtype=torch.float64) for i in blocks(model)}
    for _, part in distributed.gather(parts):  # summed in batch order whatever the ranks
        kl_sum += part["kl"]
        nll -= part["log_likelihood"]
        agree += part["agree"]
        tokens += part["tokens"]
        for layer, sums in part["layers"].items():
            layer_sums[layer] += sums
    layers = []
    for index, (dropped, residual, dense) in layer_sums.items() if layer_errors else ():
        layers.append(
            {
                "layer": index,
                "method_rel_error": float((dropped / dense).sqrt()),
                "caprese_rel_error": float((residual / dense).sqrt()),
            }
        )
    perplexity = (nll / max(tokens, 1)).exp().tolist()
    return {
        "kl": kl_sum / max(tokens, 1),
        "top1": agree / max(tokens, 1),
        "tokens": tokens,
        "ppl_teacher": perplexity[0],
        "ppl_student": perplexity[1],
        "layers": layers,
    }


def _batch_sums(model, batch, layer_errors: bool) -> dict:
    """One batch's divergence sums (caprese.divergence) and, with layer_errors, each layer's
    squared errors."""
    sums = batch_divergence(model, batch)
    layers: dict[int, torch.Tensor] = {}

    def on_layer(index, x, y):
        block = blocks(model)[index]
        dense = block.mlp(x).double()
        path = block.lowrank(x)
        residual = y.double() if path is None else y.double() - path.double()
        layers[index] = torch.stack(
            [y.double().pow(2).sum(), residual.pow(2).sum(), dense.pow(2).sum()]).cpu()

    if layer_errors:  # a third pass; skip it when only the logits matter
        capture(model, batch, on_layer)
    return {**sums, "layers": layers}
