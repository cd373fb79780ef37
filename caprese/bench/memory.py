"""Peak memory of one variant, and the bytes it is allowed.

A process's peak RSS only grows, so one run timing several variants could not tell their
peaks apart. Linux resets the peak on request (writing 5 to /proc/self/clear_refs), so each
variant's run is measured from a reset: attach, building its decode weights, prefill and
decode. The peak is reported as the RSS above what the process held before the model loaded
(Python and the libraries), and compared with what the variant must hold: the weights, its
adapter, GRIFFIN's per-prompt gathered matrices and the KV cache.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import re
from pathlib import Path

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")
MARGIN = 0.05  # activations, the attention of the prompt, allocator slack
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def _libc():
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def free_large_blocks_at_once() -> None:
    """Make glibc give every block of 1 MiB or more back to the system when it is freed.

    By default glibc raises that threshold after the first large free (up to 32 MiB), so a
    weight matrix freed while a layout takes its place stays resident as heap and the next
    variant's peak counts it. Called before the model loads by a bench process that measures
    peaks, and only then: every block of 1 MiB or more is then mapped afresh and its pages
    faulted in at first touch, which slows a long prompt's prefill (2.5M faults at 2048
    tokens of the 1.5B model in bf16; docs/BENCHMARKS.md)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)


def _status_bytes(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return None if match is None else int(match.group(1)) * 1024


def rss_bytes() -> int | None:
    """Resident memory now (None where /proc is not there: not Linux)."""
    return _status_bytes("VmRSS")


def settled_rss() -> int | None:
    """RSS after garbage collection and with freed memory handed back: the baseline."""
    gc.collect()
    reset_peak()
    return rss_bytes()


def reset_peak() -> bool:
    """Start a new peak at the current RSS; False where the system does not allow it. Memory
    freed before (by the previous variant) is handed back to the system first, so that it
    does not count against the next one."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def peak_bytes() -> int | None:
    """Peak RSS since the last reset_peak."""
    return _status_bytes("VmHWM")


def allowed_bytes(weights: int, adapter: int, gathered: int, kv_cache: int) -> int:
    """What a variant may hold: its weights once, plus 5% (see MARGIN)."""
    return round((weights + adapter + gathered + kv_cache) * (1 + MARGIN))
