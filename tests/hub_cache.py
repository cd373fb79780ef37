"""A model folder placed in the Hugging Face cache under a Hub id, so that the Hub loading path
(`--model ORG/NAME`) runs with no network: in tests, and on the device machine, which cannot
reach the Hub. `python -m tests.hub_cache` builds a random-weight model shaped like a real one
(its config, tokenizer and chat template) and caches it under the real model's Hub id.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

COMMIT = "0" * 40  # the snapshot's name; the cache only needs refs/main to point at it


def cache_as_hub_model(folder: Path, repo_id: str, cache: Path) -> Path:
    """Link every file of `folder` into `cache` as the `main` snapshot of `repo_id`."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True, exist_ok=True)
    for file in Path(folder).iterdir():
        if file.is_file():
            (snapshot / file.name).unlink(missing_ok=True)
            (snapshot / file.name).symlink_to(file.resolve())
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def random_model_like(source: Path, out: Path, seed: int = 0) -> Path:
    """Save a model with `source`'s config and tokenizer files and random bf16 weights."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(source)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    for file in Path(source).iterdir():
        if file.name.startswith(("tokenizer", "chat_template", "generation_config")):
            shutil.copy(file, out / file.name)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--like", required=True, help="folder with config.json and tokenizer")
    parser.add_argument("--repo-id", required=True)
    parser.add_argument("--cache", required=True, help="the HF_HUB_CACHE folder to fill")
    parser.add_argument("--work", required=True, help="where the random weights are written")
    args = parser.parse_args()
    folder = random_model_like(Path(args.like), Path(args.work))
    print(cache_as_hub_model(folder, args.repo_id, Path(args.cache)))


if __name__ == "__main__":
    main()
