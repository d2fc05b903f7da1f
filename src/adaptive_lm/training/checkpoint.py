"""Training checkpoints: fairseq's file names and rules, plain data inside, atomic writes, one writer per folder.

A checkpoint is a dict of CPU tensors and builtin values only (``torch.load(weights_only=True)`` reads it): the
model state, NAG's momentum buffers and ``lr_old``, the ``TrainState`` (update count, data position, best
validation loss, loss scale, ...), the torch RNG state, the config and the dictionary. It is serialised once per
save into a temporary file with a per-process name and renamed, so a crash mid-write never destroys the previous
good file; the other names of the same save (``checkpoint_best.pt``, ...) are hard links to it. A fairseq
checkpoint can be a ``--restore-file`` too: its weights, momentum buffers (mapped through fairseq's parameter
order) and update count are taken over (``fairseq/checkpoint_utils.py``, ``fairseq/trainer.py``).
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adaptive_lm.core.config import ModelConfig
from adaptive_lm.core.dictionary import Dictionary
from adaptive_lm.core.errors import UserError
from adaptive_lm.core.fairseq_format import safe_load, state_dict_from_fairseq, stored_vocab_size
from adaptive_lm.core.files import atomic_link, atomic_torch_save
from adaptive_lm.core.metrics import perplexity
from adaptive_lm.core.model import TransformerLM
from adaptive_lm.core.optim import NAG
from adaptive_lm.core.serialization import FORMAT


@dataclass
class TrainState:
    """Everything about a run's progress that a checkpoint must carry for an exact resume."""

    num_updates: int = 0
    epoch: int = 1
    iterations_in_epoch: int = 0  # batches of this epoch done
    best_val: float | None = None  # fairseq's ``save_checkpoint.best``: moves only when a checkpoint is saved
    bad_valid: int = 0  # validations in a row without improvement (--patience)
    patience_best: float | None = None  # fairseq's ``should_stop_early.best``: moves at every validation
    train_seconds: float = 0.0
    loss_scale: float = 1.0  # fp16 dynamic loss scaling (optim.LossScaler)
    scaler_iter: int = 0
    scaler_last_rescale: int = -1
    scaler_last_overflow: int = -1
    # a signal skipped the validation and checkpoints due after update ``num_updates``; the resumed run does them
    # first, as the uninterrupted one did: 1 at an epoch's end, 0 within an epoch, -1 nothing pending
    pending: int = -1
    # the log meters' sums within an epoch (``report.Meter.state``): "inner" (train_inner) and "epoch" (train)
    meters: dict[str, dict[str, float]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ---- writing ------------------------------------------------------------------------------------------------
def write_checkpoints(state: dict[str, Any], paths: list[str]) -> None:
    """Serialise ``state`` once into ``paths[0]``; the other paths become hard links to it (a copy where the file
    system has none), each put in place by an atomic rename."""
    if not paths:
        return
    atomic_torch_save(state, paths[0])
    for p in paths[1:]:
        atomic_link(paths[0], p)


def metric_value(cfg: Any, val_bits: float) -> float:
    """The validation value fairseq compares and names checkpoints by: the logged one, the loss (bits) rounded to 3
    decimals, the perplexity to 2 (its ``get_smoothed_values``)."""
    if cfg.best_checkpoint_metric == "ppl":
        return round(perplexity(val_bits), 2)
    return round(val_bits, 3)


def checkpoint_names(
    cfg: Any, state: TrainState, end_of_epoch: bool, val_loss: float | None, prev_best: float | None
) -> list[str]:
    """fairseq's ``save_checkpoint`` conditions, in its order: ``checkpoint{epoch}.pt`` at epoch ends,
    ``checkpoint_{epoch}_{updates}.pt`` every ``--save-interval-updates``, ``checkpoint_best.pt`` when the
    validation loss is at least as good as the best so far, ``checkpoint.best_loss_X.pt`` with
    ``--keep-best-checkpoints``, and ``checkpoint_last.pt``."""
    epoch, updates = state.epoch, state.num_updates
    better = (lambda a, b: a >= b) if cfg.maximize_best_checkpoint_metric else (lambda a, b: a <= b)
    names = []
    if end_of_epoch and not cfg.no_epoch_checkpoints and epoch % cfg.save_interval == 0:
        names.append(f"checkpoint{epoch}.pt")
    if not end_of_epoch and cfg.save_interval_updates > 0 and updates % cfg.save_interval_updates == 0:
        names.append(f"checkpoint_{epoch}_{updates}.pt")
    if val_loss is not None and (prev_best is None or better(val_loss, prev_best)):
        names.append("checkpoint_best.pt")
    if val_loss is not None and cfg.keep_best_checkpoints > 0:
        kept = _numbered(cfg.save_dir, rf"checkpoint\.best_{cfg.best_checkpoint_metric}_(\d+\.?\d*)\.pt")
        worst = None  # fairseq compares with the best so far *including* this one: no kept file means saving
        if kept:
            worst = kept[-1][0] if cfg.maximize_best_checkpoint_metric else kept[0][0]
        # fairseq's tie-breaking digit: numpy seeded from hash((epoch, updates, val_loss))
        rand = np.random.RandomState(int(hash((epoch, updates, val_loss)) % 1e6)).randint(0, cfg.keep_best_checkpoints)
        if worst is None or better(val_loss, worst):
            names.append(f"checkpoint.best_{cfg.best_checkpoint_metric}_{val_loss:.3f}{rand}.pt")
    if not cfg.no_last_checkpoints:
        names.append("checkpoint_last.pt")
    return names


def _numbered(save_dir: str, regex: str) -> list[tuple[float, str]]:
    """(number, path) of the files in ``save_dir`` matching ``regex``, highest number first (fairseq's order)."""
    out = []
    for f in os.listdir(save_dir) if os.path.isdir(save_dir) else []:
        m = re.fullmatch(regex, f)
        if m:
            out.append((float(m.group(1)), os.path.join(save_dir, f)))
    return sorted(out, reverse=True)


def prune(cfg: Any, end_of_epoch: bool) -> None:
    """Delete the oldest interval/epoch checkpoints and the worst best-N ones beyond the numbers to keep."""
    d = cfg.save_dir
    if not end_of_epoch and cfg.keep_interval_updates > 0:
        for _, f in _numbered(d, r"checkpoint_\d+_(\d+)\.pt")[cfg.keep_interval_updates :]:
            os.remove(f)
    if cfg.keep_last_epochs > 0:
        for _, f in _numbered(d, r"checkpoint(\d+)\.pt")[cfg.keep_last_epochs :]:
            os.remove(f)
    if cfg.keep_best_checkpoints > 0:
        best = _numbered(d, rf"checkpoint\.best_{cfg.best_checkpoint_metric}_(\d+\.?\d*)\.pt")
        if not cfg.maximize_best_checkpoint_metric:
            best = best[::-1]
        for _, f in best[cfg.keep_best_checkpoints :]:
            os.remove(f)


# ---- optimizer state ------------------------------------------------------------------------------------------
def optimizer_to_plain(opt: NAG, model: torch.nn.Module) -> dict[str, Any]:
    """Momentum buffers keyed by parameter *name* (robust to parameter order), as CPU tensors, plus lr/lr_old."""
    names = {id(p): n for n, p in model.named_parameters()}
    state = {names[id(p)]: {k: v.detach().cpu() for k, v in s.items()} for p, s in opt.state.items()}
    group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    return {"state": state, "group": group}


def optimizer_from_plain(opt: NAG, model: torch.nn.Module, plain: dict[str, Any]) -> None:
    """Load name-keyed optimizer state; every buffer goes to its parameter's device and dtype."""
    params = dict(model.named_parameters())
    opt.state.clear()
    for name, s in plain["state"].items():
        if name not in params:
            raise UserError(f"optimizer state names parameter {name!r} that the model does not have")
        p = params[name]
        opt.state[p] = {
            k: (v.to(p.device, torch.float32, copy=True) if torch.is_tensor(v) else v) for k, v in s.items()
        }
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


# ---- reading --------------------------------------------------------------------------------------------------
def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    ck = safe_load(path, mmap=False)
    if not isinstance(ck, dict) or "model" not in ck:
        raise UserError(
            f"{path}: not a model checkpoint (no 'model' entry); pass a file written by adaptive-lm "
            f"train or fairseq-train"
        )
    return ck


def is_ours(ckpt: dict[str, Any]) -> bool:
    return ckpt.get("format") == FORMAT


@dataclass
class Restored:
    """What a ``--restore-file`` gives the trainer, whichever program wrote it."""

    path: Path
    weights: dict[str, torch.Tensor]  # our names
    optimizer: dict[str, Any] | None
    state: TrainState
    rng: torch.Tensor | None
    changed: list[str] = dataclasses.field(default_factory=list)  # runtime settings that differ from the stored ones


# model settings that shape no weight: a resumed run may change them, as fairseq-train lets it (it builds the model
# from the command line, then loads the weights)
RUNTIME_SETTINGS = ("checkpoint_activations", "offload_activations", "min_params_to_wrap", "dropout",
                    "attention_dropout", "activation_dropout", "relu_dropout", "adaptive_softmax_dropout",
                    "decoder_layerdrop", "quant_noise_pq", "quant_noise_pq_block_size")  # fmt: skip


def read_restore(path: Path, model: TransformerLM, dictionary: Dictionary) -> Restored:
    """Read our checkpoint or fairseq's for continuing training of ``model`` (built from the flags); a different
    model or dictionary is refused by name."""
    ck = load_checkpoint(path)
    if not is_ours(ck):
        if "cfg" not in ck and "args" not in ck:
            raise UserError(f"{path}: neither an adaptive-lm nor a fairseq training checkpoint")
        it = (ck.get("extra_state") or {}).get("train_iterator") or {}
        hist = ck.get("optimizer_history") or [{}]
        state = TrainState(
            num_updates=int(hist[-1].get("num_updates", 0)),
            epoch=int(it.get("epoch", 1)),
            iterations_in_epoch=int(it.get("iterations_in_epoch", 0)),
        )
        weights = state_dict_from_fairseq(ck["model"], model.cfg)
        return Restored(path, weights, fairseq_optimizer_state(ck, model), state, None)
    a = ModelConfig.from_dict(ck["config"]["model"]).as_built().to_dict()
    b = model.cfg.as_built().to_dict()
    changed = [f"{k} {a[k]!r} -> {b[k]!r}" for k in RUNTIME_SETTINGS if a.get(k) != b.get(k)]
    diffs = [f"{k} {a[k]!r} vs {b[k]!r}" for k in a if a[k] != b[k] and k not in RUNTIME_SETTINGS]
    if diffs:
        raise UserError(
            f"{path}: its model differs from the flags given ({'; '.join(diffs[:4])}); use the same "
            f"model flags or another --save-dir"
        )
    syms = ck["dictionary"]["symbols"]
    if syms != dictionary.symbols:
        other = Dictionary()
        other.symbols = list(syms)
        raise UserError(f"{path}: its dictionary differs from the data's dict.txt ({dictionary.diff(other)})")
    ts = dict(ck["train_state"])
    if "good_steps" in ts and "scaler_iter" not in ts:  # checkpoints of the first format revision
        ts["scaler_iter"] = ts["scaler_last_rescale"] = 0
    return Restored(path, ck["model"], ck["optimizer"], TrainState.from_dict(ts), ck["rng"]["torch"], changed)


def check_vocabulary(cfg: Any, dictionary: Dictionary) -> None:
    """The checkpoint a run continues from (``--restore-file``, or ``--finetune-from-model`` in a fresh save dir)
    must have been trained with a dictionary of the data's size. Checked before the model is built from the flags:
    a size mismatch there was blamed on the cutoffs, on a weight's shape or on "vocab_size", which is no flag."""
    path, _ = restore_source(cfg)
    if path is None:
        return
    ck = safe_load(path, mmap=True, verify=False)  # a first look: restore() reads it again, verified
    if not isinstance(ck, dict) or not isinstance(ck.get("model"), dict):
        return  # restore() names what is wrong with it
    model = ck.get("config", {}).get("model", {}) if is_ours(ck) else {}
    vocab = model.get("vocab_size") if is_ours(ck) else stored_vocab_size(ck["model"])
    if vocab is not None and vocab != len(dictionary):
        raise UserError(
            f"{path}: its model was trained with a dictionary of {vocab:,} symbols, the data's dict.txt has "
            f"{len(dictionary):,}: binarise the text with the model's dictionary (adaptive-lm preprocess --srcdict "
            f"<its dict.txt>), or train from scratch in another --save-dir"
        )


def restore_source(cfg: Any) -> tuple[Path | None, bool]:
    """(the checkpoint a run continues from, whether it is ``--finetune-from-model``'s): ``--restore-file`` (by
    default checkpoint_last.pt in ``--save-dir``) if there is one, else the model to fine-tune from, else None."""
    path = resolve_restore(cfg.save_dir, cfg.restore_file)
    if path is not None or cfg.finetune_from_model is None:
        return path, False
    path = Path(cfg.finetune_from_model)
    if not path.is_file():
        raise UserError(f"--finetune-from-model {path}: not found")
    return path, True


def resolve_restore(save_dir: str, restore_file: str) -> Path | None:
    """fairseq: the default ``checkpoint_last.pt`` means "in --save-dir, if it exists"; other names are paths."""
    if restore_file == "checkpoint_last.pt":
        p = Path(save_dir) / "checkpoint_last.pt"
        if p.is_dir():  # found before training, not at the first save after it
            raise UserError(f"{p}: a folder where the run saves its checkpoint; move it away or use another --save-dir")
        return p if p.is_file() else None
    p = Path(restore_file)
    if not p.is_file() and (Path(save_dir) / restore_file).is_file():
        p = Path(save_dir) / restore_file
    if p.is_dir():
        raise UserError(
            f"--restore-file {restore_file}: a folder; name the checkpoint in it, e.g. {p / 'checkpoint_last.pt'}"
        )
    if not p.is_file():
        raise UserError(f"--restore-file {restore_file}: not found (also looked in {save_dir})")
    return p
