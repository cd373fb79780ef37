"""Evaluation protocols: how instruct models and reasoning ("thinking") models are scored.

Instruct models are scored greedily, one answer per problem. Reasoning models (DeepSeek-R1
distills, Qwen3 in thinking mode) are scored as the Caprese paper does: sampled at temperature
0.6 and top-p 0.95, four runs per problem, long generations, accuracy as the mean over runs
with its spread, and pass@k. Their answer comes after the reasoning, which ends with
`</think>`; an answer cut off inside the reasoning has no final answer at all.
"""

from __future__ import annotations

from dataclasses import dataclass

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass(frozen=True)
class Protocol:
    temperature: float  # 0: greedy
    top_p: float
    samples: int  # runs per problem
    max_new_tokens: int


PROTOCOLS = {
    "greedy": Protocol(temperature=0.0, top_p=1.0, samples=1, max_new_tokens=512),
    "thinking": Protocol(temperature=0.6, top_p=0.95, samples=4, max_new_tokens=32768),
}


def protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; choose one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def final_answer(prompt: str, output: str) -> tuple[str, bool]:
    """(the text that holds the final answer, whether the reasoning finished).

    After the last `</think>` when the output has one. A reasoning that was opened (by the
    output, or by the chat template at the end of the prompt, as DeepSeek-R1's does) and
    never closed gives no answer: numbers inside unfinished reasoning are not answers.
    Outputs without reasoning tags are answers as they are."""
    if THINK_CLOSE in output:
        return output.rsplit(THINK_CLOSE, 1)[1], True
    if THINK_OPEN in output or prompt.rstrip().endswith(THINK_OPEN):
        return "", False
    return output, True
