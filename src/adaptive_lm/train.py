"""``adaptive-lm train``: fairseq-train's language-modelling loop, step for step (``fairseq_cli/train.py``,
``fairseq/trainer.py``, ``fairseq/criterions/adaptive_loss.py``).

One update = ``--update-freq`` micro-batches per process: each loss is the *summed* adaptive loss, gradients
accumulate, then every gradient is summed across processes (``distributed.GradReducer``: fairseq's legacy_ddp,
overlapped with the backward), multiplied by 1 / (non-pad target tokens of the whole update), clipped on the total
norm, and NAG steps with the lr the cosine schedule gives for the number of updates done so far. Dropout is
seeded with ``seed + updates``, so a resumed run draws the same masks as an uninterrupted one.

The loop (``train``) is flat and its decisions are named: ``should_validate``, ``should_save``, ``should_stop``
(fairseq's ``validate_and_save``). The ``Trainer`` holds what one update needs; checkpoints are ``checkpoint.py``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from .checkpoint import TrainState
from .config import NORMFORMER, ModelConfig, make_config
from .data import EpochBatches, LMDataset, load_split
from .dictionary import Dictionary
from .distributed import GradReducer, all_gather_ints, all_reduce_sum, setup_distributed
from .errors import UserError
from .evaluate import perplexity
from .fairseq_io import load_into
from .hardware import half_precision_notice
from .kernels import fast_linears, plain_kernels, prepare_for_compile
from .model import Routes, TransformerLM
from .optim import NAG, CosineSchedule, LossScaler, clip_grad_norm_
from .progress import Progress
from .train_config import TrainConfig

RECIPE_TOKENS_PER_UPDATE = 73_728  # 8 GPUs x update_freq 3 x 3072 tokens


class TrainingDiverged(UserError):
    """The loss or gradient stopped being finite (or exploded): training stops, the last checkpoint stays."""


class Logger:
    """Console lines on rank 0 (and ``--log-file``), a JSONL metrics file in the save dir, optional TensorBoard."""

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
                self.print("warning: --tensorboard-logdir needs `pip install adaptive-lm[tensorboard]`; skipping")

    def print(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, flush=True)
            if self.file is not None:
                self.file.write(msg + "\n")
                self.file.flush()

    def log(self, split: str, values: dict[str, Any], step: int) -> None:
        if self.rank != 0:
            return
        if self.cfg.log_format == "json":
            self.print(json.dumps({"split": split, **values}))
        elif self.cfg.log_format != "none":
            body = " | ".join(f"{k} {v:.6g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
            self.print(f"{split} | {body}")
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
    """Averages of the updates since the last log line (fairseq's train_inner) or since the epoch began."""

    def __init__(self) -> None:
        self.loss = self.ntokens = self.gnorm = self.clipped = 0.0
        self.n = 0
        self.t0 = time.time()

    def add(self, out: dict[str, float]) -> None:
        self.loss += out["loss"] * out["ntokens"]
        self.ntokens += out["ntokens"]
        self.gnorm += out["gnorm"]
        self.clipped += out["clipped"]
        self.n += 1

    def values(self, state: TrainState, lr: float) -> dict[str, Any]:
        dt = max(time.time() - self.t0, 1e-9)
        loss = self.loss / max(self.ntokens, 1)
        return {
            "epoch": state.epoch,
            "update": state.num_updates,
            "loss": round(loss, 3),
            "ppl": round(perplexity(loss), 2),
            "wps": round(self.ntokens / dt),
            "ups": round(self.n / dt, 2),
            "wpb": round(self.ntokens / max(self.n, 1)),
            "lr": lr,
            "gnorm": round(self.gnorm / max(self.n, 1), 3),
            "clip": round(100 * self.clipped / max(self.n, 1), 1),
            "wall": round(state.train_seconds),
        }


# ---- model ---------------------------------------------------------------------------------------------------
def model_config(cfg: TrainConfig, vocab_size: int) -> ModelConfig:
    """The model ``fairseq-train --arch ARCH <model flags>`` builds: the preset filled by the flags, with
    ``max_target_positions`` defaulting to ``--tokens-per-sample`` (fairseq's ``build_model``), and NormFormer's
    ``--scale-*`` flags without effect, as in fairseq 0.12 (see ``config.NORMFORMER``)."""
    overrides = dict(cfg.model_overrides)
    overrides.setdefault("max_target_positions", cfg.tokens_per_sample)
    for k in NORMFORMER:
        overrides.pop(k, None)
    return make_config(cfg.arch, vocab_size, **overrides)


def ignored_flags(cfg: TrainConfig) -> str | None:
    """The notice for flags fairseq-train 0.12 accepts and ignores (the model is built without them, as there)."""
    given = [k for k in NORMFORMER if cfg.model_overrides.get(k)]
    if not given:
        return None
    flags = ", ".join("--" + k.replace("_", "-") for k in given)
    return (
        f"note: fairseq 0.12 ignores {flags} for transformer_lm models (its TransformerConfig drops NormFormer's "
        f"options), so fairseq-train builds no NormFormer layers; built the same way here (the Python API's "
        f"build_model(..., scale_attn=True) has them)"
    )


def build_model(model_cfg: ModelConfig, dictionary: Dictionary, seed: int) -> TransformerLM:
    """fairseq-train seeds torch, then builds the model: with the same draws in the same order, the same weights."""
    torch.manual_seed(seed)
    return TransformerLM(model_cfg, dictionary.symbols)


# ---- data ----------------------------------------------------------------------------------------------------
def load_datasets(cfg: TrainConfig, world: int, rank: int, add_bos: bool, log: Logger):
    """The dictionary, the training split's batches and (unless disabled or absent) the validation batches."""
    data = Path(cfg.data)
    if not (data / "dict.txt").is_file():
        raise UserError(f"{data}: no dict.txt; run `adaptive-lm preprocess --destdir {data}` first")
    dictionary = Dictionary.load(data / "dict.txt")
    train_split = load_split(data, cfg.train_subset, vocab_size=len(dictionary))
    train_data = LMDataset.from_split(train_split, cfg.tokens_per_sample, cfg.sample_break_mode, add_bos=add_bos)
    too_long = int((train_data.sizes > cfg.tokens_per_sample).sum())
    if too_long:
        raise UserError(
            f"{data}/{cfg.train_subset}: {too_long} samples are longer than --tokens-per-sample "
            f"{cfg.tokens_per_sample} (break mode {cfg.sample_break_mode}); raise --tokens-per-sample or use "
            f"--sample-break-mode none"
        )
    batches = EpochBatches(
        train_data, cfg.max_tokens, cfg.batch_size, cfg.seed, True, world, rank, cfg.required_batch_size_multiple
    )
    if len(batches) == 0:
        raise UserError(
            f"{data}/{cfg.train_subset}: no training batch (too little data for --max-tokens "
            f"{cfg.max_tokens} and --required-batch-size-multiple {cfg.required_batch_size_multiple})"
        )
    valid = None
    has_valid = (data / f"{cfg.valid_subset}.idx").is_file()
    if not cfg.disable_validation and not has_valid:
        log.print(f"note: {data}/{cfg.valid_subset}.idx not found: training without validation")
    if not cfg.disable_validation and has_valid:
        split = load_split(data, cfg.valid_subset, vocab_size=len(dictionary))
        vds = LMDataset.from_split(split, cfg.tokens_per_sample, cfg.sample_break_mode, add_bos=add_bos)
        if cfg.skip_invalid_size_inputs_valid_test:
            vds = vds.subset(vds.sizes <= cfg.tokens_per_sample)
        valid = EpochBatches(
            vds,
            cfg.max_tokens_valid or cfg.max_tokens,
            cfg.batch_size_valid or cfg.batch_size,
            cfg.seed,
            False,
            world,
            rank,
            cfg.required_batch_size_multiple,
        )
    return dictionary, train_data, batches, valid


class Prefetcher:
    """Collates the next update's batches in a background thread (pinned memory and a non-blocking copy on CUDA)
    while the current update runs; on CPU it collates in line (a second thread only competes for the cores).
    With ``routes_for`` (the GPU path) it also finds each adaptive band's rows on the CPU (``model.Routes``), so
    the device never has to report them back to the host."""

    def __init__(self, data: LMDataset, groups: list[list], device: torch.device, background: bool,
                 routes_for: ModelConfig | None = None) -> None:  # fmt: skip
        self.data, self.groups, self.device = data, groups, device
        self.background, self.routes_for = background, routes_for
        self._next: Any = None
        self._thread: threading.Thread | None = None

    def _prepare(self, group: list) -> list[dict[str, Any]]:
        out = []
        for b in group:
            s = self.data.collate(b)
            if self.routes_for is not None and s["ntokens"]:
                s["routes"] = Routes(s["src_tokens"], s["target"], self.routes_for)
            if self.device.type == "cuda":
                for k in ("src_tokens", "target"):
                    s[k] = s[k].pin_memory().to(self.device, non_blocking=True)
                if "routes" in s:
                    s["routes"].to(self.device, non_blocking=True)
            out.append(s)
        return out

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        if not self.background:
            yield from (self._prepare(g) for g in self.groups)
            return
        box: dict[int, Any] = {}

        def work(i: int) -> None:
            box[i] = self._prepare(self.groups[i])

        t: threading.Thread | None = None
        for i in range(len(self.groups)):
            if t is None:
                work(i)
            else:
                t.join()
            t = None
            if i + 1 < len(self.groups):
                t = threading.Thread(target=work, args=(i + 1,), daemon=True)
                t.start()
            yield box.pop(i)
        if t is not None:
            t.join()


# ---- the trainer -------------------------------------------------------------------------------------------
class Trainer:
    """Data, model, optimizer, schedule and the update step, built from a TrainConfig. ``train()`` runs the loop."""

    def __init__(self, cfg: TrainConfig) -> None:
        cfg.check()
        self.cfg = cfg
        self.rank, self.world, self.device = setup_distributed(cfg.cpu)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = cfg.tf32  # fp32 matmuls on tensor cores (8x), see --no-tf32
            torch.backends.cudnn.allow_tf32 = cfg.tf32
        self.log = Logger(cfg, self.rank)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.half or "")
        if self.amp_dtype is not None and self.device.type == "cpu":
            note = half_precision_notice(self.amp_dtype)
            if note:
                self.log.print(note)
        add_bos = bool(cfg.model_overrides.get("add_bos_token", False))
        self.dictionary, self.train_data, self.batches, self.valid_batches = load_datasets(
            cfg, self.world, self.rank, add_bos, self.log
        )
        self.model_cfg: ModelConfig = model_config(cfg, len(self.dictionary))
        note = ignored_flags(cfg)
        if note:
            self.log.print(note)
        self.model = build_model(self.model_cfg, self.dictionary, cfg.seed).to(self.device)
        self.params = list(self.model.parameters())
        self.optimizer = NAG(self.params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.schedule = CosineSchedule(
            max_lr=cfg.lr,
            min_lr=cfg.min_lr,
            warmup_updates=cfg.warmup_updates,
            warmup_init_lr=cfg.warmup_init_lr,
            period=cfg.lr_period_updates,
            t_mult=cfg.t_mult,
            lr_shrink=cfg.lr_shrink,
            max_update=cfg.max_update,
        )
        window = cfg.fp16_scale_window or int(2**14 / self.world / cfg.update_freq)
        self.scaler = LossScaler(cfg.half == "fp16", cfg.fp16_init_scale, window, cfg.min_loss_scale)
        self.reducer = GradReducer(self.params) if self.world > 1 else None
        self.forward_model: Any = self.model
        if cfg.compile:
            try:
                prepare_for_compile()
                import torch._inductor.config as inductor

                inductor.fallback_random = True  # dropout draws as in eager mode: compiling changes no mask
                self.forward_model = torch.compile(self.model, dynamic=True)
            except Exception as e:  # pragma: no cover - depends on the toolchain
                self.log.print(f"warning: --compile unavailable ({type(e).__name__}: {e}); running eagerly")
        self.state = TrainState(loss_scale=self.scaler.scale)
        self.set_lr(self.schedule.lr_at(0))  # fairseq calls step_update(0) right after building
        self.stop_requested = 0  # the signal that asked this process to stop, 0 if none
        self.stop_agreed = 0  # the signal any process got, as of the last update's all-reduce
        self.critical = False  # between the optimizer step and the bookkeeping, or writing a checkpoint
        self.valid_history: list[float] = []  # every validation loss of this process (bits per token)

    @property
    def stopping(self) -> int:
        """The signal to stop for, 0 if none: alone, as soon as it arrives; with other processes, only once the
        update's all-reduce told every one of them (so all stop after the same update and none waits forever)."""
        return self.stop_agreed if self.world > 1 else self.stop_requested

    # ---- lr ----
    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # ---- checkpoints ----
    def checkpoint_state(self) -> dict[str, Any]:
        """Everything a resume needs, as CPU tensors and plain values."""
        self.state.__dict__.update(self.scaler.state())
        return {
            "format": ckpt.FORMAT,
            "config": {
                "model": self.model_cfg.as_built().to_dict(),
                "train": self.cfg.to_dict(),
                "tokens_per_sample": self.cfg.tokens_per_sample,
            },
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": ckpt.optimizer_to_plain(self.optimizer, self.model),
            "train_state": self.state.to_dict(),
            "rng": {"torch": torch.get_rng_state()},
            "dictionary": {"symbols": list(self.dictionary.symbols), "counts": list(self.dictionary.count)},
        }

    def save(
        self, end_of_epoch: bool, val_loss: float | None, prev_best: float | None, last_only: bool = False
    ) -> None:
        """fairseq's checkpoint names for this moment (rank 0 writes; one serialisation, hard links for the rest)."""
        cfg = self.cfg
        if cfg.no_save or self.rank != 0:
            return
        metric = perplexity if cfg.best_checkpoint_metric == "ppl" else (lambda v: v)  # same order as the loss
        score, prev = (metric(v) if v is not None else None for v in (val_loss, prev_best))
        names = (
            ["checkpoint_last.pt"] if last_only else ckpt.checkpoint_names(cfg, self.state, end_of_epoch, score, prev)
        )
        if not names:
            return
        t0 = time.time()
        Path(cfg.save_dir).mkdir(parents=True, exist_ok=True)
        paths = [os.path.join(cfg.save_dir, n) for n in names]
        critical, self.critical = self.critical, True
        try:
            ckpt.write_checkpoints(self.checkpoint_state(), paths)
            ckpt.prune(cfg, end_of_epoch)
        finally:
            self.critical = critical
        self.log.print(
            f"saved checkpoint {paths[0]} (epoch {self.state.epoch} @ {self.state.num_updates} updates, "
            f"score {score if score is None else round(score, 3)}) in {time.time() - t0:.1f}s"
            + (f"; also {', '.join(names[1:])}" if len(names) > 1 else "")
        )

    def restore(self) -> None:
        """Continue from ``--restore-file`` (or ``--finetune-from-model`` in a fresh save dir), ours or fairseq's."""
        cfg = self.cfg
        path = ckpt.resolve_restore(cfg.save_dir, cfg.restore_file)
        finetune = path is None and cfg.finetune_from_model is not None
        if finetune:
            path = Path(cfg.finetune_from_model)  # type: ignore[arg-type]
            if not path.is_file():
                raise UserError(f"--finetune-from-model {path}: not found")
        if path is None:
            self._check_ranks_agree()
            return
        r = ckpt.read_restore(path, self.model, self.dictionary)
        load_into(self.model, r.weights, str(path))
        if not (cfg.reset_optimizer or finetune) and r.optimizer is not None:
            ckpt.optimizer_from_plain(self.optimizer, self.model, r.optimizer)
            self.state.num_updates = r.state.num_updates
        if not (cfg.reset_dataloader or finetune):
            self.state.epoch, self.state.iterations_in_epoch = r.state.epoch, r.state.iterations_in_epoch
        if not (cfg.reset_meters or finetune):
            self.state.best_val, self.state.bad_valid = r.state.best_val, r.state.bad_valid
            self.state.train_seconds = r.state.train_seconds
        self.scaler.load(r.state.to_dict())
        if r.rng is not None and not finetune:
            torch.set_rng_state(r.rng)
        # fairseq: after loading, the lr follows the update count (a reset scheduler starts its warmup again)
        self.set_lr(self.schedule.lr_at(self.state.num_updates))
        if self.state.iterations_in_epoch >= len(self.batches):  # the saved epoch had ended
            self.state.epoch += 1
            self.state.iterations_in_epoch = 0
        self._check_ranks_agree(str(path))
        self.log.print(
            f"{'fine-tuning from' if finetune else 'restored'} {path} (update {self.state.num_updates}, "
            f"epoch {self.state.epoch}, batch {self.state.iterations_in_epoch}/{len(self.batches)})"
        )

    def _check_ranks_agree(self, source: str = "no checkpoint") -> None:
        """Every process must continue from the same update (a save dir that is not shared between nodes)."""
        counts = all_gather_ints(self.state.num_updates, self.device)
        if len(set(counts)) > 1:
            raise UserError(
                f"processes restored different updates ({', '.join(f'rank {i}: {c}' for i, c in enumerate(counts))}; "
                f"this rank read {source}): give every node the same --save-dir contents (a shared disk) or an "
                f"explicit --restore-file"
            )

    # ---- one update ----
    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def kernel_choice(self):
        """``--kernels plain``: PyTorch's kernels for this call (no process-wide setting left behind); else ours,
        with fp32 CPU linears on oneDNN (not under --compile, which traces the model's own ops)."""
        if self.cfg.kernels == "plain":
            return plain_kernels(True)
        return contextlib.nullcontext() if self.cfg.compile else fast_linears(self.device)

    def train_step(self, samples: list[dict[str, Any]]) -> dict[str, float]:
        """One update from this process's micro-batches; every process calls it the same number of times."""
        with self.kernel_choice():
            return self._train_step(samples)

    def _train_step(self, samples: list[dict[str, Any]]) -> dict[str, float]:
        self.model.train()
        rng = _rng_state(self.device)
        try:
            loss_sum, ntokens = self._accumulate(samples)
        except Exception as e:
            if self.forward_model is self.model:
                raise
            # --compile failed in the forward or the backward: redo the whole update eagerly, same random numbers
            self.log.print(f"warning: --compile failed ({type(e).__name__}: {str(e)[:200]}); continuing without it")
            self.forward_model = self.model
            _set_rng_state(rng, self.device)
            loss_sum, ntokens = self._accumulate(samples)
        # built by fills, not copies from the host: a host-to-device copy of a Python number is a sync on CUDA;
        # the stop request travels as counts of SIGINT and SIGTERM, so every process learns which signal it was
        sig = self.stop_requested
        flags = (ntokens, sig == signal.SIGINT, sig == signal.SIGTERM)
        stats = torch.stack([loss_sum, *(loss_sum.new_full((), float(v)) for v in flags)])  # device (NCCL)
        if self.reducer is not None:
            self.reducer.finish()
        stats = all_reduce_sum(stats)
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:  # sum -> mean over the update's tokens, and the fp16 loss scale undone, on the device
            torch._foreach_mul_(grads, (stats[1].clamp(min=1).reciprocal() / self.scaler.scale).float())
        gnorm_t = clip_grad_norm_(self.params, self.cfg.clip_norm)
        # the one host sync of the update: statistics, stop flag and gradient norm together
        total_loss, total_tokens, n_int, n_term, gnorm = torch.cat([stats, gnorm_t.double().reshape(1)]).tolist()
        self.stop_agreed = int(signal.SIGTERM if n_term else signal.SIGINT if n_int else 0)
        loss = total_loss / (total_tokens or 1.0) / math.log(2)
        if not math.isfinite(gnorm) and self.scaler.enabled:  # fp16: skip the update, lower the scale
            self.scaler.overflow()
            self.log.print(
                f"fp16 overflow at update {self.state.num_updates + 1}: skipping it, loss scale -> "
                f"{self.scaler.scale:g}"
            )
            return {"loss": float("nan"), "ntokens": total_tokens, "gnorm": gnorm, "skipped": 1.0}
        self._check_divergence(loss, gnorm)
        self.critical = True  # until Run.update has counted this update: a second signal must not split the two
        self.optimizer.step()
        self.scaler.step_ok()
        self.state.num_updates += 1
        self.set_lr(self.schedule.lr_at(self.state.num_updates))
        return {
            "loss": loss,
            "ntokens": total_tokens,
            "gnorm": gnorm,
            "clipped": float(self.cfg.clip_norm > 0 and gnorm > self.cfg.clip_norm),
        }

    def _accumulate(self, samples: list[dict[str, Any]]) -> tuple[torch.Tensor, int]:
        """Forward and backward of every micro-batch (the gradient all-reduce armed for the last one)."""
        torch.manual_seed(self.cfg.seed + self.state.num_updates)  # fairseq's per-update seed
        self.optimizer.zero_grad()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)  # summed on the device: no sync
        ntokens = 0
        for j, s in enumerate(samples):
            if self.reducer is not None and j == len(samples) - 1:
                self.reducer.arm()
            if s["ntokens"] == 0:
                continue
            src = s["src_tokens"].to(self.device, non_blocking=True)
            tgt = s["target"].to(self.device, non_blocking=True)
            routes = s.get("routes")
            with self.autocast():
                x = self.forward_model(src, routes=routes) if routes is not None else self.forward_model(src)
                loss = self.model.loss_from_features(x, tgt, self.cfg.tail_ignore_quirk, routes)
            (loss * self.scaler.scale).backward() if self.scaler.enabled else loss.backward()
            loss_sum += loss.detach().double()
            ntokens += s["ntokens"]
        return loss_sum, ntokens

    def _check_divergence(self, loss: float, gnorm: float) -> None:
        """A non-finite loss or gradient, or a loss far above a uniform guess, stops training before the update."""
        uniform = math.log2(len(self.dictionary))
        if math.isfinite(loss) and math.isfinite(gnorm) and loss <= 3 * uniform + 10:
            return
        last = Path(self.cfg.save_dir) / "checkpoint_last.pt"
        keep = (
            f"the last good checkpoint is {last}"
            if last.is_file() and not self.cfg.no_save
            else "no checkpoint was saved yet"
        )
        raise TrainingDiverged(
            f"training diverged at update {self.state.num_updates + 1}: loss {loss:.4g} bits/token, gradient norm "
            f"{gnorm:.4g} (a uniform guess costs {uniform:.1f}); try a lower --lr (now {self.lr:.3g}), more "
            f"--warmup-updates or a --clip-norm; {keep} (not overwritten)"
        )

    # ---- validation ----
    @torch.no_grad()
    def validate(self) -> float | None:
        if self.valid_batches is None:
            return None
        with self.kernel_choice():
            return self._validate()

    def _validate(self) -> float | None:
        self.model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)  # nats, summed on the device
        tokens = batches = 0
        n = len(self.valid_batches)
        if self.cfg.max_valid_steps:
            n = min(n, self.cfg.max_valid_steps)
        with Progress(n, f"valid on '{self.cfg.valid_subset}'", self.cfg.progress_bar and self.rank == 0) as bar:
            for s in self.valid_batches.iterate(epoch=1, stop=n):
                if self.world == 1 and self.stop_requested:  # a signal: abandon it, the checkpoint comes first
                    self.log.print("validation abandoned (signal); saving checkpoint_last.pt")
                    return None
                bar.update(1)
                if s["ntokens"] == 0:
                    continue
                src, tgt = s["src_tokens"].to(self.device), s["target"].to(self.device)
                with self.autocast():
                    loss = self.model.loss(src, tgt, self.cfg.tail_ignore_quirk)
                loss_sum += loss.detach().double()
                tokens, batches = tokens + s["ntokens"], batches + 1
        stats = torch.stack([loss_sum, loss_sum.new_full((), float(tokens)), loss_sum.new_full((), float(batches))])
        loss_sum, tokens, batches = all_reduce_sum(stats).tolist()
        val = loss_sum / max(tokens, 1) / math.log(2)
        self.valid_history.append(val)
        best = val if self.state.best_val is None else min(val, self.state.best_val)
        self.log.log(
            "valid",
            {
                "epoch": self.state.epoch,
                "loss": round(val, 3),
                "ppl": round(perplexity(val), 2),
                "num_updates": self.state.num_updates,
                "best_loss": round(best, 3),
                "wpb": round(tokens / max(batches, 1)),  # per batch, as fairseq logs it
                "tokens": int(tokens),
            },
            self.state.num_updates,
        )
        return val

    def report_start(self) -> None:
        cfg, m = self.cfg, self.model_cfg
        per_update = cfg.update_freq * self.world * (cfg.max_tokens or cfg.tokens_per_sample * (cfg.batch_size or 1))
        ln = "pre-LN" if m.decoder_normalize_before else "post-LN"
        self.log.print(
            f"model {cfg.arch} ({ln}): {self.model.num_parameters():,} parameters | vocab {len(self.dictionary)} | "
            f"{len(self.train_data)} training blocks of <= {cfg.tokens_per_sample} tokens | "
            f"{len(self.batches)} batches/epoch/rank | world {self.world} | device {self.device} | "
            f"dtype {self.amp_dtype or torch.float32}"
        )
        self.log.print(f"effective tokens per update: up to {per_update:,} (--max-tokens x --update-freq x processes)")
        if m.decoder_layers == 16 and m.decoder_embed_dim == 1024 and per_update < RECIPE_TOKENS_PER_UPDATE:
            need = math.ceil(RECIPE_TOKENS_PER_UPDATE / (per_update / cfg.update_freq))
            self.log.print(
                f"warning: the paper's recipe uses {RECIPE_TOKENS_PER_UPDATE:,} tokens per update; "
                f"with {self.world} process(es) pass --update-freq {need} to match it"
            )


