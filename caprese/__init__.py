"""Caprese: low-rank distillation that restores what sparsified MLPs lose (arXiv 2505.07861).

import caprese
model, tokenizer = caprese.load_model("qwen2.5-coder-0.5b-instruct")  # built-in, folder or Hub id
cfg = caprese.CapreseConfig(method="griffin", density=0.5, rank=256)
model = caprese.attach(model, cfg)          # in place
with caprese.teacher(model): ...             # the original dense model, same weights
caprese.save(model, "adapter_dir")
model = caprese.load(base_model, "adapter_dir")
caprese.detach(model)

The layers, bottom to top, are in docs/ARCHITECTURE.md.
"""

from caprese.adapter import (
    AdapterError,
    attach,
    blocks,
    config_of,
    detach,
    fingerprint,
    load,
    load_weights,
    read_adapter,
    read_config,
    reselection,
    save,
    set_reselection,
)
from caprese.block import DecodeOptions, Phase
from caprese.config import CapreseConfig
from caprese.distillation import DistillJob, DistillSettings, distill, run_job
from caprese.families import UnsupportedModelError
from caprese.kernels.huge_pages import enable_for_new_tensors
from caprese.models import load_model
from caprese.phases import (
    forced_phase,
    prepare_decode,
    set_decode,
    split,
    teacher,
    use_decode_kernels,
)
from caprese.version import __version__

enable_for_new_tensors()  # PyTorch reads it at its first allocation: before any tensor exists

__all__ = [
    "AdapterError",
    "CapreseConfig",
    "DecodeOptions",
    "DistillJob",
    "DistillSettings",
    "Phase",
    "UnsupportedModelError",
    "__version__",
    "attach",
    "blocks",
    "config_of",
    "detach",
    "distill",
    "fingerprint",
    "forced_phase",
    "load",
    "load_model",
    "load_weights",
    "prepare_decode",
    "read_adapter",
    "read_config",
    "reselection",
    "run_job",
    "save",
    "set_decode",
    "set_reselection",
    "split",
    "teacher",
    "use_decode_kernels",
]
