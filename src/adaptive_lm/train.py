"""``adaptive-lm train``: fairseq-train's language-modelling loop, step for step (reference doc sections 4-7, 10).

One update = ``--update-freq`` micro-batches per rank: each loss is the *summed* adaptive loss, gradients
accumulate, then (all ranks) every gradient is summed across ranks (parameters without a gradient count as
zero: fairseq's legacy_ddp, so tails without targets on a rank neither hang nor error), multiplied by
1 / (total non-pad target tokens of the update), clipped on the total norm, and NAG steps with the lr the
cosine schedule gives for the number of updates done so far. Dropout is seeded with ``seed + updates``, so a
resumed run draws the same masks as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from . import checkpoint as ckpt_io
from .config import ModelConfig, make_config
from .data import EpochBatches, LMDataset, load_split
from .dictionary import Dictionary
from .errors import UserError
from .fairseq_io import load_into, state_dict_from_fairseq
from .kernels import prepare_for_compile
from .model import TransformerLM
from .optim import NAG, CosineSchedule, clip_grad_norm_

RECIPE_TOKENS_PER_UPDATE = 73_728  # 8 GPUs x update_freq 3 x 3072 tokens


@dataclass
class TrainConfig:
    data: str = ""
    save_dir: str = "checkpoints"
    arch: str = "transformer_lm"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    # optimisation
    max_update: int = 0
    max_epoch: int = 0
    lr: float = 0.25
    momentum: float = 0.99
    weight_decay: float = 0.0
    min_lr: float = 0.0
    stop_min_lr: float = -1.0
    warmup_updates: int = 0
    warmup_init_lr: float = -1.0
    lr_period_updates: float = -1
    t_mult: float = 1.0
    lr_shrink: float = 0.1
    clip_norm: float = 0.0
    update_freq: int = 1
    tail_ignore_quirk: bool = True
    # data
    max_tokens: int | None = None
    batch_size: int | None = None
    tokens_per_sample: int = 1024
    sample_break_mode: str = "none"
    seed: int = 1
    valid_subset: str = "valid"
    max_tokens_valid: int | None = None
    batch_size_valid: int | None = None
    required_batch_size_multiple: int = 8  # fairseq's; it also drops a last batch whose size is not a multiple
    skip_invalid_size_inputs_valid_test: bool = False
    # checkpoints
    save_interval: int = 1
    save_interval_updates: int = 0
    keep_last_epochs: int = -1
    keep_interval_updates: int = -1
    no_epoch_checkpoints: bool = False
    no_save: bool = False
    restore_file: str = "checkpoint_last.pt"
    reset_optimizer: bool = False
    reset_lr_scheduler: bool = False
    reset_dataloader: bool = False
    reset_meters: bool = False
    # validation / logging
    disable_validation: bool = False
    validate_interval: int = 1
    validate_interval_updates: int = 0
    patience: int = -1
    log_interval: int = 100
    log_format: str = "simple"
    tensorboard_logdir: str | None = None
    progress_bar: bool = True
    # hardware
    cpu: bool = False
    bf16: bool = False
    fp16: bool = False
    compile: bool = False
    num_workers: int = 0
    # stop after this many updates *in this process* (tests of resume / interruption), 0 = off
    stop_after_updates: int = 0

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


# ---- distributed helpers ---------------------------------------------------------------------------------
def setup_distributed(cpu: bool) -> tuple[int, int, torch.device]:
    """torchrun's environment -> (rank, world, device); gloo on CPU, NCCL on GPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and not cpu
    device = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return rank, world, device


class Logger:
    """Console lines on rank 0, a JSONL metrics file in the save dir, optional TensorBoard (lazy import)."""

    def __init__(self, cfg: TrainConfig, rank: int) -> None:
        self.rank, self.cfg = rank, cfg
        self.jsonl = None
        self.tb = None
        if rank == 0 and not cfg.no_save:
            Path(cfg.save_dir).mkdir(parents=True, exist_ok=True)
            self.jsonl = open(Path(cfg.save_dir) / "metrics.jsonl", "a")
        if rank == 0 and cfg.tensorboard_logdir:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(cfg.tensorboard_logdir)
            except ImportError:
                self.print("warning: --tensorboard-logdir needs `pip install adaptive-lm[tensorboard]`; skipping")

    def print(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, flush=True)

    def log(self, split: str, values: dict[str, Any], step: int) -> None:
        if self.rank != 0:
            return
        if self.cfg.log_format == "json":
            print(json.dumps({"split": split, **values}), flush=True)
        else:
            body = " | ".join(f"{k} {v:.6g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
            print(f"{split} | {body}", flush=True)
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"split": split, **values}) + "\n")
            self.jsonl.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{split}/{k}", v, step)


