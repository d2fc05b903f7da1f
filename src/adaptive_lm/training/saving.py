"""A trainer's checkpoints: what one holds, when and under which names it is written, and continuing from one
(ours or fairseq's; ``checkpoint.py`` has the names, the reading and the optimizer-state mapping)."""

from __future__ import annotations

import os
import time
import zlib
from pathlib import Path
from typing import Any

import torch

from adaptive_lm.core.errors import UserError
from adaptive_lm.core.fairseq_format import load_into
from adaptive_lm.core.serialization import FORMAT, dictionary_payload
from adaptive_lm.training import checkpoint as ckpt
from adaptive_lm.training.distributed import all_gather_int_lists, all_gather_ints
from adaptive_lm.training.trainer import Trainer


def checkpoint_state(t: Trainer) -> dict[str, Any]:
    """Everything a resume needs, as CPU tensors and plain values."""
    t.state.__dict__.update(t.scaler.state())
    return {
        "format": FORMAT,
        "config": {
            "model": t.model_cfg.as_built().to_dict(),
            "train": t.cfg.to_dict(),
            "tokens_per_sample": t.cfg.tokens_per_sample,
        },
        "model": {k: v.detach().cpu() for k, v in t.model.state_dict().items()},
        "optimizer": ckpt.optimizer_to_plain(t.optimizer, t.model),
        "train_state": t.state.to_dict(),
        "rng": {"torch": torch.get_rng_state()},
        "dictionary": dictionary_payload(t.dictionary),
    }


def save(
    t: Trainer, end_of_epoch: bool, val_loss: float | None, prev_best: float | None, last_only: bool = False
) -> None:
    """fairseq's checkpoint names for this moment (rank 0 writes; one serialisation, hard links for the rest)."""
    cfg = t.cfg
    if cfg.no_save or t.rank != 0:
        return
    score, prev = val_loss, prev_best  # the metric's logged values (``checkpoint.metric_value``)
    names = ["checkpoint_last.pt"] if last_only else ckpt.checkpoint_names(cfg, t.state, end_of_epoch, score, prev)
    if not names:
        return
    t0 = time.time()
    Path(cfg.save_dir).mkdir(parents=True, exist_ok=True)
    paths = [os.path.join(cfg.save_dir, n) for n in names]
    critical, t.critical = t.critical, True
    try:
        ckpt.write_checkpoints(checkpoint_state(t), paths)
        ckpt.prune(cfg, end_of_epoch)
    finally:
        t.critical = critical
    t.log.info(
        f"saved checkpoint {paths[0]} (epoch {t.state.epoch} @ {t.state.num_updates} updates, "
        f"score {score if score is None else round(score, 3)}) in {time.time() - t0:.1f}s"
        + (f"; also {', '.join(names[1:])}" if len(names) > 1 else "")
    )


