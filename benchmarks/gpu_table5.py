"""The paper's Table 5 on a GPU: Qwen2.5-14B-shaped model, random bf16 weights.

Full model, GRIFFIN (first half of the layers, density 0.5), GRIFFIN + parameter-matched
LoRA, and Caprese (r = 256), plus CATS and Caprese(CATS) (all layers, Triton's sparse
decode; the paper has no CATS latency), prompt 2048 + generation 256 / 2048 by default; variants
interleaved, medians of repeats. Writes benchmarks/results/gpu_table5.json and records the
card. Random weights time the same as trained ones (no data-dependent control flow).

    python benchmarks/gpu_table5.py                 # on a CUDA machine
    python benchmarks/gpu_table5.py --tiny          # CPU smoke run with tiny shapes (tests)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import transformers

from caprese.bench.latency import format_table, run_bench
from caprese.info import load_config
from caprese.io import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096)


def random_model(config: transformers.PretrainedConfig, device: str) -> torch.nn.Module:
    """Allocate directly on the device in bf16 and fill with N(0, 0.02): no CPU copy."""
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model = model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02, generator=generator)
        for name, buffer in model.named_buffers():  # rotary frequencies
            if "inv_freq" in name:
                dim = buffer.numel() * 2
                base = getattr(config, "rope_theta", 10000.0)
                buffer.copy_(1.0 / base ** (torch.arange(0, dim, 2, device=device).float() / dim))
    return model.eval()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "qwen2.5-14b.json"))
    parser.add_argument("--setups", default="2048+256,2048+2048", help="prompt+gen list")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", default="full,griffin,lora,caprese,cats,caprese-cats",
                        help="the paper's four, and CATS with Triton's sparse decode")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_table5.json"))
    args = parser.parse_args(argv)
    config = load_config(args.config)
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if args.tiny:
        for key, value in TINY.items():
            setattr(config, key, value)
    model = random_model(config, device)
    results = {"config": args.config, "tiny": args.tiny, "setups": {}}
    for setup in args.setups.split(","):
        prompt_len, gen_len = (int(n) for n in setup.split("+"))
        result = run_bench(model, args.variants.split(","), prompt_len, gen_len,
                           args.repeats, rank=256 if not args.tiny else 8)
        results["setups"][setup] = result
        print(f"\n## {setup}\n{format_table(result)}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.out), json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
