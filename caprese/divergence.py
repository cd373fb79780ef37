"""How far the compressed model's next-token distributions are from the original's.

One teacher-forced batch, two forwards from the same weights: the original model (teacher)
and the model as attached (split phase: prompt dense, continuation compressed). Fidelity
reports and distillation's do-no-harm check both score adapters this way.
"""

from __future__ import annotations

import torch

from caprese.families import decoder, logits
from caprese.phases import split, teacher
from caprese.samples import Batch

# Positions scored at a time: each holds two vocabulary-wide fp32 log-probability rows plus
# the KL's temporaries. With 1024 at a time and the logits kept beside them, the 1.5B
# model's adapter check (152K words) peaked 4.4 GB above the training it follows; 256 at a
# time add about 0.7 GB.
SCORED_ROWS = 256


def _predicted(batch: Batch) -> torch.Tensor:
    """The continuation positions that still have a next token (the prediction made at the
    last prompt position is prefill, identical by design)."""
    predicts = batch.continuation & batch.continuation.roll(-1, dims=1)
    predicts[:, -1] = False
    return predicts


def _inputs(batch: Batch) -> dict:
    return dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)


@torch.no_grad()
def teacher_hidden(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """The original model's final hidden states at the scored positions: computed once when
    several students (say, with and without the path) are scored on one batch."""
    with teacher(model):
        return decoder(model)(**_inputs(batch)).last_hidden_state[_predicted(batch)]


@torch.no_grad()
def batch_divergence(model: torch.nn.Module, batch: Batch,
                     target_hidden: torch.Tensor | None = None) -> dict:
    """Sums over the batch's predicted positions: KL(teacher || student) ("kl"), the
    log-likelihood of the actual next token under each ("log_likelihood": teacher, student),
    top-1 agreements ("agree"), and the count of positions ("tokens"). `target_hidden`:
    teacher_hidden of this batch when already computed."""
    predicts = _predicted(batch)
    if target_hidden is None:
        target_hidden = teacher_hidden(model, batch)
    with split(model, batch.boundary):
        student_hidden = decoder(model)(**_inputs(batch)).last_hidden_state[predicts]
    following = batch.input_ids.roll(-1, dims=1)[predicts][:, None]
    kl, agree = 0.0, 0
    log_likelihood = torch.zeros(2, dtype=torch.float64)
    for target_rows, student_rows, next_ids in zip(
        target_hidden.split(SCORED_ROWS), student_hidden.split(SCORED_ROWS),
        following.split(SCORED_ROWS), strict=True,
    ):
        log_p = logits(model, target_rows).float().log_softmax(-1)
        log_q = logits(model, student_rows).float().log_softmax(-1)
        kl += float(torch.nn.functional.kl_div(log_q, log_p, reduction="sum", log_target=True))
        log_likelihood += torch.stack([log_p.gather(1, next_ids).sum(),
                                       log_q.gather(1, next_ids).sum()]).double().cpu()
        agree += int((log_p.argmax(-1) == log_q.argmax(-1)).sum())  # the logits' argmax
    return {"kl": kl, "log_likelihood": log_likelihood, "agree": agree,
            "tokens": int(predicts.sum())}
