"""End-to-end distillation: the Caprese model's outputs chase the teacher's.

Both come from the same weights: the teacher is the model under caprese.teacher (dense), the
student runs teacher-forced (prompt dense, continuation compressed + x L R). A prompt runs
dense in both, so its KV cache is the teacher's and the student's alike: one no-grad pass
fills it (and makes each sample's selection), then the teacher and the student each run only
the continuation on top of a copy. The student's forward and backward over the prompt are
saved: about a fifth of a step when prompts are a third of the tokens. Activation
checkpointing recomputes layers, which would append to the cache twice, so with it both run
the whole sequence in one SPLIT forward instead.
Two objectives, summed over continuation tokens; only L and R receive gradients:
- "mse" (the paper's): the per-token mean squared error of the final hidden states (after
  the final norm, before the LM head);
- "kl": KL(teacher || student) of the next-token distributions, the quantity the fidelity
  report scores. The logits are built LOGIT_ROWS positions at a time and each chunk's
  gradient is sent back to the hidden states at once, so memory stays bounded with a 150K
  vocabulary.
"""

from __future__ import annotations

import copy

import torch
from transformers import DynamicCache

from caprese.distillation.settings import OBJECTIVES
from caprese.distillation.trainer import LossFn
from caprese.families import LOGIT_ROWS, decoder, logits
from caprese.phases import cache_argument, mask_positions, set_decode, split, teacher
from caprese.samples import Batch


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


def regrouped(batch: Batch) -> tuple[dict, dict, torch.Tensor]:
    """A right-padded batch as (prompt inputs, continuation inputs, continuation mask): the
    prompts left-padded to end together, the continuations right-padded after them, every
    token at the position it has in its own sequence."""
    lengths, bounds = batch.attention_mask.sum(1).tolist(), batch.boundary.tolist()
    rows, width = len(bounds), max(bounds)
    cont_width = max(n - b for n, b in zip(lengths, bounds, strict=True))
    ids = batch.input_ids
    prompt = ids.new_zeros(rows, width)
    prompt_mask = ids.new_zeros(rows, width)
    cont = ids.new_zeros(rows, cont_width)
    cont_mask = ids.new_zeros(rows, cont_width)
    for row, (n, b) in enumerate(zip(lengths, bounds, strict=True)):
        prompt[row, width - b:], prompt_mask[row, width - b:] = ids[row, :b], 1
        cont[row, : n - b], cont_mask[row, : n - b] = ids[row, b:n], 1
    cont_positions = batch.boundary[:, None] + torch.arange(cont_width, device=ids.device)
    return (dict(input_ids=prompt, attention_mask=prompt_mask,
                 position_ids=mask_positions(prompt_mask)),
            dict(input_ids=cont, attention_mask=torch.cat([prompt_mask, cont_mask], 1),
                 position_ids=cont_positions),
            cont_mask.bool())


def e2e_loss(model: torch.nn.Module, objective: str = "mse",
             prompt_once: bool = True) -> LossFn:
    """The loss function for trainer.train; prompt_once=False runs each sequence whole in
    one SPLIT forward (what activation checkpointing needs; the same loss otherwise)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown E2E objective {objective!r}; choose one of {OBJECTIVES}")
    stack = decoder(model)
    device = next(model.parameters()).device
    cache_name = cache_argument(stack)

    def objective_backward(hidden, target, scale) -> float:
        if objective == "kl":
            return _kl_backward(model, hidden, target, scale)
        loss = (hidden.float() - target.float()).pow(2).mean(dim=-1).sum()
        (loss * scale).backward()
        return loss.item()

    def whole(batch, scale):
        inputs = dict(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        )
        with torch.no_grad(), teacher(model):
            target = stack(**inputs).last_hidden_state
        keep = batch.continuation
        # backward inside the context: activation checkpointing re-runs the layers then
        with split(model, batch.boundary):
            hidden = stack(**inputs).last_hidden_state
            total = objective_backward(hidden[keep], target[keep], scale)
        return total, int(keep.sum())

    def shared_prompt(batch, scale):
        prompt, cont, keep = regrouped(batch)
        cache = DynamicCache(config=model.config)
        previous = set_decode(model, fused=False)  # the differentiable form, nothing gathered
        try:
            with torch.no_grad():  # an empty cache: PREFILL, exactly the original's output
                stack(**prompt, use_cache=True, **{cache_name: cache})
                with teacher(model):
                    target = stack(**cont, use_cache=True,
                                   **{cache_name: copy.deepcopy(cache)}).last_hidden_state
            # a filled cache: DECODE, compressed + x L R
            hidden = stack(**cont, use_cache=True, **{cache_name: cache}).last_hidden_state
            total = objective_backward(hidden[keep], target[keep], scale)
        finally:
            set_decode(model, **vars(previous))
        return total, int(keep.sum())

    def loss_fn(batch, scale):
        return (shared_prompt if prompt_once else whole)(batch.to(device), scale)

    return loss_fn