def _rng_state(device: torch.device) -> tuple[torch.Tensor, Any]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state: tuple[torch.Tensor, Any], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


# ---- the loop ------------------------------------------------------------------------------------------------
class Stop(Exception):
    """A second signal during an update: abandon it and save what the last finished update left."""


class Run:
    """``train()``'s state across epochs: the trainer, the log meters, the signal handling and the decisions."""

    def __init__(self, trainer: Trainer) -> None:
        self.t, self.cfg = trainer, trainer.cfg
        self.history: list[dict[str, Any]] = []
        self.updates_this_run = 0
        self.last_val: float | None = None
        self.patience_out = False

    # ---- decisions (fairseq_cli/train.py::validate_and_save) ----
    def should_stop(self) -> bool:
        cfg, s = self.cfg, self.t.state
        return bool(
            self.t.stopping
            or (cfg.max_update and s.num_updates >= cfg.max_update)
            or (cfg.stop_time_hours > 0 and s.train_seconds / 3600 > cfg.stop_time_hours)
            or (cfg.stop_after_updates and self.updates_this_run >= cfg.stop_after_updates)
        )

    def should_save(self, end_of_epoch: bool, stop: bool) -> bool:
        cfg, s = self.cfg, self.t.state
        return (
            (end_of_epoch and s.epoch % cfg.save_interval == 0)
            or stop
            or (
                cfg.save_interval_updates > 0
                and s.num_updates % cfg.save_interval_updates == 0
                and s.num_updates >= cfg.validate_after_updates
            )
        )

    def should_validate(self, end_of_epoch: bool, stop: bool, save: bool) -> bool:
        cfg, s = self.cfg, self.t.state
        if cfg.disable_validation or s.num_updates < cfg.validate_after_updates or self.t.stopping:
            return False
        return (
            (not end_of_epoch and save)
            or (end_of_epoch and s.epoch % cfg.validate_interval == 0)
            or stop
            or (cfg.validate_interval_updates > 0 and s.num_updates % cfg.validate_interval_updates == 0)
        )

    # ---- steps ----
    def epoch(self) -> bool:
        """Train the rest of the current epoch; True when it ended and training goes on."""
        t, s = self.t, self.t.state
        batches = t.batches.epoch_batches(s.epoch)
        uf = self.cfg.update_freq
        groups = [batches[i : i + uf] for i in range(s.iterations_in_epoch, len(batches), uf)]
        meter, epoch_meter = Meter(), Meter()
        bar = Progress(
            len(batches),
            f"epoch {s.epoch:03d}",
            self.cfg.progress_bar and t.rank == 0,
            initial=s.iterations_in_epoch,
            unit="batches",
        )
        with bar:
            gpu_path = t.device.type != "cpu" or self.cfg.kernels == "plain"
            routes = (
                t.model_cfg
                if gpu_path and (t.model_cfg.adaptive_input or t.model_cfg.adaptive_softmax_cutoff)
                else None
            )
            loader = Prefetcher(t.train_data, groups, t.device, t.device.type == "cuda", routes)
            for group, samples in zip(groups, loader):
                out = self.update(samples, len(group))
                if "skipped" not in out:
                    meter.add(out)
                    epoch_meter.add(out)
                bar.update(len(group), loss=f"{out['loss']:.3f}", lr=f"{t.lr:.3g}")
                if meter.n and s.num_updates % self.cfg.log_interval == 0:
                    t.log.log("train_inner", meter.values(s, t.lr), s.num_updates)
                    meter = Meter()
                end_of_epoch = s.iterations_in_epoch >= len(batches)
                stop = self.should_stop()
                self.validate_and_save(end_of_epoch, stop)
                if t.stopping and not stop:  # signalled during validation or saving (alone: no one to wait for)
                    t.save(end_of_epoch, None, s.best_val, last_only=True)
                    stop = True
                if end_of_epoch or stop or self.patience_out:
                    if end_of_epoch and epoch_meter.n:
                        t.log.log("train", {**epoch_meter.values(s, t.lr), "end_of_epoch": s.epoch}, s.num_updates)
                    return end_of_epoch and not stop
        return True

    def update(self, samples: list[dict[str, Any]], n_batches: int) -> dict[str, float]:
        t = self.t
        t0 = time.time()
        out = t.train_step(samples)
        t.state.train_seconds += time.time() - t0
        t.state.iterations_in_epoch += n_batches
        t.critical = False  # the update is complete and counted
        self.updates_this_run += 1
        self.history.append({"update": t.state.num_updates, **out, "lr": t.lr})
        return out

    def validate_and_save(self, end_of_epoch: bool, stop: bool) -> None:
        t, s = self.t, self.t.state
        if t.stopping:  # a signal: save first, validate never (a scheduler's grace period is short)
            t.save(end_of_epoch, None, s.best_val, last_only=True)
            return
        save = self.should_save(end_of_epoch, stop)
        val = t.validate() if self.should_validate(end_of_epoch, stop, save) else None
        prev_best = s.best_val
        if val is not None:
            self.last_val = val
            better = max if self.cfg.maximize_best_checkpoint_metric else min
            improved = prev_best is None or (val != prev_best and better(val, prev_best) == val)
            s.bad_valid = 0 if improved else s.bad_valid + 1
            s.best_val = val if prev_best is None else better(val, prev_best)
            if self.cfg.patience > 0 and s.bad_valid >= self.cfg.patience:
                t.log.print(f"stopping: validation did not improve for {self.cfg.patience} validations (--patience)")
                self.patience_out = True
        if save or self.patience_out:
            t.save(end_of_epoch, val, prev_best)

    def install_signal_handlers(self) -> None:
        """SIGINT/SIGTERM: finish (or, on a second signal, abandon) this update, save checkpoint_last.pt, exit 130/143.
        In a multi-process run the request travels with the update's statistics, so all processes stop together."""

        def handler(signum, frame):
            t = self.t
            if t.stop_requested and t.world == 1 and not t.critical:
                raise Stop()
            if not t.stop_requested:
                t.stop_requested = signum
                t.log.print(f"signal {signum}: finishing this update, then saving checkpoint_last.pt (no validation)")

        with contextlib.suppress(ValueError):  # not in the main thread
            self.previous_handlers = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

    def restore_signal_handlers(self) -> None:
        with contextlib.suppress(ValueError):
            for s, h in getattr(self, "previous_handlers", {}).items():
                signal.signal(s, h)


