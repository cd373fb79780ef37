"""A small distillation run on a tiny model, as a separate process (kill-and-resume test)."""

from __future__ import annotations

import sys

import torch
from conftest import tiny_model

import caprese
from caprese.distillation import DistillSettings, Sample, distill


def tiny_samples(count: int, seed: int = 0) -> list[Sample]:
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(count):
        length = int(torch.randint(16, 32, (1,), generator=generator))
        boundary = int(torch.randint(4, 12, (1,), generator=generator))
        ids = torch.randint(3, 96, (length,), generator=generator).tolist()
        samples.append(Sample(tuple(ids), boundary))
    return samples


def run(out: str, resume: bool, step_delay: float = 0.0, solver: str = "closed_form+sgd"
        ) -> dict:
    model = caprese.attach(tiny_model("qwen2"),
                           caprese.CapreseConfig(method="cats", density=0.5, rank=4))
    settings = DistillSettings(stages=("layerwise", "e2e"), solver=solver,
                               capture_batch=4, sgd_epochs=2, sgd_batch=8, e2e_epochs=2,
                               e2e_batch=8, e2e_lr=1e-3, micro_batch=4, checkpoint_every=1)
    if step_delay:  # slow the run down so that a test can kill it in the middle
        import caprese.distillation.sequential as sequential
        import caprese.distillation.trainer as trainer

        append = trainer.append_log

        def slow_append(path, record):
            append(path, record)
            import time

            time.sleep(step_delay)

        trainer.append_log = sequential.append_log = slow_append
    return distill(model, tiny_samples(40), out, settings, held_out=tiny_samples(8, seed=1),
                   resume=resume)


if __name__ == "__main__":
    options = [a for a in sys.argv[2:] if a.startswith("--")]
    delays = [a for a in sys.argv[2:] if a[0].isdigit()]
    run(sys.argv[1], resume="--resume" in options, step_delay=float(delays[0]) if delays else 0,
        solver="sequential" if "--sequential" in options else "closed_form+sgd")
