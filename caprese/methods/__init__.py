"""Efficient-inference methods: the compressed MLP (the paper's FFhat).

A method is stateless code plus a small per-sample state computed at prefill:

    state = method.select(act_gate, hidden, valid)   # from the prompt's dense MLP pass
    mask  = method.keep_mask(state, act_gate)        # reference form: which entries survive
    fast  = method.gather(mlp, state)                 # weights for the fast decode path

A quantizing method (nf4) instead decodes with its own copy of the MLP: method.replacement.

The block owns the low-rank path and the phases; a method only decides what to keep.
"""

from __future__ import annotations

from caprese.methods.base import FastWeights, Method
from caprese.methods.cats import Cats
from caprese.methods.dense import Dense
from caprese.methods.griffin import Griffin
from caprese.methods.nf4 import Nf4

__all__ = ["METHODS", "FastWeights", "Method", "Griffin", "Cats", "Dense", "Nf4",
           "build_method"]


METHODS: dict[str, type[Method]] = {"griffin": Griffin, "cats": Cats, "nf4": Nf4, "none": Dense}


def build_method(name: str, density: float) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name](density)
