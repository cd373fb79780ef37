"""Math and language data in one record shape, and the distillation training mixture.

    records.py       each file format's rows as Records
    gsm_symbolic.py  GSM-Symbolic templates (bundled) and their generated variants
    registry.py      every data set by name: bundled file, sha256, Hub id; load()
    mixture.py       the seeded training mixture, refusing evaluation problems
    general.py       general text (XSum articles 500-999) for the mixture; 0-499 reserved
    bundled/         the data files (README.md: origin, licence, sha256)
"""

from caprese.data import gsm_symbolic
from caprese.data.mixture import build_mixture, training_pool, training_split
from caprese.data.records import DATA_ENV, CapreseDataError, gsm8k_answer
from caprese.data.registry import (
    DATASETS,
    EVALUATION_SETS,
    TRAINING_SOURCES,
    data_dir,
    load,
)
from caprese.samples import Record, TrainingSample

__all__ = [
    "DATASETS",
    "DATA_ENV",
    "EVALUATION_SETS",
    "TRAINING_SOURCES",
    "CapreseDataError",
    "Record",
    "TrainingSample",
    "build_mixture",
    "data_dir",
    "gsm8k_answer",
    "gsm_symbolic",
    "load",
    "training_pool",
    "training_split",
]
