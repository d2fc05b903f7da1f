"""Mixed precision: which half dtype a run asked for, and the autocast context that applies it."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def half_dtype(bf16: bool = False, fp16: bool = False) -> torch.dtype | None:
    """The autocast dtype of ``--bf16`` / ``--fp16`` (None: fp32)."""
    return torch.bfloat16 if bf16 else torch.float16 if fp16 else None


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> Any:
    """``torch.autocast`` for ``dtype`` on the device's type, or nothing for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)