# ---- the trainer ---------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.rank, self.world, self.device = setup_distributed(cfg.cpu)
        self.log = Logger(cfg, self.rank)
        if cfg.bf16 and cfg.fp16:
            raise UserError("--bf16 and --fp16 are exclusive: pick one")
        self.amp_dtype = torch.bfloat16 if cfg.bf16 else torch.float16 if cfg.fp16 else None
        if cfg.fp16 and self.device.type == "cpu":
            self.log.print("warning: --fp16 on CPU is slow and poorly supported; --bf16 is the CPU choice")

        # ---- data ----
        data = Path(cfg.data)
        if not (data / "dict.txt").is_file():
            raise UserError(f"{data}: no dict.txt; run `adaptive-lm preprocess --destdir {data}` first")
        self.dictionary = Dictionary.load(data / "dict.txt")
        train_split = load_split(data, "train")
        self.train_data = LMDataset.from_split(train_split, cfg.tokens_per_sample, cfg.sample_break_mode)
        too_long = int((self.train_data.sizes > cfg.tokens_per_sample).sum())
        if too_long:
            raise UserError(
                f"{data}/train: {too_long} samples are longer than --tokens-per-sample {cfg.tokens_per_sample} "
                f"(break mode {cfg.sample_break_mode}); raise --tokens-per-sample or use --sample-break-mode none"
            )
        self.batches = EpochBatches(
            self.train_data,
            cfg.max_tokens,
            cfg.batch_size,
            cfg.seed,
            True,
            self.world,
            self.rank,
            cfg.required_batch_size_multiple,
        )
        self.valid_batches: EpochBatches | None = None
        if not cfg.disable_validation and not (data / f"{cfg.valid_subset}.idx").is_file():
            self.log.print(f"note: {data}/{cfg.valid_subset}.idx not found: training without validation")
        if not cfg.disable_validation and (data / f"{cfg.valid_subset}.idx").is_file():
            vds = LMDataset.from_split(load_split(data, cfg.valid_subset), cfg.tokens_per_sample, cfg.sample_break_mode)
            if cfg.skip_invalid_size_inputs_valid_test:
                keep = vds.sizes <= cfg.tokens_per_sample
                vds = LMDataset(vds.tokens, vds.spans[keep], vds.eos, vds.pad)
            self.valid_batches = EpochBatches(
                vds,
                cfg.max_tokens_valid or cfg.max_tokens,
                cfg.batch_size_valid or cfg.batch_size,
                cfg.seed,
                False,
                self.world,
                self.rank,
                cfg.required_batch_size_multiple,
            )

        # ---- model / optimiser / schedule ----
        torch.manual_seed(cfg.seed)
        overrides = dict(cfg.model_overrides)
        overrides.setdefault("max_target_positions", cfg.tokens_per_sample)
        self.model_cfg: ModelConfig = make_config(cfg.arch, len(self.dictionary), **overrides)
        self.model = TransformerLM(self.model_cfg).to(self.device)
        self.params = list(self.model.parameters())
        self.optimizer = NAG(self.params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        try:
            self.schedule = self._schedule()
        except ValueError as e:
            raise UserError(f"{e} (the recipe passes --max-update 286000)") from None
        self.forward_model: Any = self.model
        if cfg.compile:
            try:
                prepare_for_compile()
                self.forward_model = torch.compile(self.model, dynamic=True)
            except Exception as e:  # pragma: no cover - depends on the toolchain
                self.log.print(f"warning: --compile unavailable ({type(e).__name__}: {e}); running eagerly")
        self.loss_scale = 2.0**7 if cfg.fp16 else 1.0
        self.good_steps = 0

        # ---- state ----
        self.num_updates = 0
        self.epoch = 1
        self.iterations_in_epoch = 0
        self.best_val: float | None = None
        self.bad_valid = 0
        self.train_seconds = 0.0
        self.set_lr(self.schedule.lr_at(0))  # fairseq calls step_update(0) right after building
        self.stop_requested = False
        self.valid_history: list[float] = []  # every validation loss of this process (bits per token)

    # ---- lr ----
    def _schedule(self) -> CosineSchedule:
        cfg = self.cfg
        return CosineSchedule(
            max_lr=cfg.lr,
            min_lr=cfg.min_lr,
            warmup_updates=cfg.warmup_updates,
            warmup_init_lr=cfg.warmup_init_lr,
            period=cfg.lr_period_updates,
            t_mult=cfg.t_mult,
            lr_shrink=cfg.lr_shrink,
            max_update=cfg.max_update,
        )

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # ---- checkpoints ----
    def state(self) -> dict[str, Any]:
        return {
            "format": ckpt_io.FORMAT,
            "config": {
                "model": self.model_cfg.to_dict(),
                "train": self.cfg.to_dict(),
                "tokens_per_sample": self.cfg.tokens_per_sample,
            },
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": ckpt_io.optimizer_to_plain(self.optimizer, self.model),
            "train_state": {
                "num_updates": self.num_updates,
                "epoch": self.epoch,
                "iterations_in_epoch": self.iterations_in_epoch,
                "best_val": self.best_val,
                "bad_valid": self.bad_valid,
                "train_seconds": self.train_seconds,
                "loss_scale": self.loss_scale,
                "good_steps": self.good_steps,
            },
            "rng": {"torch": torch.get_rng_state()},
            "dictionary": {"symbols": list(self.dictionary.symbols), "counts": list(self.dictionary.count)},
        }

    def save(self, end_of_epoch: bool, val_loss: float | None) -> None:
        cfg = self.cfg
        if cfg.no_save or self.rank != 0:
            return
        Path(cfg.save_dir).mkdir(parents=True, exist_ok=True)
        names = []
        if end_of_epoch and not cfg.no_epoch_checkpoints and self.epoch % cfg.save_interval == 0:
            names.append(f"checkpoint{self.epoch}.pt")
        if not end_of_epoch and cfg.save_interval_updates > 0 and self.num_updates % cfg.save_interval_updates == 0:
            names.append(f"checkpoint_{self.epoch}_{self.num_updates}.pt")
        if val_loss is not None and (self.best_val is None or val_loss <= self.best_val):
            names.append("checkpoint_best.pt")
        names.append("checkpoint_last.pt")
        state = self.state()
        first = os.path.join(cfg.save_dir, names[0])
        ckpt_io.atomic_save(state, first)
        for n in names[1:]:
            ckpt_io.atomic_save(state, os.path.join(cfg.save_dir, n))
        ckpt_io.prune(cfg.save_dir, cfg.keep_interval_updates, cfg.keep_last_epochs)

    def restore(self) -> None:
        cfg = self.cfg
        path = ckpt_io.resolve_restore(cfg.save_dir, cfg.restore_file)
        if path is None:
            return
        ck = ckpt_io.load_checkpoint(path)
        if ckpt_io.is_ours(ck):
            stored = ModelConfig.from_dict(ck["config"]["model"])
            if stored != self.model_cfg:
                diffs = [f for f in stored.to_dict() if stored.to_dict()[f] != self.model_cfg.to_dict()[f]]
                raise UserError(
                    f"{path}: its model differs from the flags given ({', '.join(diffs)}); "
                    f"use the same model flags or another --save-dir"
                )
            syms = ck["dictionary"]["symbols"]
            if syms != self.dictionary.symbols:
                other = Dictionary()
                other.symbols = list(syms)
                raise UserError(f"{path}: dictionary differs from {cfg.data}/dict.txt ({self.dictionary.diff(other)})")
            load_into(self.model, ck["model"], str(path))
            opt_state = ck["optimizer"]
            ts = ck["train_state"]
            rng = ck["rng"]["torch"]
        else:  # a fairseq checkpoint
            if "model" not in ck:
                raise UserError(f"{path}: not a checkpoint")
            load_into(self.model, state_dict_from_fairseq(ck["model"], self.model_cfg), str(path))
            opt_state = ckpt_io.fairseq_optimizer_state(ck, self.model)
            it = ck.get("extra_state", {}).get("train_iterator", {})
            hist = ck.get("optimizer_history") or [{}]
            ts = {
                "num_updates": hist[-1].get("num_updates", 0),
                "epoch": it.get("epoch", 1),
                "iterations_in_epoch": it.get("iterations_in_epoch", 0),
                "best_val": None,
            }
            rng = None
        if not cfg.reset_optimizer and opt_state is not None:
            ckpt_io.optimizer_from_plain(self.optimizer, self.model, opt_state)
            self.num_updates = int(ts["num_updates"])
        if not cfg.reset_dataloader:
            self.epoch = int(ts["epoch"])
            self.iterations_in_epoch = int(ts["iterations_in_epoch"])
        if not cfg.reset_meters:
            self.best_val = ts.get("best_val")
            self.bad_valid = int(ts.get("bad_valid", 0))
            self.train_seconds = float(ts.get("train_seconds", 0.0))
        self.loss_scale = float(ts.get("loss_scale", self.loss_scale))
        self.good_steps = int(ts.get("good_steps", 0))
        if rng is not None:
            torch.set_rng_state(rng)
        # fairseq: after loading, the lr follows the update count (a reset scheduler starts its warmup again)
        for g in self.optimizer.param_groups:
            g["lr"] = self.schedule.lr_at(self.num_updates)
        if self.iterations_in_epoch >= len(self.batches):  # the saved epoch had ended
            self.epoch += 1
            self.iterations_in_epoch = 0
        self.log.print(
            f"restored {path} (update {self.num_updates}, epoch {self.epoch}, "
            f"batch {self.iterations_in_epoch}/{len(self.batches)})"
        )

    # ---- one update ----
    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_step(self, samples: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        self.model.train()
        torch.manual_seed(self.cfg.seed + self.num_updates)  # fairseq's per-update seed
        self.optimizer.zero_grad()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)  # summed on the device: no sync here
        ntokens = 0
        for s in samples:
            if s["ntokens"] == 0:
                continue
            src, tgt = s["src_tokens"].to(self.device), s["target"].to(self.device)
            with self.autocast():
                x = self.features(src)
                loss = self.model.loss_from_features(x, tgt, self.cfg.tail_ignore_quirk)
            (loss * self.loss_scale).backward() if self.loss_scale != 1.0 else loss.backward()
            loss_sum += loss.detach().double()
            ntokens += s["ntokens"]
        stats = torch.stack([loss_sum, loss_sum.new_tensor(float(ntokens))])  # on the device (NCCL needs that)
        if self.world > 1:
            self.all_reduce_grads()
            dist.all_reduce(stats)
        total_loss, total_tokens = stats.tolist()  # one host sync per update (and one for the gradient norm)
        scale = 1.0 / (total_tokens or 1.0) / self.loss_scale
        for p in self.params:
            if p.grad is not None:
                p.grad.mul_(scale)
        gnorm = clip_grad_norm_(self.params, self.cfg.clip_norm)
        gnorm_f = float(gnorm)
        if not math.isfinite(gnorm_f):
            if self.cfg.fp16:  # dynamic loss scaling: skip the update, lower the scale
                self.loss_scale /= 2
                self.good_steps = 0
                self.log.print(
                    f"fp16 overflow at update {self.num_updates + 1}: skipping it, loss scale -> {self.loss_scale:g}"
                )
                return {"loss": float("nan"), "ntokens": total_tokens, "gnorm": gnorm_f, "skipped": 1.0}
            raise FloatingPointError(f"non-finite gradient norm at update {self.num_updates + 1}")
        self.optimizer.step()
        if self.cfg.fp16:
            self.good_steps += 1
            if self.good_steps % 2000 == 0:
                self.loss_scale *= 2
        self.num_updates += 1
        self.set_lr(self.schedule.lr_at(self.num_updates))
        return {
            "loss": total_loss / (total_tokens or 1.0) / math.log(2),
            "ntokens": total_tokens,
            "gnorm": gnorm_f,
            "clipped": float(self.cfg.clip_norm > 0 and gnorm_f > self.cfg.clip_norm),
        }

    def features(self, src: torch.Tensor) -> torch.Tensor:
        """The compiled model if ``--compile`` works here; on the first failure, a warning and eager mode."""
        if self.forward_model is self.model:
            return self.model(src)
        rng = torch.get_rng_state()  # a failed attempt may have drawn dropout seeds: retry with the same ones
        try:
            return self.forward_model(src)
        except Exception as e:  # no C++ compiler, unsupported op, ...: never fatal
            torch.set_rng_state(rng)
            self.log.print(
                f"warning: --compile failed at run time ({type(e).__name__}: {str(e)[:200]}); continuing without it"
            )
            self.forward_model = self.model
            return self.model(src)

    def all_reduce_grads(self) -> None:
        """legacy_ddp: every parameter (a missing gradient is zero), packed into one flat buffer, summed."""
        grads = []
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad.reshape(-1))
        flat = torch.cat(grads)
        dist.all_reduce(flat)
        offset = 0
        for p in self.params:
            n = p.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n

    # ---- validation ----
    @torch.no_grad()
    def validate(self) -> float | None:
        if self.valid_batches is None:
            return None
        self.model.eval()
        stats = torch.zeros(3, dtype=torch.float64)  # loss sum (nats), tokens, batches
        for s in self.valid_batches.iterate(epoch=1):
            if s["ntokens"] == 0:
                continue
            src, tgt = s["src_tokens"].to(self.device), s["target"].to(self.device)
            with self.autocast():
                loss = self.model.loss(src, tgt, self.cfg.tail_ignore_quirk)
            stats += torch.tensor([float(loss), s["ntokens"], 1.0], dtype=torch.float64)
        if self.world > 1:
            stats = stats.to(self.device)  # NCCL reduces device tensors only
            dist.all_reduce(stats)
            stats = stats.cpu()
        val = float(stats[0] / max(stats[1], 1) / math.log(2))
        self.valid_history.append(val)
        self.log.log(
            "valid",
            {
                "epoch": self.epoch,
                "loss": round(val, 3),
                "ppl": round(2**val, 2),
                "num_updates": self.num_updates,
                "wpb": round(float(stats[1] / max(stats[2], 1))),  # per batch, as fairseq logs it
                "tokens": int(stats[1]),
            },
            self.num_updates,
        )
        return val

    # ---- the loop ----
    def should_stop_training(self) -> bool:
        cfg = self.cfg
        if self.stop_requested:
            return True
        if cfg.max_update and self.num_updates >= cfg.max_update:
            return True
        return bool(cfg.stop_after_updates and self.updates_this_run >= cfg.stop_after_updates)

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        self.restore()
        self.report_start()
        self.install_signal_handlers()
        self.updates_this_run = 0
        # Everything alive now (torch's modules, the model, the data) lives until the end: exempt it from the
        # cyclic garbage collector, whose full passes would otherwise walk it again and again during training.
        gc.freeze()
        last_val = None
        history: list[dict[str, Any]] = []
        while True:
            if cfg.max_epoch and self.epoch > cfg.max_epoch:
                break
            if self.should_stop_training():
                break
            end_of_epoch, val = self.run_epoch(history)
            last_val = val if val is not None else last_val
            if not end_of_epoch:
                break
            if self.lr <= cfg.stop_min_lr:
                self.log.print(f"stopping: lr {self.lr:g} <= --stop-min-lr {cfg.stop_min_lr:g}")
                break
            if cfg.patience > 0 and self.bad_valid >= cfg.patience:
                self.log.print(f"stopping: validation did not improve for {cfg.patience} validations (--patience)")
                break
            self.epoch += 1
            self.iterations_in_epoch = 0
        done_epochs = self.epoch - (1 if self.iterations_in_epoch == 0 else 0)
        self.log.print(
            f"done training: {self.num_updates} updates, {done_epochs} epoch(s) completed or begun, "
            f"{self.train_seconds:.1f}s in updates"
        )
        return {
            "num_updates": self.num_updates,
            "history": history,
            "valid_loss": last_val,
            "valid_losses": self.valid_history,
        }

    def run_epoch(self, history: list[dict[str, Any]]) -> tuple[bool, float | None]:
        cfg = self.cfg
        batches = self.batches.epoch_batches(self.epoch)
        n = len(batches)
        bar = None
        if cfg.progress_bar and self.rank == 0 and sys.stderr.isatty():
            from tqdm.auto import tqdm

            bar = tqdm(total=n, initial=self.iterations_in_epoch, desc=f"epoch {self.epoch:03d}", leave=False)
        acc: dict[str, float] = {"loss": 0.0, "ntokens": 0.0, "gnorm": 0.0, "clipped": 0.0, "n": 0}
        t_log = time.time()
        val = None
        while self.iterations_in_epoch < n:
            group = batches[self.iterations_in_epoch : self.iterations_in_epoch + cfg.update_freq]
            samples = [self.train_data.collate(b) for b in group]
            t0 = time.time()
            out = self.train_step(samples)
            self.train_seconds += time.time() - t0
            self.iterations_in_epoch += len(group)
            self.updates_this_run += 1
            if bar is not None:
                bar.update(len(group))
                bar.set_postfix(loss=f"{out['loss']:.3f}", lr=f"{self.lr:.3g}")
            if "skipped" not in out:
                acc["loss"] += out["loss"] * out["ntokens"]
                acc["ntokens"] += out["ntokens"]
                acc["gnorm"] += out["gnorm"]
                acc["clipped"] += out["clipped"]
                acc["n"] += 1
            history.append({"update": self.num_updates, **out, "lr": self.lr})
            if acc["n"] and (self.num_updates % cfg.log_interval == 0):
                dt = time.time() - t_log
                loss = acc["loss"] / max(acc["ntokens"], 1)
                self.log.log(
                    "train_inner",
                    {
                        "epoch": self.epoch,
                        "update": self.num_updates,
                        "loss": round(loss, 3),
                        "ppl": round(2**loss, 2),
                        "wps": round(acc["ntokens"] / dt),
                        "ups": round(acc["n"] / dt, 2),
                        "wpb": round(acc["ntokens"] / acc["n"]),
                        "lr": self.lr,
                        "gnorm": round(acc["gnorm"] / acc["n"], 3),
                        "clip": round(100 * acc["clipped"] / acc["n"], 1),
                        "wall": round(self.train_seconds),
                    },
                    self.num_updates,
                )
                acc = {k: 0.0 for k in acc}
                t_log = time.time()
            end_of_epoch = self.iterations_in_epoch >= n
            stop = self.should_stop_training()
            do_val = (cfg.validate_interval_updates > 0 and self.num_updates % cfg.validate_interval_updates == 0) or (
                (stop or end_of_epoch) and self.epoch % cfg.validate_interval == 0
            )
            do_save = (
                end_of_epoch
                or stop
                or (cfg.save_interval_updates > 0 and self.num_updates % cfg.save_interval_updates == 0)
            )
            if do_val and not end_of_epoch and not stop:
                val = self.validate()
                self.track(val)
            if end_of_epoch or stop:
                val = self.validate() if do_val else None
                self.track(val)
                self.save(end_of_epoch, val)
                if val is not None and (self.best_val is None or val < self.best_val):
                    self.best_val = val
                if bar is not None:
                    bar.close()
                return end_of_epoch and not stop, val
            if do_save:
                self.save(False, val)
        if bar is not None:
            bar.close()
        return True, val

    def track(self, val: float | None) -> None:
        if val is None:
            return
        if self.best_val is None or val < self.best_val:
            self.bad_valid = 0
        else:
            self.bad_valid += 1

    def report_start(self) -> None:
        cfg = self.cfg
        per_update = cfg.update_freq * self.world * (cfg.max_tokens or cfg.tokens_per_sample * (cfg.batch_size or 1))
        self.log.print(
            f"model {cfg.arch}: {self.model.num_parameters():,} parameters | vocab {len(self.dictionary)} | "
            f"{len(self.train_data)} training blocks of <= {cfg.tokens_per_sample} tokens | "
            f"{len(self.batches)} batches/epoch/rank | world {self.world} | device {self.device} | "
            f"dtype {self.amp_dtype or torch.float32}"
        )
        self.log.print(f"effective tokens per update: up to {per_update:,} (--max-tokens x --update-freq x processes)")
        if (
            self.model_cfg.decoder_layers == 16
            and self.model_cfg.decoder_embed_dim == 1024
            and per_update < RECIPE_TOKENS_PER_UPDATE
        ):
            need = math.ceil(RECIPE_TOKENS_PER_UPDATE / (per_update / cfg.update_freq))
            self.log.print(
                f"warning: the paper's recipe uses {RECIPE_TOKENS_PER_UPDATE:,} tokens per update; "
                f"with {self.world} process(es) pass --update-freq {need} to match it"
            )

    def install_signal_handlers(self) -> None:
        """SIGINT/SIGTERM: finish the current update, save, exit (a second signal stops at once)."""

        def handler(signum, frame):
            if self.stop_requested:
                raise KeyboardInterrupt
            self.stop_requested = True
            self.log.print(f"signal {signum}: finishing this update, then saving checkpoint_last.pt")

        with contextlib.suppress(ValueError):  # not in the main thread
            signal.signal(signal.SIGINT, handler)
            signal.signal(signal.SIGTERM, handler)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run training to completion (or interruption); returns per-update history and the last valid loss."""
    trainer = Trainer(cfg)
    try:
        result = trainer.run()
        if dist.is_initialized():
            dist.barrier()  # no rank tears the group down while another still talks to it (gloo aborts then)
        return result
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
