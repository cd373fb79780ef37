"""Sequential layer-wise fit: each path corrects what the compressed model itself got wrong.

The paper's layer-wise stage fits every layer on ORIGINAL inputs to the one-layer residual
FF(x) - FFhat(x), blind to the errors of the layers before it. This solver walks the Caprese
layers in order and fits layer i on the inputs the compressed model (layers < i already
fitted) produces, toward the original model's hidden state after layer i:

    Y_i = h_teacher(i+1) - h_student(i+1) with path i off   ~   x_student L_i R_i

at continuation positions. The fit is the same exact rank-r closed form (one solve per layer);
only X and Y change, so path i also undoes the drift that reaches it from earlier layers.

The teacher and student hidden states of every sample (and the student's MLP input, to add a
layer's path once it is fitted) are carried from one layer to the next on disk, one
safetensors file per batch and stream, so memory holds one batch whatever N is. The disk
holds two layers' worth: 2 x 3 streams x padded tokens x D x dtype bytes, at most 3.3 GB for
1200 sequences of 256 tokens of a 896-wide bf16 model. A run resumes at the first layer not
yet fitted (docs/BENCHMARKS.md has its cost and gain).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from caprese import distributed
from caprese.adapter import blocks, fill_lowrank, lowrank_tensors
from caprese.distillation.checkpoint import load_checkpoint, save_checkpoint
from caprese.distillation.layerwise import solve_closed_form
from caprese.distillation.settings import DistillSettings
from caprese.distillation.stats import RegressionStats
from caprese.families import decoder, decoder_layers
from caprese.io import append_log
from caprese.phases import split, teacher
from caprese.samples import Batch, Sample, collate

CHECKPOINT = "sequential"


class _Reached(Exception):
    """Stops a decoder forward once the layer of interest has run."""


def _identity(hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return hidden_states


@contextlib.contextmanager
def _skipping(layers: Sequence[torch.nn.Module]) -> Iterator[None]:
    """The given decoder layers pass their input through (an instance-level forward, saved
    and put back, so accelerate's own forward wrappers survive)."""
    saved = [layer.__dict__.get("forward") for layer in layers]
    for layer in layers:
        layer.forward = _identity
    try:
        yield
    finally:
        for layer, forward in zip(layers, saved, strict=True):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


def run_layer(model: torch.nn.Module, index: int, batch: Batch,
              hidden: torch.Tensor | None) -> torch.Tensor:
    """Layer `index` applied to `hidden` through the model's own forward (its masks and
    position embeddings, whatever the family), skipping the layers before it; with
    hidden=None, the dense model's input to layer `index` instead."""
    layers = decoder_layers(model)
    layer = layers[index]
    result: dict[str, torch.Tensor] = {}

    def feed(module, args, kwargs):
        if hidden is None:
            result["out"] = args[0] if args else kwargs["hidden_states"]
            raise _Reached
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def take(module, args, kwargs, output):
        result["out"] = output[0] if isinstance(output, tuple) else output
        raise _Reached

    handles = [layer.register_forward_pre_hook(feed, with_kwargs=True),
               layer.register_forward_hook(take, with_kwargs=True)]
    skipped = [] if hidden is None else list(layers[:index])
    try:
        with _skipping(skipped), contextlib.suppress(_Reached):
            decoder(model)(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return result["out"]


class _Streams:
    """Hidden states entering each layer, one safetensors file per batch and stream.

    Files are renamed into place (never read half-written) but not fsynced one by one: a
    single os.sync() before each layer's checkpoint makes them durable together.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, layer: int, name: str, stream: str) -> Path:
        return self.root / f"layer-{layer:03d}" / f"{name}.{stream}.safetensors"

    def write(self, layer: int, name: str, stream: str, hidden: torch.Tensor) -> None:
        target = self.path(layer, name, stream)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        save_file({"hidden": hidden.detach().to("cpu").contiguous()}, partial)
        os.replace(partial, target)

    def read(self, layer: int, name: str, stream: str, device) -> torch.Tensor:
        return load_file(self.path(layer, name, stream))["hidden"].to(device)

    def keep_only(self, layer: int) -> None:
        for directory in self.root.glob("layer-*"):
            if directory.name != f"layer-{layer:03d}":
                shutil.rmtree(directory, ignore_errors=True)


def run_sequential(
    model: torch.nn.Module,
    samples: Sequence[Sample],
    held_out: Sequence[Sample],
    settings: DistillSettings,
    run_dir: Path,
    pad_id: int = 0,
) -> tuple[list[dict], dict]:
    """Fit every Caprese layer in order (distill() has run check_supported); returns the
    per-layer report and timings."""
    batch_size, ridge = settings.capture_batch, settings.ridge
    layer_blocks = blocks(model)
    device = next(model.parameters()).device
    checkpoints = run_dir / "checkpoints"
    streams = _Streams(checkpoints / "streams")
    named = {"train": samples, "held_out": held_out}
    # Under torchrun each rank carries its own batches' streams (batch i on rank i % N).
    work = [(f"{part}-{start // batch_size:05d}", part,
             collate(chosen[start:start + batch_size], pad_id).to(device))
            for part, chosen in named.items() for start in range(0, len(chosen), batch_size)]
    work = [item for index, item in enumerate(work) if distributed.mine(index)]
    timings = {"train_s": 0.0, "held_out_s": 0.0, "solve_s": 0.0}
    rows: list[dict] = []
    found = load_checkpoint(checkpoints, CHECKPOINT)
    if found is None:
        first = min(layer_blocks)
        with torch.no_grad(), teacher(model):
            for name, part, batch in work:
                started = time.perf_counter()
                hidden = run_layer(model, first, batch, None)
                streams.write(first, name, "teacher", hidden)
                streams.write(first, name, "student", hidden)
                timings[f"{part}_s"] += time.perf_counter() - started
        os.sync()
        distributed.barrier()  # every rank's streams are on disk before the checkpoint
        if distributed.is_main():
            save_checkpoint(checkpoints, CHECKPOINT, lowrank_tensors(model),
                            {"next_layer": first, "rows": rows, "timings": timings})
    else:
        tensors, meta = found
        rows, timings = meta["rows"], meta["timings"]
        fill_lowrank(model, tensors, checkpoints)  # layers not yet fitted are refitted anyway
        first = int(meta["next_layer"])
    _keep_only(streams, first)
    last = max(layer_blocks)
    width = next(iter(layer_blocks.values())).L.shape[0]
    progress = tqdm(total=(last + 1 - first) * len(work), desc="sequential", unit="batch",
                    disable=not distributed.is_main())
    for index in range(first, last + 1):
        block = layer_blocks.get(index)
        stats = {part: RegressionStats.zeros(width) for part in named}
        if block is not None:
            with torch.no_grad():
                block.R.zero_()  # the target is measured with this layer's path off
        for name, part, batch in work:
            started = time.perf_counter()
            _advance(model, index, batch, name, streams, stats[part], block,
                     layer_blocks.get(index - 1))
            timings[f"{part}_s"] += time.perf_counter() - started
            progress.update()
        if block is not None:
            started = time.perf_counter()
            stats = {part: part_stats.all_reduced() for part, part_stats in stats.items()}
            left, right = solve_closed_form(stats["train"], block.L.shape[1], ridge)
            with torch.no_grad():
                block.L.copy_(left)
                block.R.copy_(right)
            timings["solve_s"] += time.perf_counter() - started
            rows.append(_report_row(index, stats, left @ right))
            if distributed.is_main():
                append_log(run_dir / "run_log.jsonl", {"stage": "layerwise", **rows[-1]})
        os.sync()  # the streams of layer index + 1 are on disk before the checkpoint says so
        distributed.barrier()
        if distributed.is_main():
            save_checkpoint(checkpoints, CHECKPOINT, lowrank_tensors(model),
                            {"next_layer": index + 1, "rows": rows, "timings": timings})
        _keep_only(streams, index + 1)
    progress.close()
    distributed.barrier()
    if distributed.is_main():
        shutil.rmtree(streams.root, ignore_errors=True)
    return rows, timings


def _keep_only(streams: _Streams, layer: int) -> None:
    """Drop every other layer's streams: one process deletes, and no process writes the next
    layer's files before it is done (a rank that ran ahead would lose them)."""
    if distributed.is_main():
        streams.keep_only(layer)
    distributed.barrier()


def check_supported(model: torch.nn.Module) -> None:
    """The target assumes the MLP output is added to the residual stream as it is."""
    if hasattr(decoder_layers(model)[0], "post_feedforward_layernorm"):
        raise ValueError(
            "the sequential solver fits corrections that add straight to the residual stream, "
            "but this model normalises its MLP output first (post_feedforward_layernorm, as "
            "Gemma 2 and 3 do): use --solver closed_form"
        )


@torch.no_grad()
def _advance(model, index, batch, name, streams, stats, block, previous) -> None:
    """Both streams through layer `index`: the teacher dense (no selection, no masks: it has
    no continuation to compress), the student teacher-forced. With a Caprese block there,
    add (x_student, teacher - student) at continuation rows to `stats` and store the student
    with this layer's path off, and its x, for the next layer to add the fitted path."""
    device = batch.input_ids.device
    with teacher(model):
        taught = run_layer(model, index, batch, streams.read(index, name, "teacher", device))
    streams.write(index + 1, name, "teacher", taught)
    inputs: dict[str, torch.Tensor] = {}
    hook = None if block is None else block.register_forward_pre_hook(
        lambda module, args: inputs.__setitem__("x", args[0]))
    try:
        with split(model, batch.boundary):
            student = run_layer(model, index, batch,
                                _student_input(index, name, batch, streams, previous))
    finally:
        if hook is not None:
            hook.remove()
    streams.write(index + 1, name, "student", student)
    if block is None:
        return
    x = inputs["x"]
    streams.write(index + 1, name, "student_x", x)
    continuation = batch.continuation
    stats.add(x[continuation], taught[continuation].float() - student[continuation].float())


def _student_input(index, name, batch, streams, previous) -> torch.Tensor:
    """The student entering layer `index`: stored with the previous layer's path off, plus
    that path, now fitted (x L R at continuation rows, as the block adds it)."""
    hidden = streams.read(index, name, "student", batch.input_ids.device)
    if previous is None:
        return hidden
    x = streams.read(index, name, "student_x", batch.input_ids.device)
    return hidden + previous.lowrank(x) * batch.continuation[..., None].to(x.dtype)


def _report_row(index: int, stats: dict[str, RegressionStats], product: torch.Tensor) -> dict:
    """||Y - X L R|| / ||Y|| of the sequential target; before (L R = 0) is 1 by definition."""
    row = {"layer": index, "target": "sequential", "train_tokens": stats["train"].tokens,
           "train_before": stats["train"].relative_error(None),
           "train_after": stats["train"].relative_error(product)}
    if stats["held_out"].tokens:
        row.update(held_out_tokens=stats["held_out"].tokens,
                   held_out_before=stats["held_out"].relative_error(None),
                   held_out_after=stats["held_out"].relative_error(product))
    return row

