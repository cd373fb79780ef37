"""Efficient-inference methods: the compressed MLP (the paper's FFhat).

A method is stateless code plus a small per-sample state computed at prefill:

    state = method.select(act_gate, hidden, valid)   # from the prompt's dense MLP pass
    mask  = method.keep_mask(state, act_gate)        # reference form: which entries survive
    fast  = method.gather(mlp, state)                 # weights for the fast decode path

The block owns the low-rank path and the phases; a method only decides what to keep.
"""

from __future__ import annotations

from caprese.methods.base import FastWeights, Method
from caprese.methods.cats import Cats
from caprese.methods.dense import Dense
from caprese.methods.griffin import Griffin

__all__ = ["FastWeights", "Method", "Griffin", "Cats", "Dense", "build_method"]


def build_method(name: str, density: float) -> Method:
    methods = {"griffin": Griffin, "cats": Cats, "none": Dense}
    if name not in methods:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(methods)}")
    return methods[name](density)
