"""Decode backends: tensors in, tensors out; no knowledge of blocks or models.

    cpu_kernels.cpp  the CPU kernels (bf16 matrix-vector, CATS' sparse MLP); the headers
                     beside it: simd.h, decode_attention.h, threshold.h (CATS' threshold)
    cpu.py           builds them once per kind of CPU; Python wrappers; route_linears
    triton.py        CATS' sparse decode on CUDA (Triton)
    select.py        the backend a block uses: select_backend(device, kernels)
    attention.py     grouped-query attention for compiled CPU decode steps
    layout.py        the decoding layouts the model's projections become views of
    huge_pages.py    weights on 2 MiB pages (fewer TLB misses when a step reads them all)
"""
