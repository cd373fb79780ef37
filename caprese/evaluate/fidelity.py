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

from caprese import distributed
from caprese.adapter import blocks
from caprese.capture import capture
from caprese.families import LOGIT_ROWS, decoder, logits
from caprese.phases import split, teacher
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
    stack = decoder(model)
    device = next(model.parameters()).device
    parts: list[tuple[int, dict]] = []  # per batch: each chunk's sums, in order

    starts = range(0, len(samples), batch_size)
    for index, start in enumerate(tqdm(starts, desc="fidelity", unit="batch",
                                       disable=not progress or not distributed.is_main())):
        if distributed.mine(index):  # under torchrun: whole batches, batch i on rank i % N
            batch = collate(samples[start : start + batch_size], pad_id).to(device)
            parts.append((index, _batch_sums(model, stack, batch, layer_errors)))
    kl_sum, agree, tokens = 0.0, 0, 0
    nll = torch.zeros(2, dtype=torch.float64)  # teacher, student: -log p(actual next token)
    layer_sums = {i: torch.zeros(3, dtype=torch.float64) for i in blocks(model)}
    for _, part in distributed.gather(parts):  # summed in batch order whatever the ranks
        for kl, chunk_nll, chunk_agree in part["chunks"]:
            kl_sum += kl
            nll -= chunk_nll
            agree += chunk_agree
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


def _batch_sums(model, stack, batch, layer_errors: bool) -> dict:
    """One batch's KL, next-token log-likelihoods and agreements per chunk of LOGIT_ROWS
    positions, its token count, and (with layer_errors) each layer's squared errors."""
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                  use_cache=False)
    # Logits at continuation positions that still have a next token to predict (the
    # prediction made at the last prompt position is prefill, identical by design).
    predicts = batch.continuation & batch.continuation.roll(-1, dims=1)
    predicts[:, -1] = False
    with teacher(model):
        target_hidden = stack(**inputs).last_hidden_state[predicts]
    with split(model, batch.boundary):
        student_hidden = stack(**inputs).last_hidden_state[predicts]
    following = batch.input_ids.roll(-1, dims=1)[predicts][:, None]
    chunks = []
    for target_rows, student_rows, next_ids in zip(
        target_hidden.split(LOGIT_ROWS), student_hidden.split(LOGIT_ROWS),
        following.split(LOGIT_ROWS), strict=True,
    ):
        target = logits(model, target_rows).float()
        student = logits(model, student_rows).float()
        log_p, log_q = target.log_softmax(-1), student.log_softmax(-1)
        chunks.append((float((log_p.exp() * (log_p - log_q)).sum()),
                       torch.stack([log_p.gather(1, next_ids).sum(),
                                    log_q.gather(1, next_ids).sum()]).double().cpu(),
                       int((target.argmax(-1) == student.argmax(-1)).sum())))
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
    return {"chunks": chunks, "tokens": int(predicts.sum()), "layers": layers}