def train(cfg: TrainConfig, on_start: Callable[[Trainer], None] | None = None) -> dict[str, Any]:
    """Run training to completion, a stop condition or a signal. Returns the per-update history, the validation
    losses and ``signal`` (the number of the signal that stopped it, 0 if none). ``on_start(trainer)`` runs after
    the restore, before the first update (experiments and tests: e.g. perturbing the weights)."""
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32  # Trainer sets them on CUDA
    trainer = Trainer(cfg)
    lock = ckpt.SaveDirLock(cfg.save_dir) if trainer.rank == 0 and not cfg.no_save else None
    run = Run(trainer)
    try:
        if lock is not None:
            lock.acquire()
            if lock.notice:
                trainer.log.print(lock.notice)
        with plain_kernels(True) if cfg.kernels == "plain" else contextlib.nullcontext():
            trainer.restore()
            if on_start is not None:
                on_start(trainer)
            trainer.report_start()
            run.install_signal_handlers()
            # Everything alive now (torch's modules, the model, the data) lives until the end: exempt it from the
            # cyclic garbage collector, whose full passes would otherwise walk it again and again during training.
            gc.freeze()
            _loop(run)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # no rank tears the group down while another still talks to it
    finally:
        run.restore_signal_handlers()
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        if lock is not None:
            lock.release()
        if trainer.reducer is not None:
            trainer.reducer.remove()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    s = trainer.state
    signum = trainer.stopping
    done_epochs = s.epoch - (1 if s.iterations_in_epoch == 0 else 0)
    if signum:
        where = "" if cfg.no_save else f"; saved {Path(cfg.save_dir) / 'checkpoint_last.pt'}, the same command resumes"
        trainer.log.print(f"stopped by signal {signum} after update {s.num_updates}{where}")
    else:
        trainer.log.print(
            f"done training: {s.num_updates} updates, {done_epochs} epoch(s) completed or begun, "
            f"{s.train_seconds:.1f}s in updates"
        )
    return {
        "num_updates": s.num_updates,
        "history": run.history,
        "valid_loss": run.last_val,
        "valid_losses": trainer.valid_history,
        "signal": signum,
    }


def _loop(run: Run) -> None:
    t, cfg = run.t, run.cfg
    try:
        while not (cfg.max_epoch and t.state.epoch > cfg.max_epoch) and not run.should_stop():
            if not run.epoch() or run.patience_out:
                break
            if t.lr <= cfg.stop_min_lr:
                t.log.print(f"stopping: lr {t.lr:g} <= --stop-min-lr {cfg.stop_min_lr:g}")
                break
            t.state.epoch += 1
            t.state.iterations_in_epoch = 0
    except Stop:  # a second signal in the middle of an update: the state is that of the last finished one
        t.optimizer.zero_grad()
        t.save(False, None, t.state.best_val, last_only=True)
