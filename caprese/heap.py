"""Give freed CPU memory back to the system between the steps of a long loop.

PyTorch's CPU tensors come from the C library's malloc. glibc serves blocks under its mmap
threshold (which rises to 32 MiB after the first large block is freed) from its heap, and
keeps what is freed there for reuse. When tensor sizes change from step to step (batches of
sequences of other lengths), new blocks rarely fit the holes and the heap only grows: on
qwen2.5-coder-1.5b-instruct a CATS E2E stage's resident memory climbed from 11.1 to 17.6 GiB
over its first eight steps, and one malloc_trim(0) (which hands every free page of the heap
back) brought it to 5.7 GiB at once. So the loops that run for seconds to minutes per step
(E2E micro-batches, statistics batches, held-out scoring, generation batches) call
`release()` after each one. A step that needs the memory again takes fresh pages from the
system, a page fault per 4 KiB: on that model and CPU (AMD EPYC Zen 5, bf16) an E2E
micro-batch of 4 sequences took 1.17x as long with the release as without it
(benchmarks/heap_release.py, docs/BENCHMARKS.md). Memory first, by default; where memory is
plentiful, CAPRESE_HEAP_RELEASE=0 keeps the freed heap in the process (faster E2E steps, a
resident size that grows).
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import sys

ENVIRONMENT = "CAPRESE_HEAP_RELEASE"  # "0": never hand the heap back


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library is another (macOS, musl)."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release() -> bool:
    """Return the heap's free pages to the system; True if any were returned."""
    trim = _malloc_trim()
    if trim is None or os.environ.get(ENVIRONMENT) == "0":
        return False
    return bool(trim(0))
