"""Training checkpoints: fairseq's file names, plain data inside, atomic writes, exact resume.

A checkpoint is a dict of tensors and builtin values only (``torch.load(weights_only=True)`` reads it): the
model state, NAG's momentum buffers and ``lr_old``, the update count, the data position (epoch, batches done),
the torch RNG state, metrics, the config and the dictionary. It is written to ``NAME.tmp`` and renamed, so a
crash mid-write never destroys the previous good file. A fairseq checkpoint can be a ``--restore-file`` too:
its weights, momentum buffers (mapped by fairseq's parameter order) and update count are taken over.
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .fairseq_io import safe_load, state_dict_from_fairseq
from .model import TransformerLM
from .optim import NAG

FORMAT = "adaptive-lm/1"


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    path = str(path)
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def optimizer_to_plain(opt: NAG, model: torch.nn.Module) -> dict[str, Any]:
    """Momentum buffers keyed by parameter *name* (robust to parameter order), plus the group's lr/lr_old."""
    names = {id(p): n for n, p in model.named_parameters()}
    state = {names[id(p)]: {k: v for k, v in s.items()} for p, s in opt.state.items()}
    group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    return {"state": state, "group": group}


def optimizer_from_plain(opt: NAG, model: torch.nn.Module, plain: dict[str, Any]) -> None:
    params = dict(model.named_parameters())
    opt.state.clear()
    for name, s in plain["state"].items():
        if name not in params:
            raise UserError(f"optimizer state names parameter {name!r} that the model does not have")
        opt.state[params[name]] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
    for g in opt.param_groups:
        g.update(plain["group"])


def fairseq_optimizer_state(ckpt: dict[str, Any], model: TransformerLM) -> dict[str, Any] | None:
    """fairseq's ``last_optimizer_state`` (indexed by its parameter order) -> our name-keyed plain state."""
    opt = ckpt.get("last_optimizer_state")
    if not opt:
        return None
    seen: set[int] = set()
    order: list[str] = []
    for k, v in ckpt["model"].items():
        if not v.is_floating_point() or k.endswith("version") or k.endswith("_float_tensor"):
            continue
        if k.endswith("embed_positions.weights"):
            continue
        if v.data_ptr() in seen:
            continue
        seen.add(v.data_ptr())
        order.append(k)
    bufs = {order[int(i)]: s["momentum_buffer"] for i, s in opt["state"].items() if "momentum_buffer" in s}
    mapped = state_dict_from_fairseq(bufs, model.cfg)
    group = {k: v for k, v in opt["param_groups"][0].items() if k != "params"}
    return {"state": {k: {"momentum_buffer": v} for k, v in mapped.items()}, "group": group}


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    return safe_load(path, mmap=False)


def is_ours(ckpt: dict[str, Any]) -> bool:
    return ckpt.get("format") == FORMAT


def prune(save_dir: str, keep_interval_updates: int, keep_last_epochs: int) -> None:
    """Delete the oldest ``checkpoint_E_U.pt`` / ``checkpoint{E}.pt`` beyond the numbers to keep."""

    def keep_newest(pattern: str, regex: str, n: int) -> None:
        if n <= 0:
            return
        files = []
        for f in glob.glob(os.path.join(save_dir, pattern)):
            m = re.fullmatch(regex, os.path.basename(f))
            if m:
                files.append((int(m.group(1)), f))
        for _, f in sorted(files, reverse=True)[n:]:
            os.remove(f)

    keep_newest("checkpoint_*_*.pt", r"checkpoint_\d+_(\d+)\.pt", keep_interval_updates)
    keep_newest("checkpoint*.pt", r"checkpoint(\d+)\.pt", keep_last_epochs)


def resolve_restore(save_dir: str, restore_file: str) -> Path | None:
    """fairseq: the default ``checkpoint_last.pt`` means "in --save-dir, if it exists"; other names are paths."""
    if restore_file == "checkpoint_last.pt":
        p = Path(save_dir) / "checkpoint_last.pt"
        return p if p.is_file() else None
    p = Path(restore_file)
    if not p.is_file() and (Path(save_dir) / restore_file).is_file():
        p = Path(save_dir) / restore_file
    if not p.is_file():
        raise UserError(f"--restore-file {restore_file}: not found (also looked in {save_dir})")
    return p
