"""``from_pretrained``: one entry point for every model file a user may hold.

Accepted: a fairseq checkpoint (``model.pt`` / ``checkpoint_best.pt``) with ``dict.txt`` beside it or in a
``data-bin/`` folder beside it, one of our training checkpoints (it carries its dictionary), an exported
model folder (``config.json`` + ``model.safetensors`` + ``dict.txt``), or a folder holding any of these.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig
from .dictionary import Dictionary
from .errors import UserError
from .fairseq_io import config_from_fairseq, load_into, safe_load, state_dict_from_fairseq, stored_settings
from .model import TransformerLM

CHECKPOINT_FORMAT = "adaptive-lm/1"


@dataclass
class LanguageModel:
    """A model with its dictionary: what ``from_pretrained`` returns (scoring and generation build on it)."""

    model: TransformerLM
    dictionary: Dictionary
    source: str = ""
    tokens_per_sample: int | None = None

    @property
    def cfg(self) -> ModelConfig:
        return self.model.cfg

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, *args: Any, **kwargs: Any) -> LanguageModel:
        self.model.to(*args, **kwargs)
        return self

    def eval(self) -> LanguageModel:
        self.model.eval()
        return self


def find_dictionary(model_path: Path, tried: list[Path] | None = None) -> Path:
    """dict.txt next to the model, in data-bin/ next to it, or one level up: say which paths were tried."""
    base = model_path if model_path.is_dir() else model_path.parent
    candidates = [base / "dict.txt", base / "data-bin" / "dict.txt", base.parent / "dict.txt"]
    for c in candidates:
        if c.is_file():
            return c
    tried_s = ", ".join(str(c) for c in candidates)
    raise UserError(f"{model_path}: no dict.txt found (tried {tried_s}); pass dictionary=PATH")


def _pick_file(folder: Path) -> Path:
    for name in ("model.safetensors", "model.pt", "checkpoint_best.pt", "checkpoint_last.pt"):
        if (folder / name).is_file():
            return folder if name == "model.safetensors" else folder / name
    raise UserError(
        f"{folder}: no model here (looked for model.safetensors, model.pt, checkpoint_best.pt, checkpoint_last.pt)"
    )


def load_fairseq(path: Path, dictionary: Dictionary, ckpt: dict[str, Any] | None = None) -> TransformerLM:
    """Build from the checkpoint's stored settings (never the arch name alone) and load its weights."""
    ckpt = ckpt if ckpt is not None else safe_load(path)
    cfg = config_from_fairseq(stored_settings(ckpt), len(dictionary))
    model = TransformerLM(cfg)
    load_into(model, state_dict_from_fairseq(ckpt["model"], cfg), source=str(path))
    return model


def from_pretrained(
    path: str | os.PathLike, dictionary: str | os.PathLike | None = None, device: str | torch.device = "cpu"
) -> LanguageModel:
    """Load a model and its dictionary from any supported layout; returns it in eval mode."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such file or folder")
    if p.is_dir():
        p = _pick_file(p)
    if p.is_dir():  # exported model folder
        cfg = ModelConfig.from_dict(json.loads((p / "config.json").read_text())["model"])
        from safetensors.torch import load_file

        model = TransformerLM(cfg)
        load_into(model, load_file(str(p / "model.safetensors")), source=str(p))
        d = Dictionary.load(Path(dictionary) if dictionary else p / "dict.txt")
        lm = LanguageModel(model, d, str(p))
        return lm.to(device).eval()
    ckpt = safe_load(p)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise UserError(f"{p}: not a model checkpoint (no 'model' entry)")
    if ckpt.get("format") == CHECKPOINT_FORMAT:  # ours: config and dictionary travel inside
        cfg = ModelConfig.from_dict(ckpt["config"]["model"])
        d = Dictionary()
        if dictionary:
            d = Dictionary.load(dictionary)
        else:
            for sym, c in zip(ckpt["dictionary"]["symbols"][d.nspecial :], ckpt["dictionary"]["counts"][d.nspecial :]):
                d.add_symbol(sym, n=c, overwrite=True)
        model = TransformerLM(cfg)
        load_into(model, ckpt["model"], source=str(p))
        tps = ckpt["config"].get("tokens_per_sample")
        return LanguageModel(model, d, str(p), tps).to(device).eval()
    d = Dictionary.load(Path(dictionary) if dictionary else find_dictionary(p))
    model = load_fairseq(p, d, ckpt)
    tps = stored_settings(ckpt).get("tokens_per_sample")
    return LanguageModel(model, d, str(p), tps).to(device).eval()
