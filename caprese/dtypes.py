"""Weight dtypes by name, and "auto": the fastest one this device computes in hardware.

bf16 halves the bytes a decode step reads, but its matrix products need hardware support:
GPUs from Ampere on, CPUs with AVX512_BF16 or AMX. Elsewhere (AVX2-only CPUs, most laptops,
AVX-512 CPUs without the BF16 extension) PyTorch runs them in software, several times slower
than fp32 (7.5x for prefill-sized products on an AVX2 EPYC; docs/BENCHMARKS.md), so "auto"
takes fp32 there.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

import torch

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype a run uses, its short name, and why (recorded in results)."""

    dtype: torch.dtype
    name: str
    reason: str


def _torch_reports(probe: str) -> bool:
    """What one of torch's CPU feature probes says (False where this torch lacks it)."""
    found = getattr(torch.cpu, probe, None)
    return found is not None and bool(found())


def cpu_has_bf16_unit() -> bool:
    """True when torch reports AVX512_BF16 or AMX tiles on this CPU."""
    return _torch_reports("_is_avx512_bf16_supported") or cpu_has_amx()


def cpu_has_amx() -> bool:
    """True when torch reports AMX tiles: the one CPU unit that makes bf16 matrix products
    faster than fp32 (without it, AVX512_BF16 alone ran a 2048-token product at 140 GFLOPS
    against fp32's 234 on a 2-core Xeon; benchmarks/matmul_rate.py)."""
    return _torch_reports("_is_amx_tile_supported")


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> DtypeChoice:
    """A dtype name ("auto", "bf16", "fp32", "fp16") or torch dtype as a DtypeChoice."""
    if isinstance(dtype, torch.dtype):
        names = {value: key for key, value in DTYPES.items()}
        if dtype not in names:
            raise ValueError(f"unsupported dtype {dtype}; use one of {', '.join(DTYPES)}")
        return DtypeChoice(dtype, names[dtype], "asked for")
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_CHOICES)}")
        return DtypeChoice(DTYPES[dtype], dtype, "asked for")
    kind = torch.device(device).type
    if kind == "cuda":
        if torch.cuda.is_bf16_supported():
            return DtypeChoice(torch.bfloat16, "bf16", "auto: this GPU computes bf16")
        return DtypeChoice(torch.float32, "fp32", "auto: this GPU has no bf16 support")
    if kind == "cpu":
        if cpu_has_bf16_unit():
            return DtypeChoice(torch.bfloat16, "bf16", "auto: this CPU has AVX512_BF16 or AMX")
        return DtypeChoice(torch.float32, "fp32", "auto: this CPU has no AVX512_BF16 or AMX, "
                           "so bf16 matrix products would run in software, several times "
                           "slower than fp32")
    return DtypeChoice(torch.float32, "fp32", f"auto: fp32 on {kind}")


def announce(choice: DtypeChoice) -> None:
    """Print an automatic choice once per process (a pipeline loads a model per step)."""
    if choice.reason.startswith("auto"):
        _announce_once(choice.name, choice.reason)


@functools.cache
def _announce_once(name: str, reason: str) -> None:
    print(f"caprese: dtype {name} ({reason})", file=sys.stderr, flush=True)


def software_bf16(dtype: torch.dtype, device: str | torch.device) -> bool:
    """True for bf16 on a CPU without a bf16 unit (where an older torch cannot tell: False)."""
    if dtype != torch.bfloat16 or torch.device(device).type != "cpu":
        return False
    if not all(hasattr(torch.cpu, name)
               for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")):
        return False
    return not cpu_has_bf16_unit()
