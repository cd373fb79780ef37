"""Ship a distilled adapter as a ready-made one (`builtin:MODEL/METHOD`), in bf16.

`caprese distill` writes L and R in float32 (the precision they were trained in). A bf16
model computes the path with L and R rounded to bf16, so a bf16 copy gives it exactly what
the float32 folder gives: every bf16 evaluation of the distilled folder is an evaluation of
the shipped file, at half its size. This script checks that on the loaded model before it
moves the file into place, and never replaces a shipped adapter (they are committed once;
delete the folder by hand to ship a new one).

    python scripts/ship_adapter.py MODEL METHOD ADAPTER_FOLDER
    e.g. python scripts/ship_adapter.py qwen2.5-coder-1.5b-instruct griffin runs/adapter-griffin
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

import caprese
from caprese.adapter import lowrank_tensors
from caprese.models.ready_adapters import FOLDER


def ship(model_name: str, method: str, source: Path) -> Path:
    target = FOLDER / model_name / method
    if target.exists():
        raise SystemExit(f"{target} exists: ready-made adapters are committed once. Remove it "
                         "by hand if this one replaces it")
    info = caprese.read_adapter(source)
    if info.config.method != method:
        raise SystemExit(f"{source} is a {info.config.method} adapter, not {method}")
    model, _ = caprese.load_model(model_name, dtype="bf16")
    model = caprese.load(model, source)
    # what a bf16 evaluation of `source` computes with
    evaluated = {key: tensor.to(torch.bfloat16)
                 for key, tensor in lowrank_tensors(model).items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        written = caprese.save(model, Path(scratch) / method, trained=info.trained,
                               dtype=torch.bfloat16)
        shipped = lowrank_tensors(caprese.load(caprese.detach(model), written))
        for key, tensor in evaluated.items():
            if not torch.equal(tensor, shipped[key].to(torch.bfloat16)):
                raise SystemExit(f"{key} differs after the bf16 round trip: nothing shipped")
        written.rename(target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a built-in model name (caprese models list)")
    parser.add_argument("method", help="the adapter's method: griffin, cats or nf4")
    parser.add_argument("adapter", type=Path, help="the folder caprese distill wrote")
    args = parser.parse_args()
    target = ship(args.model, args.method, args.adapter)
    print(f"shipped {args.adapter} as builtin:{args.model}/{args.method} ({target})",
          file=sys.stderr)


if __name__ == "__main__":
    main()
