"""CPU decode kernels: a dense matrix-vector product and CATS' real sparse MLP.

Decoding one token multiplies every weight matrix by one vector, so its speed is the speed
of reading the weights. The kernels (cpu_kernels.cpp) are compiled once per kind of CPU with
torch's C++ extension loader (AVX-512, else AVX2 + FMA, else plain loops) and cached; set
CAPRESE_NO_KERNELS=1 to skip them (callers fall back to PyTorch, which computes the same
values up to rounding). Without SIMD code CATS' kernel read 4.6x slower than PyTorch on an
AVX2 CPU, which turned CATS' 21% fewer bytes into a 26% slower token (docs/BENCHMARKS.md):

- `linear`: y = x W^T for a few rows of x, four weight rows at a time so the memory system
  streams several rows at once; on an AVX-512 BF16 CPU a bf16 decode step of the 1.5B model
  is 9% faster with it (docs/BENCHMARKS.md). fp32 products go to the kernel only on CPUs
  not made by Intel (FP32_KERNELS). `rows_product`: y = x M for M stored as rows (the
  transposed down projection with R appended), threads splitting the rows.
- `cats_decode`: for one token CATS keeps about `density` of the D_FF gate entries; it reads
  only the kept rows of W1 (up) and of W2^T (down), so the bytes read really drop. PyTorch
  has no fused gather + matrix-vector product (index_select copies the rows first, which
  costs more than it saves).
- `decode_attention`: one decode token's grouped-query attention over a KV cache
  (caprese.kernels.attention).

The four are torch operators (torch.ops.caprese.linear, ...), so a decode step compiled by
torch.compile calls them inside its one graph.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import torch

from caprese.dtypes import cpu_has_amx, cpu_has_bf16_unit

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "cpu_kernels.cpp"  # includes the headers beside it
DISABLE_ENV = "CAPRESE_NO_KERNELS"
# The instruction set the kernels are built for: this CPU's by default; e.g. x86-64-v3 (AVX2 +
# FMA) for a build cache shared with AVX2 machines, or to time the AVX2 path on an AVX-512 one.
MARCH_ENV = "CAPRESE_KERNELS_MARCH"
BUILD_FLAGS = {"extra_cflags": ["-O3", "-march=native", "-fopenmp"],
               "extra_ldflags": ["-fopenmp"]}

_lock = threading.Lock()
_module = None
_failed = False


def disabled() -> bool:
    return os.environ.get(DISABLE_ENV) == "1"


def cpu_tag(cpuinfo: str = "/proc/cpuinfo") -> str:
    """A short hash of this CPU's instruction-set flags.

    The module is compiled with -march=native, and torch caches it by name: a home directory
    shared by an AVX-512 and an AVX2 machine would hand the second one code it cannot run
    (SIGILL). The name carries this tag, so each kind of CPU builds its own."""
    flags = " ".join(cpu_flags(cpuinfo)) or f"{platform.machine()} {platform.processor()}"
    return hashlib.sha256(flags.encode()).hexdigest()[:12]


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> list[str]:
    """This CPU's instruction-set flags as /proc/cpuinfo lists them (none without it)."""
    return cpuinfo_field("flags", cpuinfo).split()


