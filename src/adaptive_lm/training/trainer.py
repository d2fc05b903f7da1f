"""One update of fairseq-train's language-modelling loop, step for step (``fairseq/trainer.py``,
``fairseq/criterions/adaptive_loss.py``): the ``Trainer`` builds the data, the model, NAG, the cosine schedule and
the loss scaler from a ``TrainConfig``, and runs an update.

One update = ``--update-freq`` micro-batches per process: each loss is the *summed* adaptive loss, gradients
accumulate, then every gradient is summed across processes (``distributed.GradReducer``: fairseq's legacy_ddp,
overlapped with the backward), multiplied by 1 / (non-pad target tokens of the whole update), clipped on the total
norm, and NAG steps with the lr the cosine schedule gives for the number of updates done so far. Dropout is
seeded with ``seed + updates``, so a resumed run draws the same masks as an uninterrupted one.

The loop and its decisions are ``loop.py``; checkpoints ``saving.py``; validation ``validation.py``.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adaptive_lm.core.config import NORMFORMER, ModelConfig, min_parameters
from adaptive_lm.core.dictionary import Dictionary
from adaptive_lm.core.errors import UserError
from adaptive_lm.core.hardware import half_precision_notice, total_memory
from adaptive_lm.core.kernels import fast_linears, plain_kernels, prepare_for_compile
from adaptive_lm.core.model import TransformerLM
from adaptive_lm.core.optim import NAG, CosineSchedule, FixedSchedule, LossScaler, clip_grad_norm_
from adaptive_lm.core.presets import make_config
from adaptive_lm.training.checkpoint import TrainState, check_vocabulary
from adaptive_lm.training.config import TrainConfig
from adaptive_lm.training.data import load_datasets
from adaptive_lm.training.distributed import GradReducer, all_reduce_sum, setup_distributed
from adaptive_lm.training.report import Reporter


class TrainingDiverged(UserError):
    """The loss or gradient stopped being finite (or exploded): training stops, the last checkpoint stays."""


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


def _half_note(cfg: TrainConfig, dtype: torch.dtype, log: Reporter) -> None:
    """The CPU's half-precision note, naming the flag given (--amp asks for fp16 too)."""
    flag = "--bf16" if cfg.bf16 else "--fp16" if cfg.fp16 else "--amp"
    note = half_precision_notice(dtype, flag=flag, work="train")
    if note:
        log.info(note)


def _check_positions(model_cfg: ModelConfig, sizes: np.ndarray, add_bos: bool) -> None:
    """No sample may be longer than the model's positions (fairseq-train skips such samples: refused here rather than
    trained on, which gave a model its own evaluation then refused). A learned position table must also hold the
    widest sample, ``<s>`` included: with ``--add-bos-token`` a full block
    is ``--tokens-per-sample`` + 1 positions, one more than the table fairseq sizes by ``--tokens-per-sample``
    (fairseq-train fails in its first forward with an IndexError; said here as one line before anything runs)."""
    if not len(sizes):
        return
    if int(sizes.max()) > model_cfg.max_target_positions:  # any kind of positions: fairseq filters by this size
        raise UserError(
            f"training samples of {int(sizes.max())} tokens are longer than the model's "
            f"{model_cfg.max_target_positions} positions (--max-target-positions): fairseq-train skips every longer "
            f"sample (and stops with 'The dataset is empty' when none is left); pass --max-target-positions "
            f"{int(sizes.max())} or more (or leave it out: it defaults to --tokens-per-sample)"
        )
    if not model_cfg.decoder_learned_pos or model_cfg.no_token_positional_embeddings:
        return
    widest = int(sizes.max()) + int(add_bos)
    if widest > model_cfg.max_target_positions:
        bos = " (the <s> of --add-bos-token included)" if add_bos else ""
        raise UserError(
            f"training samples of {widest} tokens{bos} do not fit the {model_cfg.max_target_positions} learned "
            f"positions (--decoder-learned-pos): pass --max-target-positions {widest} or more (fairseq-train fails "
            "here with an IndexError)"
        )


def _check_memory(model_cfg: ModelConfig, device: torch.device) -> None:
    """Refuse sizes whose fp32 weights, gradients and NAG momentum alone (a lower bound: no activations) exceed
    the device's whole memory, before building them."""
    have = total_memory(device)
    n = min_parameters(model_cfg)
    if have is None or 12 * n <= have:
        return
    where = "this GPU" if device.type == "cuda" else "this machine"
    raise UserError(
        f"--decoder-layers {model_cfg.num_layers}, --decoder-embed-dim {model_cfg.decoder_embed_dim} and "
        f"--decoder-ffn-embed-dim {model_cfg.decoder_ffn_embed_dim} make at least {n:,} parameters, whose fp32 "
        f"weights, gradients and momentum need {12 * n / 2**30:,.1f} GiB; {where} has {have / 2**30:,.1f} GiB in "
        "all: choose smaller sizes"
    )


