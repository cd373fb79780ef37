"""End-to-end distillation: the Caprese model's outputs chase the teacher's.

Both come from the same weights: the teacher is the model under caprese.teacher (dense), the
student runs teacher-forced in SPLIT phase (prompt dense, continuation compressed + x L R).
Two objectives, summed over continuation tokens; only L and R receive gradients:
- "mse" (the paper's): the per-token mean squared error of the final hidden states (after
  the final norm, before the LM head);
- "kl": KL(teacher || student) of the next-token distributions, the quantity the fidelity
  report scores. The logits are built LOGIT_ROWS positions at a time and each chunk's
  gradient is sent back to the hidden states at once, so memory stays bounded with a 150K
  vocabulary.
"""

from __future__ import annotations

import torch

from caprese.distillation.settings import OBJECTIVES
from caprese.distillation.trainer import LossFn
from caprese.families import LOGIT_ROWS, decoder, logits
from caprese.phases import split, teacher


def _kl_backward(model, hidden: torch.Tensor, target: torch.Tensor, scale: float) -> float:
    """sum of KL(teacher || student) over the rows; backpropagates scale * that sum."""
    leaf = hidden.detach().requires_grad_()
    total = 0.0
    for rows, target_rows in zip(leaf.split(LOGIT_ROWS), target.split(LOGIT_ROWS), strict=True):
        log_q = logits(model, rows).float().log_softmax(-1)
        with torch.no_grad():
            log_p = logits(model, target_rows).float().log_softmax(-1)
        kl = (log_p.exp() * (log_p - log_q)).sum()
        (kl * scale).backward()
        total += kl.item()
    hidden.backward(leaf.grad)
    return total


def e2e_loss(model: torch.nn.Module, objective: str = "mse") -> LossFn:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown E2E objective {objective!r}; choose one of {OBJECTIVES}")
    stack = decoder(model)
    device = next(model.parameters()).device

    def loss_fn(batch, scale):
        batch = batch.to(device)
        inputs = dict(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        )
        with torch.no_grad(), teacher(model):
            target = stack(**inputs).last_hidden_state
        keep = batch.continuation
        # backward inside the context: activation checkpointing re-runs the layers then
        with split(model, batch.boundary):
            hidden = stack(**inputs).last_hidden_state
            if objective == "kl":
                total = _kl_backward(model, hidden[keep], target[keep], scale)
            else:
                loss = (hidden[keep].float() - target[keep].float()).pow(2).mean(dim=-1).sum()
                (loss * scale).backward()
                total = loss.item()
        return total, int(keep.sum())

    return loss_fn