def cpu_vendor(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The x86 vendor string (GenuineIntel, AuthenticAMD, ...), "" where there is none."""
    return cpuinfo_field("vendor_id", cpuinfo)


def cpuinfo_field(name: str, cpuinfo: str = "/proc/cpuinfo") -> str:
    """The first value /proc/cpuinfo gives for `name` ("model name", "flags", ...), "" where
    there is none."""
    try:
        with open(cpuinfo) as lines:
            line = next(line for line in lines if line.split(":")[0].strip() == name)
    except (OSError, StopIteration):
        return ""
    return line.partition(":")[2].strip()


def machine(device: torch.device | str = "cpu") -> str:
    """The hardware a number was measured on: GPU name, or CPU model with the SIMD level
    PyTorch uses and its bf16 unit (they decide which dtype is fast)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = cpuinfo_field("model name")
    bf16 = ("AMX" if cpu_has_amx() else "AVX512_BF16, no AMX" if cpu_has_bf16_unit()
            else "no bf16 unit")
    built = "" if march() == "native" else f", kernels -march={march()}"
    return (f"{model or platform.processor() or platform.machine()} "
            f"({torch.backends.cpu.get_cpu_capability()}, {bf16}{built})")


def fp32_kernels(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether single-token fp32 products go to the kernels as bf16 ones do: on x86 CPUs not
    made by Intel. PyTorch multiplies fp32 with MKL, which runs generic code off Intel's CPUs:
    on a Zen 5 EPYC the 1.5B model's compiled fp32 step took 2.1x as long with MKL's products
    as with the kernels; on an Intel Xeon MKL's reached 83% of the bandwidth floor and the
    kernel of that time measured slower (docs/BENCHMARKS.md)."""
    vendor = cpu_vendor(cpuinfo)
    return bool(vendor) and vendor != "GenuineIntel"


# Read once here: a decode step being compiled asks at every product and cannot open files.
FP32_KERNELS = fp32_kernels()


def march() -> str:
    """The -march the kernels are built with (MARCH_ENV, else native)."""
    return os.environ.get(MARCH_ENV, "").strip() or "native"


def _cflags(march: str) -> list[str]:
    return [f"-march={march}" if flag.startswith("-march=") else flag
            for flag in BUILD_FLAGS["extra_cflags"]]


def module():
    """The compiled module, or None (disabled, or no compiler on this machine). Loading it
    also registers the decode kernels as torch.ops.caprese.*."""
    global _module, _failed
    if disabled() or _failed:
        return None
    if _module is not None:  # every decode product asks: no lock once it is loaded
        return _module
    with _lock:
        if _module is None and not _failed:
            try:
                source_tag = hashlib.sha256("".join(
                    name + text for name, text in sorted(source_files().items())).encode()
                ).hexdigest()[:8]
                target = march()
                name = f"caprese_cpu_kernels_{source_tag}_{cpu_tag()}"
                if target != "native":
                    name += "_" + hashlib.sha256(target.encode()).hexdigest()[:8]
                log.info("building caprese's CPU decode kernels for -march=%s (once; cached "
                         "afterwards)", target)
                _module = _load(name, SOURCE, _cflags(target))
                _register_shapes()
            except Exception as error:  # no compiler, no headers: the dense form still works
                log.warning("CPU decode kernels unavailable (%s); using PyTorch", error)
                _failed = True
    return _module


def source_files() -> dict[str, str]:
    """The kernels' source files (cpu_kernels.cpp and the headers it includes), by name."""
    return {path.name: path.read_text() for path in sorted(SOURCE.parent.iterdir())
            if path.suffix in (".cpp", ".h")}


def build_variant(files: dict[str, str], namespace: str, march: str = "native"):
    """The kernels' source `files` (name -> text, as source_files gives them, perhaps of
    another revision) compiled with -march=`march`, their operators registered as
    torch.ops.<namespace>.* beside caprese's own: benchmarks time another revision's kernels
    side by side, and tests check the AVX2 and plain-loop paths on any x86 CPU. Returns that
    namespace."""
    renamed = {}
    for name, text in files.items():
        for macro in ("TORCH_LIBRARY", "TORCH_LIBRARY_IMPL"):
            text = text.replace(f"{macro}(caprese,", f"{macro}({namespace},")
        renamed[name] = text
    flags = _cflags(march)
    tag = hashlib.sha256(f"{march} {sorted(renamed.items())}".encode()).hexdigest()[:8]
    with tempfile.TemporaryDirectory() as folder:
        for name, text in renamed.items():
            (Path(folder) / name).write_text(text)
        _load(f"{namespace}_{tag}_{cpu_tag()}", Path(folder) / SOURCE.name, flags)
    return getattr(torch.ops, namespace)


def _load(name: str, source: Path, cflags: list[str]):
    """torch's C++ extension `load`, in a build folder no killed build can block."""
    from torch.utils.cpp_extension import load

    folder = build_folder(name)
    with exclusive_build(folder):
        return load(name=name, sources=[str(source)], extra_cflags=cflags,
                    extra_ldflags=BUILD_FLAGS["extra_ldflags"], build_directory=str(folder),
                    verbose=False)


def build_folder(name: str) -> Path:
    """Where module `name` is built and cached: torch's layout (TORCH_EXTENSIONS_DIR, else
    torch's default root, one folder per Python version)."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    return Path(root) / f"{python}_cpu" / name


@contextmanager
def exclusive_build(folder: Path):
    """Hold `folder` for one build at a time, and clear a lock a killed build left there.

    torch marks a build in progress with a file named `lock` and waits, without end, until
    that file is gone; a build killed midway (Ctrl-C, a job's time limit) leaves it behind,
    and every later process then hangs on its first decode. An flock on a file of our own
    is released by the operating system when its holder dies, so whoever holds it knows
    that no live caprese process is building here and that a `lock` file is stale."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's own lock alone
        yield
        return
    with open(folder / "caprese-build.flock", "w") as holder:  # closing it unlocks
        fcntl.flock(holder, fcntl.LOCK_EX)
        stale = folder / "lock"
        if stale.exists():
            log.warning("removing %s, left by a build that was killed", stale)
            stale.unlink()
        yield


def _register_shapes() -> None:
    """The operators' output shapes, which torch.compile traces with instead of running them."""
    @torch.library.register_fake("caprese::linear")
    def _(x, weight):
        return x.new_empty((x.shape[0], weight.shape[0]), dtype=torch.float32)

    @torch.library.register_fake("caprese::rows_product")
    def _(x, rows):
        return x.new_empty((rows.shape[1],))

    @torch.library.register_fake("caprese::cats_decode")
    def _(act, tau, up, down, x):
        return x.new_empty((up.shape[1],), dtype=torch.float32)

    @torch.library.register_fake("caprese::decode_attention")
    def _(query, key, value, mask, scale):
        return query.new_empty((query.shape[0], 1, query.shape[1], query.shape[3]))


def ready() -> bool:
    """Whether the decode kernels can run. A step being traced cannot build them (a lock and a
    compiler run), so there it asks whether eager code already did: caprese.compiled loads
    them before it compiles a step on a CPU."""
    if torch.compiler.is_compiling():
        return _module is not None
    return module() is not None


def cats_decode(x: torch.Tensor, act_gate: torch.Tensor, tau: torch.Tensor,
                up_rows: torch.Tensor, down_rows: torch.Tensor) -> torch.Tensor | None:
    """One token through a CATS MLP (+ fused low-rank rows past D_FF), or None if unavailable.

    up_rows (D_FF + r, D) and down_rows (D_FF + r, D) are contiguous; rows past D_FF are the
    low-rank path (L^T and R), always kept, multiplied by 1 instead of the gate.
    """
    if not ready():
        return None
    act = act_gate.reshape(-1).float().contiguous()
    out = torch.ops.caprese.cats_decode(act, tau, up_rows, down_rows, _as_kernel_input(x))
    return out.to(x.dtype).reshape(x.shape)


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     mask: torch.Tensor | None, scale: float) -> torch.Tensor | None:
    """One decode token's grouped-query attention, (B, 1, H, D), or None where the kernel
    does not apply. query (B, H, 1, D); key and value (B, KV, S >= 1, D); mask additive
    (floating point), (B or 1, 1, 1, >= S), or None."""
    batch, positions = key.shape[0], key.shape[2]
    if not (query.device.type == "cpu" and query.shape[2] == 1 and positions and ready()
            and query.dtype in (torch.float32, torch.bfloat16)
            and query.dtype == key.dtype == value.dtype
            and (mask is None or mask.is_floating_point())
            and not (torch.is_grad_enabled() and query.requires_grad)):
        return None
    if mask is None:
        mask = query.new_empty((0,), dtype=torch.float32)
    else:
        mask = mask[:, 0, -1, :positions].float().expand(batch, positions).contiguous()
    if key.stride() != value.stride() or key.stride(-1) != 1:
        key, value = key.contiguous(), value.contiguous()
    if query.stride(-1) != 1:
        query = query.contiguous()
    return torch.ops.caprese.decode_attention(query, key, value, mask, scale)


def _as_kernel_input(x: torch.Tensor) -> torch.Tensor:
    """x flat and contiguous, bf16 kept as it is: the kernel multiplies bf16 pairs
    (AVX512_BF16) only for an x that arrives in bf16. Widened here, a compiled step's x did
    not (its fused values were not rounded to bf16), and its products took the slower loop."""
    return x.reshape(-1).contiguous() if x.dtype == torch.bfloat16 else x.reshape(-1).float()


def abs_order_statistic(values: torch.Tensor, valid: torch.Tensor, rank: int
                        ) -> torch.Tensor | None:
    """The rank-th smallest (0-based) |value| over the rows (S, N) of `values` where `valid`
    (S,) is True, as a 0-d tensor of values' dtype; None where the kernel does not apply.

    CATS sets its threshold from this at every prompt of every layer: torch's kthvalue over a
    prompt's S x D_FF fp32 activations took 45 ms per layer of the 1.5B model at 256 tokens
    (368 ms at 2048), most of CATS' extra time to first token. The kernel reads the
    activations in place, brackets the rank from a sample and selects among the few values
    inside (9 and 58 ms; `python benchmarks/per_prompt_work.py`, see threshold.h)."""
    compiled = module()
    if (compiled is None or values.device.type != "cpu" or values.dim() != 2
            or values.dtype not in (torch.float32, torch.bfloat16)):
        return None
    tau = compiled.abs_order_statistic(values.contiguous(), valid.contiguous(), rank)
    return torch.tensor(tau, dtype=values.dtype)


def abs_histogram(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor | None:
    """(2^15,) int64 counts of each 16-bit |value| pattern over the rows (S, N) of `values`
    where `valid` (S,) is True; None where the kernel does not apply. CATS' threshold for a
    prompt fed in pieces comes from these counts at every layer; torch.bincount took 147 ms
    per layer of the 1.5B model at 2048 bf16 tokens (it widens every value to int64)."""
    compiled = module()
    if (compiled is None or values.device.type != "cpu" or values.dim() != 2
            or values.dtype not in (torch.bfloat16, torch.float16)):
        return None
    return compiled.abs_histogram(values.contiguous(), valid.contiguous())


def _applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """One token, contiguous bf16 weights (fp32 ones where FP32_KERNELS), on the CPU, no
    autograd (the kernels compute values, not gradients)."""
    return (x.device.type == "cpu" and x.numel() == x.shape[-1]
            and (weight.dtype == torch.bfloat16
                 or (weight.dtype == torch.float32 and FP32_KERNELS))
            and weight.is_contiguous()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def _finish(out: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """Add the bias in fp32, round once to x's dtype, restore x's leading shape."""
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], out.shape[-1])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
           ) -> torch.Tensor | None:
    """x W^T + b for one token (weight (out, in)), or None where the kernel does not apply."""
    if not (_applies(x, weight) and ready()):
        return None
    return _finish(torch.ops.caprese.linear(_as_kernel_input(x).reshape(1, -1), weight), bias, x)


def rows_product(x: torch.Tensor, rows: torch.Tensor, bias: torch.Tensor | None
                 ) -> torch.Tensor | None:
    """x @ rows + b for one token (rows (K, D)), or None where the kernel does not apply."""
    if not (_applies(x, rows) and ready()):
        return None
    return _finish(torch.ops.caprese.rows_product(x.reshape(-1).float().contiguous(), rows),
                   bias, x)


def _kernel_forward(layer: torch.nn.Linear):
    def forward(x: torch.Tensor) -> torch.Tensor:
        out = linear(x, layer.weight, layer.bias)
        return torch.nn.functional.linear(x, layer.weight, layer.bias) if out is None else out
    return forward


def route_linears(model: torch.nn.Module, enabled: bool = True) -> None:
    """Every nn.Linear of `model` computes single tokens by `linear` (other inputs keep
    PyTorch's path); enabled=False restores PyTorch everywhere."""
    for layer in model.modules():
        if isinstance(layer, torch.nn.Linear):
            if enabled:
                layer.forward = _kernel_forward(layer)
            elif "forward" in layer.__dict__:
                del layer.forward
