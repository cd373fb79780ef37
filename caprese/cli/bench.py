"""`caprese bench`: decode latency of full / method / Caprese / LoRA, side by side."""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import torch

from caprese.bench.alone import FORWARDED, peaks_alone, record_peaks
from caprese.bench.latency import (
    KERNELS,
    PEER,
    VARIANTS,
    format_table,
    parse_variant,
    refuse_reselection_when_compiled,
    run_bench,
)
from caprese.bench.memory import free_large_blocks_at_once, settled_rss
from caprese.cli.common import add_model_options, count, fraction, load_for
from caprese.compiled import BACKENDS, import_compiler
from caprese.io import atomic_write_text, json_object_with, refuse_foreign
from caprese.models.builtin import BUILTIN_MODELS
from caprese.models.load import import_model_code

MEMORY_MODES = ("alone", "together", "off")


def run(args: argparse.Namespace) -> int:
    variants = args.variants.split(",")
    for name in variants:
        parse_variant(name)
    refuse_reselection_when_compiled(variants, args.compile)  # before the model loads
    if args.out:
        refuse_foreign(Path(args.out), json_object_with(Path(args.out), ("setup", "variants")),
                       "a caprese bench result")
    if args.peer and args.model not in BUILTIN_MODELS:
        raise ValueError(f"--peer {PEER} needs a built-in model (its GGUF gives llama.cpp the "
                         f"same weights): one of {', '.join(BUILTIN_MODELS)}")
    if args.peer and args.batch != 1:
        raise ValueError(f"--peer {PEER} is timed at --batch 1, not {args.batch}")
    memory_mode = args.memory if args.device.startswith("cpu") else "off"  # RSS: CPU only
    if memory_mode == "together":  # peaks measured in this process (a child of "alone" too)
        free_large_blocks_at_once()
    import_model_code(args.model)  # memory is measured above the code, before the weights
    if memory_mode == "together" and args.compile:
        import_compiler()  # and above the compiler's code
    # The children before our model loads: never two models in memory at once.
    alone = (peaks_alone({name: getattr(args, name) for name in FORWARDED}, variants)
             if memory_mode == "alone" else {})
    baseline_rss = settled_rss() if memory_mode == "together" else None
    model, tokenizer, setup = load_for(args)
    del tokenizer  # the bench feeds token ids: the tokenizer's memory is no variant's
    with contextlib.ExitStack() as stack:
        peer = stack.enter_context(_peer(args, model)) if args.peer else None
        result = run_bench(model, variants, args.prompt_len, args.gen_len, args.repeats,
                           args.batch, args.density, args.rank, args.adapter,
                           baseline_rss=baseline_rss, peer=peer, compile=args.compile,
                           prefill_chunk=args.prefill_chunk)
    record_peaks(result, alone, memory_mode)
    result["setup"].update(model=args.model, dtype_reason=setup["dtype_reason"],
                           command=setup["command"])
    if args.out:  # before the table: minutes of measurements never hang on its printing
        atomic_write_text(Path(args.out), json.dumps(result, indent=2))
    print(format_table(result))
    return 0


def _peer(args: argparse.Namespace, model):
    """llama.cpp on the same weights in the model's dtype, as many threads as we use."""
    from caprese.bench.peer import LlamaCppPeer, peer_gguf

    dtype = next(model.parameters()).dtype
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"--peer {PEER} compares fp32 or bf16, not {dtype}")
    print(f"building the {PEER} GGUF of {args.model} ({dtype}) once, if not cached", flush=True)
    return LlamaCppPeer(peer_gguf(args.model, dtype), torch.get_num_threads(),
                        args.prompt_len + args.gen_len)


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("bench", help="decode latency: full / method / Caprese / LoRA",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_options(p)
    p.add_argument("--adapter", help="Caprese adapter to time (default: an untrained path)")
    p.add_argument("--variants", default="full,griffin,caprese,lora,cats",
                   help=f"comma list of {', '.join(VARIANTS)}; append {KERNELS} to decode "
                   "single tokens with caprese's CPU kernels (e.g. full:k,griffin:k), and "
                   "@RHO to a GRIFFIN variant to reselect its neurons every RHO tokens "
                   "(e.g. griffin@32,caprese@128)")
    p.add_argument("--density", type=fraction, default=0.5)
    p.add_argument("--rank", type=count(1), default=256)
    p.add_argument("--prompt-len", type=count(1), default=256)
    p.add_argument("--gen-len", type=count(2), default=64)
    p.add_argument("--batch", type=count(1), default=1)
    p.add_argument("--repeats", type=count(1), default=3)
    p.add_argument("--peer", choices=[PEER], help="also time llama.cpp on the same weights "
                   "and precision, interleaved with our variants (built-in models; needs "
                   "pip install 'caprese[peer]')")
    p.add_argument("--prefill-chunk", type=count(1), metavar="TOKENS",
                   help="feed the prompt in pieces of this many tokens (llama.cpp's default "
                   "is 512): a long prompt's activations then take TOKENS/P of the memory, "
                   "and each method still selects from the whole prompt (default: one piece)")
    p.add_argument("--compile", nargs="?", const="inductor", choices=BACKENDS,
                   help="decode steps compiled by torch.compile with this backend (inductor "
                   "if none is named; CUDA graphs on GPUs), each variant compiling in its "
                   "warm-up run")
    p.add_argument("--memory", choices=MEMORY_MODES, default="alone",
                   help="each variant's peak RSS (CPU only): alone measures it in a process of "
                   "its own per variant, before the timed runs (one more model load and run "
                   "each); together, in this process between the timed runs, where later "
                   "variants also count heap the earlier ones left")
    p.add_argument("--out", help="write the results JSON here")
    p.set_defaults(func=run)
