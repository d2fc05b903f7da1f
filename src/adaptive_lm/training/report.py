"""The trainer's voice: log lines, the metrics file, TensorBoard, the meters behind ``train_inner`` lines."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from adaptive_lm.core.metrics import perplexity
from adaptive_lm.training.checkpoint import TrainState
from adaptive_lm.training.config import TrainConfig

log = logging.getLogger("adaptive_lm.train")
RECIPE_TOKENS_PER_UPDATE = 73_728  # 8 GPUs x update_freq 3 x 3072 tokens


class Reporter:
    """Where the trainer's lines and metrics go: on rank 0 the ``adaptive_lm.train`` logger (the CLI shows it on
    stdout) and ``--log-file``, a JSONL metrics file in the save dir, optional TensorBoard. Other ranks say nothing."""

    def __init__(self, cfg: TrainConfig, rank: int) -> None:
        self.rank, self.cfg = rank, cfg
        self.jsonl = self.file = self.tb = None
        if rank == 0 and cfg.log_file:
            self.file = open(cfg.log_file, "a")
        if rank == 0 and cfg.tensorboard_logdir:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(cfg.tensorboard_logdir)
            except ImportError:
                self.info("warning: --tensorboard-logdir needs `pip install adaptive-lm[tensorboard]`; skipping")

    def info(self, msg: str) -> None:
        if self.rank == 0:
            log.info(msg)
            if self.file is not None:
                self.file.write(msg + "\n")
                self.file.flush()

    def log(self, split: str, values: dict[str, Any], step: int) -> None:
        if self.rank != 0:
            return
        if self.cfg.log_format == "json":
            self.info(json.dumps({"split": split, **values}))
        elif self.cfg.log_format != "none":
            body = " | ".join(f"{k} {v:.6g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
            self.info(f"{split} | {body}")
        if self.jsonl is None and not self.cfg.no_save:  # created with the first metrics, not before a bad start
            Path(self.cfg.save_dir).mkdir(parents=True, exist_ok=True)
            self.jsonl = open(Path(self.cfg.save_dir) / "metrics.jsonl", "a")
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"split": split, **values}) + "\n")
            self.jsonl.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{split}/{k}", v, step)


class Meter:
    """Averages of the updates since the last log line (fairseq's train_inner) or since the epoch began.

    A checkpoint within an epoch carries the sums (``state``), and the resumed run goes on from them, as fairseq's
    restored meters do: its next lines average the same updates as an uninterrupted run's. The speeds (wps, ups)
    count only this process's updates and time (fairseq resets its time meters on a restore)."""

    SUMS = ("loss", "ntokens", "nsentences", "gnorm", "clipped", "n")

    def __init__(self, sums: dict[str, float] | None = None) -> None:
        self.loss = self.ntokens = self.nsentences = self.gnorm = self.clipped = 0.0
        self.n = 0
        for k, v in (sums or {}).items():
            if k in self.SUMS:
                setattr(self, k, int(v) if k == "n" else float(v))
        self.speed_tokens, self.speed_n = 0.0, 0
        self.t0 = time.time()

    def state(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in self.SUMS}

    def add(self, out: dict[str, float]) -> None:
        self.loss += out["loss"] * out["ntokens"]
        self.ntokens += out["ntokens"]
        self.nsentences += out.get("nsentences", 0.0)
        self.gnorm += out["gnorm"]
        self.clipped += out["clipped"]
        self.n += 1
        self.speed_tokens += out["ntokens"]
        self.speed_n += 1

    def values(self, state: TrainState, lr: float, clip: bool = True) -> dict[str, Any]:
        """The logged line's values; ``clip`` False (no --clip-norm) leaves out the clip share, as fairseq does."""
        dt = max(time.time() - self.t0, 1e-9)
        loss = self.loss / max(self.ntokens, 1)
        out = {
            "epoch": state.epoch,
            "update": state.num_updates,
            "loss": round(loss, 3),
            "ppl": round(perplexity(loss), 2),
            "wps": round(self.speed_tokens / dt),
            "ups": round(self.speed_n / dt, 2),
            "wpb": round(self.ntokens / max(self.n, 1), 1),  # fairseq's round=1, per update
            "bsz": round(self.nsentences / max(self.n, 1), 1),
            "lr": lr,
            "gnorm": round(self.gnorm / max(self.n, 1), 3),
            "clip": round(100 * self.clipped / max(self.n, 1), 1),
            "wall": round(state.train_seconds),
        }
        if not clip:
            del out["clip"]
        return out


def start_lines(t: Any) -> list[str]:
    """What a run says before its first update: the model, the data, the tokens per update (and the recipe's)."""
    cfg, m = t.cfg, t.model_cfg
    per_update = cfg.update_freq * t.world * (cfg.max_tokens or cfg.tokens_per_sample * (cfg.batch_size or 1))
    ln = "pre-LN" if m.decoder_normalize_before else "post-LN"
    freqs = ",".join(map(str, cfg.update_freq_epochs))
    epoch_one = f" in epoch 1 (--update-freq {freqs}: one per epoch)" if len(cfg.update_freq_epochs) > 1 else ""
    lines = [
        f"model {cfg.arch} ({ln}): {t.model.num_parameters():,} parameters | vocab {len(t.dictionary)} | "
        f"{len(t.train_data)} training blocks of <= {cfg.tokens_per_sample} tokens | "
        f"{len(t.batches)} batches/epoch/rank | world {t.world} | device {t.device} | "
        f"dtype {t.amp_dtype or torch.float32}",
        f"effective tokens per update: up to {per_update:,} (--max-tokens x --update-freq x processes){epoch_one}",
    ]
    if not cfg.lr_scheduler_given:
        lines.append("note: no --lr-scheduler given: cosine (fairseq-train's default is fixed: --lr-scheduler fixed)")
    if m.decoder_layers == 16 and m.decoder_embed_dim == 1024 and per_update < RECIPE_TOKENS_PER_UPDATE:
        need = math.ceil(RECIPE_TOKENS_PER_UPDATE / (per_update / cfg.update_freq))
        lines.append(
            f"warning: the paper's recipe uses {RECIPE_TOKENS_PER_UPDATE:,} tokens per update; "
            f"with {t.world} process(es) pass --update-freq {need} to match it"
        )
    return lines
