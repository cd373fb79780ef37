"""Large CPU tensors on 2 MiB pages (Linux transparent huge pages).

A decode step reads every weight once. On 4 KiB pages the CPU looks up a page table entry
for every 4 KiB it reads (the 1.5B model's 3 GB are 750,000 pages, far more than its TLB
holds); on 2 MiB pages it looks up 512 times fewer. On a 2-core AMD EPYC (Zen 4) a plain
read is 14-17% faster from them, caprese's bf16 matrix-vector products up to 19% (not the
long-row down product, compute-bound in that run) and CATS' kept rows 7%
(benchmarks/gemv_kernels.py --pages, docs/BENCHMARKS.md).

Two ways in. PyTorch puts every CPU allocation of 2 MiB or more on huge pages when
THP_MEM_ALLOC_ENABLE=1 is set before its first allocation: `import caprese` sets it unless
the environment says otherwise, which covers every tensor made after it (weights, KV cache,
gathered matrices). Tensors that existed before are moved by `collapse` (madvise
MADV_COLLAPSE, Linux 6.1 or later): the kernel copies them 2 MiB at a time, so no second
copy of a weight exists even for a moment.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import re
import sys
import time
from collections.abc import Iterable

import torch

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
ENVIRONMENT = "THP_MEM_ALLOC_ENABLE"  # read by PyTorch's CPU allocator at its first allocation
_MADV_DONTNEED, _MADV_HUGEPAGE, _MADV_NOHUGEPAGE, _MADV_COLLAPSE = 4, 14, 15, 25  # linux/mman.h


def enable_for_new_tensors() -> None:
    """Ask PyTorch for huge pages (see the module's docstring); a no-op once it allocated."""
    if sys.platform == "linux":
        os.environ.setdefault(ENVIRONMENT, "1")


@functools.cache
def _libc() -> ctypes.CDLL:
    """The C library, loaded once, its madvise typed."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def _whole_pages(tensor: torch.Tensor) -> tuple[int, int]:
    """The 2 MiB-aligned address range inside the tensor's storage (empty if none)."""
    start = tensor.untyped_storage().data_ptr()
    end = start + tensor.untyped_storage().nbytes()
    low, high = -(-start // HUGE_PAGE) * HUGE_PAGE, end // HUGE_PAGE * HUGE_PAGE
    return low, max(low, high)


def _advise(tensor: torch.Tensor, advice: int) -> int:
    """madvise the whole 2 MiB pages inside a CPU tensor's storage; their bytes, or 0 where
    the system refuses (not Linux, an old kernel, huge pages off, file-backed memory)."""
    low, high = _whole_pages(tensor)
    if sys.platform != "linux" or tensor.device.type != "cpu" or high == low:
        return 0
    if _libc().madvise(low, high - low, advice):
        log.debug("madvise(%d) refused: %s", advice, os.strerror(ctypes.get_errno()))
        return 0
    return high - low


def collapse(tensors: Iterable[torch.Tensor]) -> int:
    """Put the whole 2 MiB pages inside each CPU tensor's storage on huge pages, in place;
    returns their bytes (tensors the system cannot move stay as they are)."""
    started, moved, seen = time.perf_counter(), 0, set()
    for tensor in tensors:
        if tensor.untyped_storage().data_ptr() in seen:
            continue
        seen.add(tensor.untyped_storage().data_ptr())
        if _advise(tensor, _MADV_HUGEPAGE):
            moved += _advise(tensor, _MADV_COLLAPSE)
    if moved:
        log.info("%.0f MiB on huge pages in %.2f s", moved / 2**20, time.perf_counter() - started)
    return moved


def keep_off(tensor: torch.Tensor) -> torch.Tensor:
    """An untouched tensor (torch.empty) whose pages will be 4 KiB ones when first written,
    whatever THP_MEM_ALLOC_ENABLE says: the other side of a comparison. Its pages are also
    dropped (its values are garbage anyway): memory the allocator hands out again may still
    sit on huge pages from an earlier tensor, which the advice alone does not split."""
    if _advise(tensor, _MADV_NOHUGEPAGE):
        _advise(tensor, _MADV_DONTNEED)
    return tensor


def huge_page_bytes(tensor: torch.Tensor) -> int:
    """Bytes of the tensor's storage that lie on huge pages (from /proc/self/smaps; 0 where
    the system does not say)."""
    low, high = _whole_pages(tensor)
    try:
        smaps = open("/proc/self/smaps").read()
    except OSError:
        return 0
    total = 0
    for area in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", smaps):
        first, last = (int(bound, 16) for bound in area.split(None, 1)[0].split("-"))
        huge = re.search(r"^AnonHugePages:\s+(\d+) kB", area, re.MULTILINE)
        if huge and first < high and low < last:
            total += min(int(huge.group(1)) * 1024, min(high, last) - max(low, first))
    return total
