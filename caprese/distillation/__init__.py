"""Distillation: fit the low-rank path of every Caprese block to the original model.

    settings.py      DistillSettings (every knob) and TrainSettings (one Adam stage)
    stats.py         the layer-wise least squares' sufficient statistics
    layerwise.py     closed form or SGD per layer, on the original model's inputs
    sequential.py    closed form per layer, on the compressed model's own inputs
    e2e.py           end-to-end objectives (hidden-state MSE, logit KL)
    trainer.py       the Adam loop (warm-up, linear decay, checkpoints, resume)
    checkpoint.py    checkpoints that are never half-read
    cost.py          a stage's seconds and peak memory across the processes that ran it
    teacher_text.py  the original model's own continuations as training text
    harm.py          do no harm: cut each layer's path to what helps on held-out text;
                     the adapter against the method alone
    run.py           distill(): the stages into a resumable run folder
    job.py           DistillJob / run_job: attach, data (the default recipe: the model's
                     own text plus general text), teacher text, distill, detach
"""

from caprese.distillation.job import DistillJob, run_job
from caprese.distillation.run import distill
from caprese.distillation.settings import SOLVERS, STAGES, DistillSettings, TrainSettings
from caprese.distillation.trainer import TrainingDiverged
from caprese.samples import Sample

__all__ = ["SOLVERS", "STAGES", "DistillJob", "DistillSettings", "Sample", "TrainSettings",
           "TrainingDiverged", "distill", "run_job"]
