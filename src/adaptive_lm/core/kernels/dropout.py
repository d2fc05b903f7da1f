"""Dropout on CPU: the keep-mask comes from 16-bit lanes of 64-bit random words (4 draws per word), kept for
backward already scaled, in the input's dtype; ``add_dropout`` does a residual ``x + dropout(h)`` in one pass.

Keep probability is quantised to 1/65536 and the scale uses the exact quantised value, so the expectation is
preserved. The attention kernels draw their masks with the same helpers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from adaptive_lm.core.kernels.switch import _lanes, _new_seed, ours

_LANES = 65536


def _threshold(p: float) -> int:
    """Keep a lane iff lane >= this (P = 1 - round(p * 65536) / 65536)."""
    return round(p * _LANES) - _LANES // 2


def _keep_mask(shape: torch.Size | tuple[int, ...], p: float, seed: int, device: torch.device) -> Tensor:
    """0/1 int16 keep-mask (clamping first avoids int16 overflow; cheaper to make than a bool mask)."""
    thr = _threshold(p)
    return _lanes(shape, seed, device).clamp_(thr - 1, thr).sub_(thr - 1)


def _scale(p: float) -> float:
    return 1.0 / (1.0 - round(p * _LANES) / _LANES)


def _scaled_keep(x: Tensor, p: float, seed: int) -> Tensor:
    """The keep-mask for ``x``, in its dtype, already scaled: 0 or 1 / (1 - p)."""
    return _keep_mask(x.shape, p, seed, x.device).to(x.dtype).mul_(_scale(p))


class _Dropout(torch.autograd.Function):
    """The keep-mask is kept for backward already scaled, in the input's dtype: forward and backward are then one
    multiply each (an int16 0/1 mask costs a conversion and a second multiply on both sides)."""

    @staticmethod
    def forward(ctx, x: Tensor, p: float, seed: int) -> Tensor:  # type: ignore[override]
        keep = _scaled_keep(x, p, seed)
        ctx.save_for_backward(keep)
        return x * keep

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (keep,) = ctx.saved_tensors
        return grad * keep, None, None


class _DropoutAdd(torch.autograd.Function):
    """x + dropout(h) in one pass (``addcmul``) instead of a multiply then an add: every residual connection."""

    @staticmethod
    def forward(ctx, x: Tensor, h: Tensor, p: float, seed: int) -> Tensor:  # type: ignore[override]
        keep = _scaled_keep(h, p, seed)
        ctx.save_for_backward(keep)
        return torch.addcmul(x, h, keep)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (keep,) = ctx.saved_tensors
        return grad, grad * keep, None, None


def add_dropout(x: Tensor, h: Tensor, p: float, training: bool) -> Tensor:
    """``x + F.dropout(h, p, training)`` (same mask as ``dropout(h, ...)`` would draw)."""
    if not training or not 0.0 < p < 1.0 or not ours(h) or x.shape != h.shape or x.dtype != h.dtype:
        return x + dropout(h, p, training)
    return _DropoutAdd.apply(x, h, p, _new_seed())


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """``F.dropout`` semantics; the fast regenerated mask on CPU, PyTorch's kernel elsewhere."""
    if not training or p == 0.0:
        return x
    if not ours(x) or not 0.0 < p < 1.0:  # p = 1 (all dropped) and bad values: PyTorch's own answer
        return F.dropout(x, p, True)
    return _Dropout.apply(x, p, _new_seed())
