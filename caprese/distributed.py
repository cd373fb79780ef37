"""The one place that knows torch.distributed: ranks, sharding, reductions, main-rank writes.

A command started by `torchrun --nproc-per-node N -m caprese ...` (or a launcher that wraps
it: SLURM, Kubernetes) runs in N processes, one per device; `torchrun` sets RANK, WORLD_SIZE
and the rendezvous. Without it every function here is the one-process identity, so the
same code runs alone. Work is sharded by whole batches in the one-process order (batch i on
rank i % N), so a greedy generation or a batch of statistics is computed exactly as one
process computes it; results are gathered back into that order, sums are all-reduced in
float64, and only rank 0 writes files.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# A rank that waits longer than this for its peers has lost one (torchrun stops the group
# when a rank dies; the timeout is the backstop).
TIMEOUT = timedelta(minutes=30)


def launched() -> bool:
    """Started by torchrun (or anything that sets WORLD_SIZE) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str | None = None) -> str | None:
    """Join the process group torchrun set up (NCCL on CUDA, gloo on CPU); returns the
    device this rank uses (cuda:LOCAL_RANK on GPUs), or `device` when not launched."""
    if not launched():
        return device
    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
        if not is_main():  # progress and chatter from rank 0 alone
            import transformers

            transformers.utils.logging.disable_progress_bar()
            logging.getLogger("caprese").setLevel(logging.ERROR)
    return _local_cuda() if cuda else "cpu"


def _local_cuda() -> str:
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    return f"cuda:{local}"


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0: the one that writes files and shows progress."""
    return rank() == 0


def mine(index: int) -> bool:
    """Whether work item `index` (a batch, in the one-process order) is this rank's."""
    return index % world_size() == rank()


def rounds(count: int) -> range:
    """Rounds of N items: in round k rank r has item k * N + r (if it exists). Every rank
    walks every round, so collectives at round boundaries line up."""
    return range(-(-count // world_size()))


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks, in place (float64 stays float64)."""
    if dist.is_initialized():
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        moved = tensor.to(device)
        dist.all_reduce(moved)
        tensor.copy_(moved)
    return tensor


def gather(items: Sequence[tuple[int, Any]]) -> list[tuple[int, Any]]:
    """Every rank's (index, value) pairs on every rank, sorted by index."""
    if not dist.is_initialized():
        return sorted(items, key=lambda pair: pair[0])
    everything: list = [None] * world_size()
    dist.all_gather_object(everything, list(items))
    return sorted((pair for part in everything for pair in part), key=lambda pair: pair[0])


def broadcast(value: Any) -> Any:
    """Rank 0's value on every rank."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
