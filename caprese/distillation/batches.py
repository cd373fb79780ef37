"""Teacher-forced training batches: token ids with a prompt/continuation boundary."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch


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


def collate(samples: Sequence[Sample], pad_id: int = 0) -> Batch:
    length = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), length), dtype=torch.long)
    for row, sample in enumerate(samples):
        ids[row, : len(sample.input_ids)] = torch.tensor(sample.input_ids)
        mask[row, : len(sample.input_ids)] = 1
    boundary = torch.tensor([s.boundary for s in samples])
    return Batch(ids, mask, boundary)


def epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    """A seeded permutation per epoch, so a resumed run sees the same order."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
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
