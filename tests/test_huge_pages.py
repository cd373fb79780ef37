"""Weights on 2 MiB pages: moved in place, values untouched, and `import caprese` asks
PyTorch for them unless the user said otherwise."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

import caprese
from caprese.kernels.huge_pages import ENVIRONMENT, HUGE_PAGE, collapse, huge_page_bytes, keep_off

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
THP_ON = sys.platform == "linux" and THP.exists() and "[never]" not in THP.read_text()


def small_paged(values: torch.Tensor) -> torch.Tensor:
    return keep_off(torch.empty_like(values)).copy_(values)


def test_collapse_moves_a_tensor_onto_huge_pages_in_place():
    values = torch.randn(4 * HUGE_PAGE // 4)
    tensor = small_paged(values)
    assert huge_page_bytes(tensor) == 0
    address = tensor.data_ptr()
    moved = collapse([tensor, tensor[1:]])  # a view of the same storage counts once
    assert tensor.data_ptr() == address and torch.equal(tensor, values)
    assert moved == huge_page_bytes(tensor)
    if THP_ON:  # the whole 2 MiB pages inside its 8 MiB: 3 or 4 of them
        assert 3 * HUGE_PAGE <= moved <= 4 * HUGE_PAGE


def test_keep_off_gives_small_pages_even_in_memory_that_held_huge_ones():
    """The allocator hands freed memory out again; pages it still holds from earlier tensors
    on huge pages must not make the small-paged side of a comparison huge."""
    for _ in range(10):
        earlier = [torch.ones(int(n * HUGE_PAGE // 4)) for n in (3.5, 5, 9, 17)]
        del earlier
        values = torch.randn(4 * HUGE_PAGE // 4)
        assert huge_page_bytes(small_paged(values)) == 0


def test_collapse_leaves_tensors_under_one_huge_page_alone():
    assert collapse([torch.ones(1000), torch.ones(HUGE_PAGE // 8)]) == 0


def test_decode_kernels_put_the_models_weights_on_huge_pages():
    model = tiny_model("llama", vocab_size=4096, hidden_size=512)  # an 8 MiB embedding
    embedding = model.get_input_embeddings().weight
    embedding.data = small_paged(embedding.data)
    assert huge_page_bytes(embedding) == 0
    caprese.use_decode_kernels(model)
    try:
        assert huge_page_bytes(embedding) >= 3 * HUGE_PAGE or not THP_ON
    finally:
        caprese.use_decode_kernels(model, False)


@pytest.mark.parametrize("setting", [None, "0"])
def test_importing_caprese_asks_for_huge_pages_unless_told_not_to(setting):
    environment = {k: v for k, v in os.environ.items() if k != ENVIRONMENT}
    if setting is not None:
        environment[ENVIRONMENT] = setting
    probe = ("import torch, caprese\n"
             "from caprese.kernels.huge_pages import huge_page_bytes\n"
             "tensor = torch.ones(8 << 20, dtype=torch.uint8)\n"
             "print(huge_page_bytes(tensor))")
    out = subprocess.run([sys.executable, "-c", probe], env=environment, check=True,
                         capture_output=True, text=True).stdout
    if setting == "0":
        assert int(out) == 0
    else:
        assert int(out) > 0 or not THP_ON
