"""End-to-end distillation: the Caprese model's last hidden states chase the teacher's.

Both come from the same weights: the teacher is the model under caprese.teacher (dense), the
student runs teacher-forced in SPLIT phase (prompt dense, continuation compressed + x L R).
The loss is the per-token mean squared error of the final hidden states (after the final
norm, before the LM head) on continuation tokens. Only L and R receive gradients.
"""

from __future__ import annotations

import torch

from caprese.distillation.trainer import LossFn
from caprese.families import decoder
from caprese.phases import split, teacher


def e2e_loss(model: torch.nn.Module) -> LossFn:
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
            per_token = (hidden[keep].float() - target[keep].float()).pow(2).mean(dim=-1).sum()
            (per_token * scale).backward()
        return per_token.item(), int(keep.sum())

    return loss_fn