def restore(t: Trainer) -> None:
    """Continue from ``--restore-file`` (or ``--finetune-from-model`` in a fresh save dir), ours or fairseq's."""
    cfg = t.cfg
    check_same_run(t)
    path, finetune = ckpt.restore_source(cfg)
    if path is None:
        check_ranks_agree(t)
        return
    try:
        r = ckpt.read_restore(path, t.model, t.dictionary)
        load_into(t.model, r.weights, str(path))
    except UserError as e:  # a fairseq checkpoint's weights against a model of other flags
        if "has shape" not in str(e) and "weights do not match" not in str(e):
            raise
        raise UserError(
            f"{e}; the model is built from the flags given, as fairseq-train builds it, and then the weights are "
            f"loaded: give the model flags it was trained with (--arch and the sizes stored in its cfg)"
        ) from None
    if r.changed:
        t.log.info(f"note: continuing with {', '.join(r.changed)} (settings that shape no weight; fairseq-train takes "
                   f"them from its command line too)")  # fmt: skip
    if not (cfg.reset_optimizer or finetune) and r.optimizer is not None:
        ckpt.optimizer_from_plain(t.optimizer, t.model, r.optimizer)
        t.state.num_updates = r.state.num_updates
        if not cfg.reset_lr_scheduler:  # fairseq's fixed schedule restores its lr: that of the saved epoch
            t.schedule.step_begin_epoch(r.state.epoch)
    if not (cfg.reset_dataloader or finetune):
        t.state.epoch, t.state.iterations_in_epoch = r.state.epoch, r.state.iterations_in_epoch
        if not cfg.reset_optimizer:  # the decisions a signal skipped, for the very same update
            t.state.pending = r.state.pending
    within = 0 < r.state.iterations_in_epoch < len(t.batches)  # fairseq: meters of a checkpoint within an epoch
    t.state.meters = r.state.meters if within and not (cfg.reset_meters or finetune) else None
    if not (cfg.reset_meters or cfg.reset_optimizer or finetune):  # fairseq forgets the best with either
        best = r.state.best_val
        if best is not None and r.state.patience_best is None:  # written before stop 36: the loss in bits
            best = ckpt.metric_value(cfg, best)
        t.state.best_val, t.state.bad_valid = best, r.state.bad_valid
        t.state.patience_best = best if r.state.patience_best is None else r.state.patience_best
    if not finetune:  # fairseq's previous_training_time: restored whatever is reset
        t.state.train_seconds = r.state.train_seconds
    t.scaler.load(r.state.to_dict())
    if r.rng is not None and not finetune:
        torch.set_rng_state(r.rng)
    # fairseq: after loading, the lr follows the update count (a reset scheduler starts its warmup again)
    t.set_lr(t.schedule.lr_at(t.state.num_updates))
    if t.state.iterations_in_epoch >= len(t.batches) and t.state.pending < 0:  # the saved epoch had ended
        t.state.epoch += 1
        t.state.iterations_in_epoch = 0
    check_ranks_agree(t, str(path))
    t.log.info(
        f"{'fine-tuning from' if finetune else 'restored'} {path} (update {t.state.num_updates}, "
        f"epoch {t.state.epoch}, batch {t.state.iterations_in_epoch}/{len(t.batches)})"
    )


def _run_facts(t: Trainer) -> dict[str, int]:
    """What every process of a run must share: its data, dictionary, model size and number of steps per epoch."""
    valid = t.valid_batches
    schedule = repr((t.cfg.update_freq, t.cfg.update_freq_epochs, t.cfg.max_update, t.cfg.max_epoch, t.cfg.seed))
    return {
        "dictionary size": len(t.dictionary),
        "dictionary checksum": zlib.crc32("\n".join(t.dictionary.symbols).encode("utf-8")),
        "training blocks": len(t.train_data),
        "training tokens": int(t.train_data.sizes.sum()),
        "training batches": len(t.batches.batches),
        "validation batches": -1 if valid is None else len(valid.batches),
        "parameters": sum(p.numel() for p in t.params),
        "update schedule checksum": zlib.crc32(schedule.encode("utf-8")),
    }


def check_same_run(t: Trainer) -> None:
    """Every process must train on the same data with the same model and flags: otherwise the processes run
    different numbers of steps and their collectives mismatch (a hang, a crash in gloo, or silently wrong sums)."""
    if t.world == 1:
        return
    facts = _run_facts(t)
    seen = all_gather_int_lists(list(facts.values()), t.device)
    differ = [i for i, name in enumerate(facts) if len({s[i] for s in seen}) > 1]
    if differ:
        names = list(facts)
        what = "; ".join(f"{names[i]}: " + ", ".join(f"rank {r} {s[i]}" for r, s in enumerate(seen)) for i in differ)
        raise UserError(
            f"the processes do not run the same training ({what}): give every process the same data-bin folder "
            f"(dict.txt and splits) and the same flags"
        )


def check_ranks_agree(t: Trainer, source: str = "no checkpoint") -> None:
    """Every process must continue from the same update (a save dir that is not shared between nodes)."""
    counts = all_gather_ints(t.state.num_updates, t.device)
    if len(set(counts)) > 1:
        raise UserError(
            f"processes restored different updates ({', '.join(f'rank {i}: {c}' for i, c in enumerate(counts))}; "
            f"this rank read {source}): give every node the same --save-dir contents (a shared disk) or an "
            f"explicit --restore-file"
        )


# ---- one update ----
