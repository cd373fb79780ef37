"""The records everything passes around: a problem, a token sequence, a padded batch.

- Record: one problem as posed (question, worked solution, final answer) from a data set;
- Sample: token ids with a prompt / continuation boundary, what training and fidelity see;
- Batch: right-padded samples as tensors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

# Seeds of per-epoch data orders are seed * EPOCH_SEED_STRIDE + epoch: a prime larger than any
# epoch count, so no two (seed, epoch) pairs share a permutation.
EPOCH_SEED_STRIDE = 1_000_003


def at_least(name: str, value, low: int, hint: str = "") -> None:
    """Refuse a count that is not an integer >= low (bools included: they are not counts)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r} {hint}".rstrip())


@dataclass(frozen=True)
class Record:
    """One problem: the question as posed, a worked reference solution and the final answer."""

    prompt: str
    solution: str
    answer: str
    source: str
    id: str
    level: int | None = None
    subject: str | None = None


@dataclass(frozen=True)
class Sample:
    """One training sequence: prompt tokens then continuation tokens.

    `boundary` is the index of the first continuation token: positions before it are the
    prompt (prefill: dense, they set the method's selection), positions from it are trained.
    """

    input_ids: tuple[int, ...]
    boundary: int

    def __post_init__(self) -> None:
        if not 0 < self.boundary < len(self.input_ids):
            raise ValueError(
                f"boundary {self.boundary} must leave at least one prompt and one continuation "
                f"token in a sequence of {len(self.input_ids)}"
            )


@dataclass(frozen=True)
class TrainingSample(Sample):
    """A Sample that remembers the Record it came from."""

    source: str = ""
    id: str = ""


def truncate(samples: Sequence[Sample], max_length: int | None) -> list[Sample]:
    """Cut continuations so that no sequence exceeds max_length; drop prompts that do."""
    if max_length is None:
        return list(samples)
    kept = [s for s in samples if s.boundary < max_length]
    return [dataclasses.replace(s, input_ids=tuple(s.input_ids)[:max_length]) for s in kept]


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, S), right-padded
    attention_mask: torch.Tensor  # (B, S)
    boundary: torch.Tensor  # (B,)

    @property
    def continuation(self) -> torch.Tensor:
        """(B, S) bool: the positions a loss is taken on."""
        positions = torch.arange(self.input_ids.shape[1], device=self.input_ids.device)
        return (positions[None, :] >= self.boundary[:, None]) & self.attention_mask.bool()

    def to(self, device) -> Batch:
        return Batch(
            self.input_ids.to(device), self.attention_mask.to(device), self.boundary.to(device)
        )


def right_padded(sequences: Sequence[Sequence[int]], boundary: Sequence[int],
                 pad_id: int = 0) -> Batch:
    """A Batch of token sequences; boundary[b] is sequence b's first continuation position."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence)
        mask[row, : len(sequence)] = 1
    return Batch(ids, mask, torch.tensor(list(boundary)))


def collate(samples: Sequence[Sample], pad_id: int = 0) -> Batch:
    return right_padded([s.input_ids for s in samples], [s.boundary for s in samples], pad_id)


def epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    """A seeded permutation per epoch, so a resumed run sees the same order."""
    generator = torch.Generator().manual_seed(seed * EPOCH_SEED_STRIDE + epoch)
    return torch.randperm(count, generator=generator).tolist()


def batches(
    samples: Sequence[Sample],
    order: Sequence[int],
    batch_size: int,
    pad_id: int = 0,
    start: int = 0,
) -> Iterator[tuple[int, Batch]]:
    """(index, batch) pairs from batch number `start` on."""
    for index in range(start, (len(order) + batch_size - 1) // batch_size):
        chunk = order[index * batch_size : (index + 1) * batch_size]
        yield index, collate([samples[i] for i in chunk], pad_id)
