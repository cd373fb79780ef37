"""Load any causal LM by built-in name, local folder or Hub id, in the dtype asked for."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from caprese.dtypes import announce, resolve_dtype, software_bf16
from caprese.models.builtin import BUILTIN_MODELS, CapreseModelError, prepare

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def load_model(
    name_or_path: str | Path,
    dtype: str | torch.dtype = "auto",
    device: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return (model, tokenizer) for a built-in name, a local HF folder or a Hub id.

    dtype: "auto" (bf16 where the device computes it in hardware, else fp32; see
    caprese.dtypes), "bf16", "fp32", "fp16" or a torch dtype. device: "cpu", "cuda", ...;
    None takes CUDA when available. The model is put in eval mode; its weights load straight
    onto the device (device_map), so a GPU run never holds a second copy in host RAM.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    choice = resolve_dtype(dtype, device)
    announce(choice)
    name = str(name_or_path)
    source = _source(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=choice.dtype, device_map=torch.device(device)
        )
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as error:
        where = (
            "a local folder without a loadable model"
            if isinstance(source, Path)
            else f"not a built-in model ({', '.join(BUILTIN_MODELS)}) nor a local folder, "
            "and the Hugging Face Hub could not provide it"
        )
        raise CapreseModelError(f"could not load {name!r}: {where} ({error})") from error
    if software_bf16(model.dtype, device):
        _warn_software_bf16()
    if torch.device(device).type == "cpu":
        _own_memory(model)
    return model.eval(), tokenizer


def _own_memory(model: PreTrainedModel) -> None:
    """Copy weights that still live in the safetensors file's memory map into the process's
    own memory, so that the map goes. Weights loaded in the file's dtype are its mapped pages,
    and the map lasts as long as any one of them: once caprese's decode layouts replace W1
    and W2 (kernels/layout.py), their file pages would stay resident beside the new storage
    (CATS' peak was 10% above the model's weights on the 1.5B in bf16)."""
    import torch

    with torch.no_grad():
        for param in model.parameters():  # tied weights are one Parameter: they stay tied
            param.data = param.data.clone()


def _source(name: str) -> str | Path:
    """A built-in model's prepared folder, a local folder, or else a Hub id."""
    if name in BUILTIN_MODELS:
        return prepare(name)
    if Path(name).expanduser().is_dir():
        return Path(name).expanduser()
    return name


def import_model_code(name_or_path: str | Path) -> None:
    """Import the code `load_model` would run for this model (its modelling module, about
    200 MB of Python for Qwen2) without loading weights: memory measured from here on is
    the model's own (caprese.bench.memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(_source(str(name_or_path)))
    with torch.device("meta"):
        AutoModelForCausalLM.from_config(config)


@functools.cache
def _warn_software_bf16() -> None:
    """Once per process: a pipeline loads the model for each of its steps."""
    log.warning(
        "this CPU has no bfloat16 matrix unit (AVX512_BF16 or AMX): bf16 matrix products "
        "run in software, several times slower than fp32 for prefill, distillation and "
        "scoring (7.5x on an AVX2 EPYC; decode, bound by memory, is not slower). Use "
        "--dtype auto or fp32 (dtype='auto') where twice the memory fits."
    )
