"""Resolve MKL VML's kernel choice for each elementwise function once, on one thread, before any real work.

Why: ATen sends contiguous float and double ``exp``, ``log``, ``sqrt``, ``tanh``, ``erf``, ... to MKL's VML, each
intra-op thread calling it on its own chunk. oneMKL picks each function's kernel (ISA and accuracy) lazily, on
that function's first call, and when the first call runs on several threads at once one thread can run the
low-accuracy kernel for its whole chunk of that one call (pytorch/pytorch#188792, oneMKL 2024.2 as bundled with
the torch wheels). We met it as our cross-entropy backward's first ``exp``, run after any MKL GEMM: on the Xeon of
machine F, in one fresh process in four to ten, the first 512 of 1024 rows of the softmax were off by 1.5e-4
relative (12 bits), which made the self-check's gradient comparison fail at random; every later call was exact.
One call per function and dtype on a single element, on the importing thread, settles the choice for the process
(upstream's proposed fix does the same in C++); it costs a tenth of a millisecond, once.
"""

from __future__ import annotations

import torch

# the functions ATen routes to VML (aten/src/ATen/cpu/vml.h, IMPLEMENT_VML_MKL), by their torch names
VML_FUNCTIONS = ("exp", "log", "log10", "log2", "sqrt", "sin", "cos", "tan", "tanh", "asin", "acos", "atan", "erf",
                 "erfc", "erfinv", "trunc")  # fmt: skip


def warm_vml() -> bool:
    """Call every VML function once on a one-element float32 and float64 tensor (single-threaded: one element is
    below any parallel grain). False (nothing done) when this torch is not built with MKL."""
    if not torch.backends.mkl.is_available():
        return False
    with torch.no_grad():
        for dtype in (torch.float32, torch.float64):
            x = torch.full((1,), 0.5, dtype=dtype)  # inside every function's domain (erfinv, acos, log, ...)
            for name in VML_FUNCTIONS:
                getattr(torch, name)(x)
    return True
