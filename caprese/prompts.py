"""Prompts: the chat-templated math question shared by training and evaluation.

Training (the distillation mixture) and evaluation must see the same prompt, or the method's
per-prompt selection and the distilled path are scored on inputs they were not fitted to.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from caprese.samples import Record, TrainingSample

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

COT_INSTRUCTION = "Please reason step by step."


def templated(tokenizer: PreTrainedTokenizerBase, record: Record) -> tuple[str, str]:
    """(prompt, continuation) text: the chat-templated question and the reference answer turn."""
    user = [{"role": "user", "content": f"{COT_INSTRUCTION}\n\n{record.prompt}"}]
    if not tokenizer.chat_template:
        return (
            f"{tokenizer.bos_token or ''}{user[0]['content']}\n\n",
            record.solution + (tokenizer.eos_token or ""),
        )
    prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(
        [*user, {"role": "assistant", "content": record.solution}], tokenize=False
    )
    if full.startswith(prompt):
        return prompt, full[len(prompt) :]
    return prompt, record.solution + (tokenizer.eos_token or "")


def chat_prompt(tokenizer: PreTrainedTokenizerBase, record: Record) -> str:
    """The evaluation prompt for a math record (generation continues from here)."""
    return templated(tokenizer, record)[0]


def teacher_forced(tokenizer: PreTrainedTokenizerBase, records: Sequence[Record],
                   language: bool = False, max_length: int = 1024,
                   prompt_tokens: int = 64) -> list[TrainingSample]:
    """Samples for one-forward fidelity checks.

    math: the templated question, then the reference solution as the continuation;
    language: plain text (e.g. XSum articles), its first `prompt_tokens` tokens as the prompt.
    """
    samples = []
    for record in records:
        if language:
            ids = tokenizer(record.prompt, add_special_tokens=False)["input_ids"][:max_length]
            boundary = min(prompt_tokens, len(ids) - 1)
        else:
            prompt, continuation = templated(tokenizer, record)
            head = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            tail = tokenizer(continuation, add_special_tokens=False)["input_ids"]
            ids, boundary = (head + tail)[:max_length], len(head)
        if 0 < boundary < len(ids):
            samples.append(TrainingSample(tuple(ids), boundary, record.source, record.id))
    return samples
