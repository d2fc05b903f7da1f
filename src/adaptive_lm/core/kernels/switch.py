"""Which kernels run, and the random numbers ours draw.

``SETTINGS.plain`` (``use_plain_kernels``, ``plain_kernels``, ``--kernels plain``) makes every device run PyTorch's
own kernels, so the CPU runs what CUDA runs. Our dropout and attention masks come from numpy's PCG64-DXSM seeded
from the global torch RNG; under ``--compile`` those two calls are hidden from TorchDynamo (``prepare_for_compile``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor


class _Settings:
    """The kernel choice: ``plain`` = PyTorch's own kernels on every device; ``compile_safe`` = the random-number
    helpers are hidden from TorchDynamo (set by ``prepare_for_compile``)."""

    plain: bool = False
    compile_safe: bool = False


SETTINGS = _Settings()


def use_plain_kernels(on: bool = True) -> None:
    """Run PyTorch's kernels (what CUDA runs) on every device, CPU included; ``False`` restores ours on CPU."""
    SETTINGS.plain = bool(on)


@contextlib.contextmanager
def plain_kernels(on: bool = True) -> Iterator[None]:
    """``use_plain_kernels`` for the duration of a ``with`` block."""
    before = SETTINGS.plain
    SETTINGS.plain = bool(on)
    try:
        yield
    finally:
        SETTINGS.plain = before


def ours(t: Tensor) -> bool:
    """Whether our CPU kernels handle ``t`` (a CPU tensor, plain kernels off)."""
    return t.device.type == "cpu" and not SETTINGS.plain


def _lanes(shape: torch.Size | tuple[int, ...], seed: int, device: torch.device) -> Tensor:
    """Uniform random int16 values of ``shape``: the 16-bit lanes of 64-bit words from numpy's PCG64-DXSM (which
    fills words 2.4x faster than torch's CPU Mersenne Twister; masks were a tenth of a bf16 step)."""
    if SETTINGS.compile_safe:
        return _COMPILE_SAFE["lanes"](shape, seed, device)
    return _lanes_impl(shape, seed, device)


def _lanes_impl(shape: torch.Size | tuple[int, ...], seed: int, device: torch.device) -> Tensor:
    n = 1
    for s in shape:
        n *= s
    words = np.random.PCG64DXSM(seed).random_raw((n + 3) // 4)  # uint64
    return torch.from_numpy(words.view(np.int16)[:n]).view(shape).to(device)


def _new_seed() -> int:
    """A mask seed from the global torch RNG (so seeding torch, as the trainer does per update, fixes the masks)."""
    if SETTINGS.compile_safe:
        return _COMPILE_SAFE["seed"]()
    return _new_seed_impl()


def _new_seed_impl() -> int:
    return int(torch.randint(0, 2**62, (1,)).item())


_COMPILE_SAFE: dict = {}


def prepare_for_compile() -> None:
    """Keep TorchDynamo out of the numpy mask generator (it mis-traces the uint64 -> int16 view); called by the
    trainer under ``--compile`` only, because ``torch.compiler.disable`` imports TorchDynamo (0.7 s)."""
    _COMPILE_SAFE.update(lanes=torch.compiler.disable(_lanes_impl), seed=torch.compiler.disable(_new_seed_impl))
    SETTINGS.compile_safe = True
