"""`caprese info` on the public configs of the paper's models (no weights)."""

from __future__ import annotations

import json
from pathlib import Path

from caprese.cli import main
from caprese.kernels.cpu import machine

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_info_llama_8b_matches_the_paper_share(capsys):
    assert main(["info", "--model", str(CONFIGS / "llama-3.1-8b.json"), "--method", "cats",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["layers"] == 32 and result["hidden_size"] == 4096
    assert abs(result["total_params"] - 8.03e9) < 0.01e9
    assert result["caprese_params"] == 2 * 4096 * 256 * 32
    assert round(100 * result["caprese_share"], 2) == 0.84  # the paper's 0.84%
    assert result["active_caprese"] - result["active_method"] == result["caprese_params"]


def test_info_griffin_defaults_to_first_half(capsys):
    assert main(["info", "--model", str(CONFIGS / "qwen2.5-14b.json")]) == 0
    out = capsys.readouterr().out
    assert "griffin, density 0.5, layers 0-23" in out
    assert "48 / 5120 / 13824" in out


def test_info_bad_input_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "config.json"
    bad.write_text("{}")
    assert main(["info", "--model", str(bad)]) == 2
    assert "has no model_type" in capsys.readouterr().err
    assert main(["info", "--model", str(CONFIGS / "llama-3.1-8b.json"), "--rank", "4096"]) == 2
    assert "must be smaller than the hidden size" in capsys.readouterr().err


def test_pipeline_passes_device_and_dtype_to_every_step(monkeypatch, tmp_path):
    """`caprese pipeline --dtype fp32` loads the model once, in fp32 on the device, and every
    distill and eval step runs on it and records them, with the provenance that preparing
    the model wrote (not the machine's folder)."""
    import contextlib
    import json

    import caprese.pipeline as pipeline
    from caprese.models.builtin import PROVENANCE_FILE

    def prepare_and_load(model, dtype, device):
        loads.append((model, dtype, device))
        note = {"upstream": "Org/Model", "dequantized_from_gguf": {"file_type": "Q4_K_M"}}
        (tmp_path / PROVENANCE_FILE).write_text(json.dumps(note))
        return "model", "tokenizer"

    loads, jobs, evaluations = [], [], []
    monkeypatch.setattr(pipeline, "load_model", prepare_and_load)
    monkeypatch.setattr(pipeline, "run_job", lambda model, tokenizer, job, out, resume,
                        run_info: jobs.append((model, job, run_info)))
    monkeypatch.setattr(pipeline, "applied", lambda model, variant: contextlib.nullcontext())
    monkeypatch.setattr(pipeline.Variant, "describe", lambda self: {"label": "x"})
    monkeypatch.setattr(pipeline, "evaluate", lambda model, tokenizer, variant, task, out,
                        setup: evaluations.append((model, task, setup)))
    monkeypatch.setattr(pipeline, "build_report", lambda results, out: out)
    assert main(["pipeline", "--quick", "--model", str(tmp_path), "--dtype", "fp32",
                 "--device", "cpu", "--out", str(tmp_path / "run")]) == 0
    assert loads == [(str(tmp_path), "fp32", "cpu")]  # one model for every step
    assert len(jobs) + len(evaluations) == 2 + 7 * 4 - 2  # no fidelity of the full model
    assert all(model == "model" and info["dtype"] == "fp32" for model, _, info in jobs)
    for model, _, setup in evaluations:
        assert model == "model" and (setup["dtype"], setup["device"]) == ("fp32", "cpu")
        assert setup["model"] == str(tmp_path) and setup["command"].startswith(
            "caprese pipeline --quick")
        assert setup["weights"] == "Org/Model, weights dequantized from GGUF Q4_K_M"
        assert setup["machine"] == machine("cpu")  # answers in bf16 depend on the CPU


def test_the_default_preset_needs_fast_matrix_products(monkeypatch):
    """Only bf16 on AMX tiles (or a GPU) gets `default`; AVX512_BF16 alone and fp32 are slower
    at the products distillation spends its time in, so they get `compact`."""
    from caprese import dtypes, pipeline
    from caprese.pipeline import PRESETS, preset_for

    for has_unit, has_amx, dtype, expected in [(False, False, "auto", "compact"),
                                               (True, False, "auto", "compact"),
                                               (True, True, "auto", "default"),
                                               (True, True, "bf16", "default"),
                                               (True, True, "fp32", "compact"),
                                               (False, False, "bf16", "compact")]:
        monkeypatch.setattr(dtypes, "cpu_has_bf16_unit", lambda u=has_unit: u)
        monkeypatch.setattr(pipeline, "cpu_has_amx", lambda a=has_amx: a)
        assert preset_for(False, None, dtype, "cpu") == PRESETS[expected], (has_unit, has_amx,
                                                                             dtype)
    assert pipeline.preset_name(False, "fp32", "cuda") == "default"
    assert preset_for(True, "my-model", "auto", "cpu") == PRESETS["quick"].__class__(
        **{**PRESETS["quick"].__dict__, "model": "my-model"})


def test_info_takes_a_builtin_name_once_it_is_prepared(tmp_path, monkeypatch, capsys):
    import caprese.cli.models as cli_models

    monkeypatch.setattr(cli_models, "model_dir", lambda name: tmp_path / name)
    assert main(["info", "--model", "qwen2.5-coder-1.5b-instruct", "--method", "nf4"]) == 2
    assert "caprese models prepare qwen2.5-coder-1.5b-instruct" in capsys.readouterr().err
    folder = tmp_path / "qwen2.5-coder-1.5b-instruct"
    folder.mkdir()
    (folder / "config.json").write_text((CONFIGS / "qwen2.5-14b.json").read_text())
    assert main(["info", "--model", "qwen2.5-coder-1.5b-instruct", "--method", "nf4"]) == 0
    out = capsys.readouterr().out
    assert "nf4, layers 0-47" in out and "density" not in out
