"""Ready-made adapters: `builtin:MODEL/METHOD` names a shipped adapter wherever a folder does."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import randomize_lowrank
from transformers import AutoModelForCausalLM

import caprese
from caprese.cli import main
from caprese.models import CapreseModelError, ready_adapters


@pytest.fixture
def shipped(tmp_path, tiny_dir, monkeypatch):
    """A ready-made GRIFFIN adapter for the tiny model, in a stand-in for the shipped folder."""
    monkeypatch.setattr(ready_adapters, "FOLDER", tmp_path / "shipped")
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    caprese.attach(model, caprese.CapreseConfig(method="griffin", density=0.5, rank=4))
    randomize_lowrank(model)
    caprese.save(model, tmp_path / "shipped" / "tiny" / "griffin")
    return model


def test_a_ready_adapter_loads_by_name_like_its_folder(shipped, tiny_dir, tmp_path):
    assert ready_adapters.list_ready() == ["tiny/griffin"]
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    caprese.load(model, "builtin:tiny/griffin")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, shipped(ids).logits)


def test_eval_takes_a_ready_adapter_and_records_its_name(shipped, tiny_dir, tmp_path, capsys):
    task = tmp_path / "task.jsonl"
    task.write_text(json.dumps({"problem": "t4 t5", "answer": "4"}) + "\n")
    out = tmp_path / "result.json"
    assert main(["eval", "--model", str(tiny_dir), "--adapter", "builtin:tiny/griffin",
                 "--task", str(task), "--max-new-tokens", "3", "--out", str(out)]) == 0
    variant = json.loads(out.read_text())["variant"]
    assert variant["adapter"] == "builtin:tiny/griffin" and variant["method"] == "griffin"
    assert main(["models", "list"]) == 0
    assert "builtin:tiny/griffin" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["builtin:tiny/cats", "builtin:../shipped/tiny/griffin",
                                  "builtin:tiny", "builtin:"])
def test_an_unknown_ready_adapter_is_refused_with_the_list(shipped, name):
    with pytest.raises(CapreseModelError, match="builtin:tiny/griffin"):
        caprese.read_adapter(name)


def test_a_folder_path_is_still_a_folder_path(shipped, tmp_path):
    assert ready_adapters.resolve(tmp_path / "x") == tmp_path / "x"
    assert caprese.read_adapter(tmp_path / "shipped" / "tiny" / "griffin").config.rank == 4