def seeded_model(model_cfg: ModelConfig, dictionary: Dictionary, seed: int) -> TransformerLM:
    """fairseq-train seeds torch, then builds the model: with the same draws in the same order, the same weights."""
    torch.manual_seed(seed)
    return TransformerLM(model_cfg, dictionary.symbols)


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
        self.log = Reporter(cfg, self.rank)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.half or "")
        if self.amp_dtype is not None and self.device.type == "cpu":
            _half_note(cfg, self.amp_dtype, self.log)
        add_bos = bool(cfg.model_overrides.get("add_bos_token", False))
        self.dictionary, self.train_data, self.batches, self.valid_batches = load_datasets(
            cfg, self.world, self.rank, add_bos, self.log
        )
        check_vocabulary(cfg, self.dictionary)
        self.model_cfg: ModelConfig = model_config(cfg, len(self.dictionary))
        _check_positions(self.model_cfg, self.train_data.sizes, add_bos)
        _check_memory(self.model_cfg, self.device)
        note = ignored_flags(cfg)
        if note:
            self.log.info(note)
        self.model = seeded_model(self.model_cfg, self.dictionary, cfg.seed).to(self.device)
        self.params = list(self.model.parameters())
        self.optimizer = NAG(self.params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.schedule: CosineSchedule | FixedSchedule
        if cfg.lr_scheduler == "fixed":
            lrs = cfg.lr_epochs or (cfg.lr,)
            self.schedule = FixedSchedule(lrs, cfg.force_anneal, cfg.lr_shrink, cfg.warmup_updates)
        else:
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
                self.log.info(f"warning: --compile unavailable ({type(e).__name__}: {e}); running eagerly")
        self.state = TrainState(loss_scale=self.scaler.scale)
        self.set_lr(self.schedule.lr_at(0))  # fairseq calls step_update(0) right after building
        self.stop_requested = 0  # the signal that asked this process to stop, 0 if none
        self.stop_agreed = 0  # the signal any process got, as of the last update's all-reduce
        self.critical = False  # between the optimizer step and the bookkeeping, or writing a checkpoint
        self.valid_history: list[float] = []  # every validation loss of this process (bits per token)
        # fairseq's cumulative training time: the restored time plus this run's wall time, averaged over the
        # processes at every update (as fairseq does), so that all of them stop on --stop-time-hours together
        self.clock = (time.time(), 0.0)  # (this run's start, the time restored)
        self.elapsed = 0.0  # as of the last update, agreed by all processes

    def start_clock(self) -> None:
        """After the restore: from here on, wall time adds to the restored time (validation and saving included)."""
        self.clock = (time.time(), self.state.train_seconds)
        self.elapsed = self.state.train_seconds

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
            self.log.info(f"warning: --compile failed ({type(e).__name__}: {str(e)[:200]}); continuing without it")
            self.forward_model = self.model
            _set_rng_state(rng, self.device)
            loss_sum, ntokens = self._accumulate(samples)
        # built by fills, not copies from the host: a host-to-device copy of a Python number is a sync on CUDA;
        # the stop request travels as counts of SIGINT and SIGTERM, so every process learns which signal it was
        sig = self.stop_requested
        start, before = self.clock
        nsentences = sum(s["src_tokens"].shape[0] for s in samples if s["ntokens"])  # fairseq's bsz
        flags = (ntokens, sig == signal.SIGINT, sig == signal.SIGTERM, before + time.time() - start, nsentences)
        stats = torch.stack([loss_sum, *(loss_sum.new_full((), float(v)) for v in flags)])  # device (NCCL)
        if self.reducer is not None:
            self.reducer.finish()
        stats = all_reduce_sum(stats)
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:  # sum -> mean over the update's tokens, and the fp16 loss scale undone, on the device
            torch._foreach_mul_(grads, (stats[1].clamp(min=1).reciprocal() / self.scaler.scale).float())
        gnorm_t = clip_grad_norm_(self.params, self.cfg.clip_norm)
        # the one host sync of the update: statistics, stop flag and gradient norm together
        total_loss, total_tokens, n_int, n_term, seconds, total_sentences, gnorm = torch.cat(
            [stats, gnorm_t.double().reshape(1)]
        ).tolist()
        self.stop_agreed = int(signal.SIGTERM if n_term else signal.SIGINT if n_int else 0)
        self.elapsed = seconds / self.world
        loss = total_loss / (total_tokens or 1.0) / math.log(2)
        if not math.isfinite(gnorm) and self.scaler.enabled:  # fp16: skip the update, lower the scale
            self.scaler.overflow()
            self.log.info(
                f"fp16 overflow at update {self.state.num_updates + 1}: skipping it, loss scale -> "
                f"{self.scaler.scale:g}"
            )
            return {"loss": float("nan"), "ntokens": total_tokens, "gnorm": gnorm, "skipped": 1.0,
                    "nsentences": total_sentences}  # fmt: skip
        self._check_divergence(loss, gnorm)
        self.critical = True  # until Run.update has counted this update: a second signal must not split the two
        self.optimizer.step()
        self.scaler.step_ok()
        self.state.num_updates += 1
        self.set_lr(self.schedule.lr_at(self.state.num_updates))
        return {
            "loss": loss,
            "ntokens": total_tokens,
            "nsentences": total_sentences,
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


def _rng_state(device: torch.device) -> tuple[torch.Tensor, Any]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state: tuple[torch.Tensor, Any], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
