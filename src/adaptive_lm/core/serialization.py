"""Our model-file layout, shared by the trainer (which writes it) and the loaders (which read it).

A checkpoint of ours is a dict of CPU tensors and builtin values (``torch.load(weights_only=True)`` reads it) tagged
``"format": FORMAT``; its dictionary travels inside as plain lists. An exported folder tags its ``config.json`` and
``model.safetensors`` the same way.
"""

from __future__ import annotations

import torch

from adaptive_lm.core.dictionary import Dictionary

FORMAT = "adaptive-lm/1"


def unique_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each tied tensor under its first name only (what safetensors needs)."""
    seen: set[int] = set()
    out = {}
    for k, v in model.state_dict().items():
        if v.data_ptr() in seen and v.numel() > 0:
            continue
        seen.add(v.data_ptr())
        out[k] = v
    return out


def dictionary_payload(d: Dictionary) -> dict[str, list]:
    """A dictionary as plain lists (symbols and counts, specials included) for a checkpoint."""
    return {"symbols": list(d.symbols), "counts": list(d.count)}


def dictionary_from_payload(payload: dict[str, list]) -> Dictionary:
    d = Dictionary()
    for sym, c in zip(payload["symbols"][d.nspecial :], payload["counts"][d.nspecial :]):
        d.add_symbol(sym, n=c, overwrite=True)
    return d
