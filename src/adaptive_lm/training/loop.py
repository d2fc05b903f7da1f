"""``train()``: fairseq-train's loop (``fairseq_cli/train.py``), flat, with its decisions named: ``should_validate``,
``should_save``, ``should_stop`` (fairseq's ``validate_and_save``); signals save ``checkpoint_last.pt`` first."""

from __future__ import annotations

import contextlib
import gc
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from adaptive_lm.core.kernels import plain_kernels
from adaptive_lm.core.progress import Progress
from adaptive_lm.training import saving
from adaptive_lm.training.checkpoint import metric_value
from adaptive_lm.training.config import TrainConfig
from adaptive_lm.training.data import Prefetcher
from adaptive_lm.training.lock import SaveDirLock
from adaptive_lm.training.report import Meter, start_lines
from adaptive_lm.training.saving import restore
from adaptive_lm.training.trainer import Trainer
from adaptive_lm.training.validation import validate


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
        self.meter = Meter()  # train_inner: fairseq's aggregator outlives an epoch (updates since the last line)

    # ---- decisions (fairseq_cli/train.py::validate_and_save) ----
    def should_stop(self, clock: bool = True) -> bool:
        """fairseq's stop conditions after an update; ``clock=False`` before an epoch (fairseq checks the time only
        after updates: an epoch it starts has at least one)."""
        cfg, s = self.cfg, self.t.state
        return bool(
            self.t.stopping
            or (cfg.max_update and s.num_updates >= cfg.max_update)
            or (clock and cfg.stop_time_hours > 0 and self.t.elapsed / 3600 > cfg.stop_time_hours)  # all ranks agree
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
        t.schedule.step_begin_epoch(s.epoch)  # fairseq's lr_step_begin_epoch, also when resuming within an epoch
        t.set_lr(t.schedule.lr_at(s.num_updates))
        batches = t.batches.epoch_batches(s.epoch)
        uf = self.cfg.update_freq_at(s.epoch)
        groups = [batches[i : i + uf] for i in range(s.iterations_in_epoch, len(batches), uf)]
        saved = s.meters or {}  # a checkpoint within this epoch: its meters go on (once)
        s.meters = None
        self.meter = Meter(saved["inner"]) if "inner" in saved else self.meter
        epoch_meter = Meter(saved.get("epoch"))
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
                    self.meter.add(out)
                    epoch_meter.add(out)
                bar.update(len(group), loss=f"{out['loss']:.3f}", lr=f"{t.lr:.3g}")
                if self.meter.n and s.num_updates % self.cfg.log_interval == 0:
                    t.log.log("train_inner", self.meter.values(s, t.lr, self.cfg.clip_norm > 0), s.num_updates)
                    self.meter = Meter()
                end_of_epoch = s.iterations_in_epoch >= len(batches)
                # a checkpoint within the epoch carries the meters; one at its end starts the next epoch afresh
                s.meters = None if end_of_epoch else {"inner": self.meter.state(), "epoch": epoch_meter.state()}
                stop = self.should_stop()
                self.validate_and_save(end_of_epoch, stop)
                if t.stopping and not stop:  # signalled during validation or saving (alone: no one to wait for)
                    saving.save(t, end_of_epoch, None, s.best_val, last_only=True)
                    stop = True
                if end_of_epoch or stop or self.patience_out:
                    if epoch_meter.n and not t.stopping:  # fairseq prints the epoch's stats at a stop too
                        end = {"end_of_epoch": s.epoch} if end_of_epoch else {}
                        line = epoch_meter.values(s, t.lr, self.cfg.clip_norm > 0)
                        t.log.log("train", {**line, **end}, s.num_updates)
                    return end_of_epoch and not stop
        return True

    def update(self, samples: list[dict[str, Any]], n_batches: int) -> dict[str, float]:
        t = self.t
        out = t.train_step(samples)
        t.state.train_seconds = t.elapsed  # what a checkpoint carries on
        t.state.iterations_in_epoch += n_batches
        t.critical = False  # the update is complete and counted
        self.updates_this_run += 1
        self.history.append({"update": t.state.num_updates, **out, "lr": t.lr})
        return out

    def validate_and_save(self, end_of_epoch: bool, stop: bool) -> None:
        t, s = self.t, self.t.state
        if t.stopping:  # a signal: save first, validate never (a scheduler's grace period is short); the resumed
            s.pending = int(end_of_epoch)  # run validates and saves what this update was due (resume_pending)
            saving.save(t, end_of_epoch, None, s.best_val, last_only=True)
            return
        save = self.should_save(end_of_epoch, stop)
        validating = self.should_validate(end_of_epoch, stop, save)
        raw = validate(t) if validating else None
        if validating and raw is None and t.stopping:  # abandoned by a signal: the resumed run decides again
            s.pending = int(end_of_epoch)
            return
        val = metric_value(self.cfg, raw) if raw is not None else None  # what fairseq compares: the logged value
        maximize = self.cfg.maximize_best_checkpoint_metric
        if val is not None:
            self.last_val = raw
            pb = s.patience_best  # fairseq's should_stop_early: its own best, strict improvement, every validation
            if pb is None or (val > pb if maximize else val < pb):
                s.patience_best, s.bad_valid = val, 0
            else:
                s.bad_valid += 1
            if self.cfg.patience > 0 and s.bad_valid >= self.cfg.patience:
                t.log.info(f"stopping: validation did not improve for {self.cfg.patience} validations (--patience)")
                self.patience_out = True
        if save or self.patience_out:  # fairseq's save_checkpoint: the best moves only here
            prev_best = s.best_val
            if val is not None:
                s.best_val = val if prev_best is None else (max if maximize else min)(val, prev_best)
            saving.save(t, end_of_epoch, val, prev_best)

    def resume_pending(self) -> None:
        """A run stopped by a signal skipped the validation and checkpoints its last update was due: do them now,
        so that the validation losses, the best checkpoint, --patience and the epoch checkpoints are those of an
        uninterrupted run."""
        s = self.t.state
        if s.pending < 0:
            return
        end_of_epoch, s.pending = bool(s.pending), -1
        self.validate_and_save(end_of_epoch, self.should_stop())
        if end_of_epoch and s.pending < 0:
            s.epoch += 1
            s.iterations_in_epoch = 0

    def install_signal_handlers(self) -> None:
        """SIGINT/SIGTERM: finish (or, on a second signal, abandon) this update, save checkpoint_last.pt, exit 130/143.
        In a multi-process run the request travels with the update's statistics, so all processes stop together."""

        def handler(signum, frame):
            t = self.t
            if t.stop_requested and t.world == 1 and not t.critical:
                raise Stop()
            if not t.stop_requested:
                t.stop_requested = signum
                t.log.info(f"signal {signum}: finishing this update, then saving checkpoint_last.pt (no validation)")

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
    lock = SaveDirLock(cfg.save_dir) if trainer.rank == 0 and not cfg.no_save else None
    run = Run(trainer)
    try:
        if lock is not None:
            lock.acquire()
            if lock.notice:
                trainer.log.info(lock.notice)
        with plain_kernels(True) if cfg.kernels == "plain" else contextlib.nullcontext():
            restore(trainer)
            trainer.start_clock()
            if on_start is not None:
                on_start(trainer)
            for line in start_lines(trainer):
                trainer.log.info(line)
            run.install_signal_handlers()
            # Everything alive now (torch's modules, the model, the data) lives until the end: exempt it from the
            # cyclic garbage collector, whose full passes would otherwise walk it again and again during training.
            gc.freeze()
            run.resume_pending()
            if not (run.patience_out or trainer.stopping):
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
        trainer.log.info(f"stopped by signal {signum} after update {s.num_updates}{where}")
    else:
        trainer.log.info(
            f"done training: {s.num_updates} updates, {done_epochs} epoch(s) completed or begun, "
            f"{s.train_seconds:.1f}s of training"
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
        while not (cfg.max_epoch and t.state.epoch > cfg.max_epoch) and not run.should_stop(clock=False):
            # fairseq-train checks the lr before every epoch, the first of a resumed run included: a run stopped by
            # --stop-min-lr and started again stops at once (ours had trained one more epoch per restart)
            if t.lr <= cfg.stop_min_lr:
                t.log.info(f"stopping: lr {t.lr:g} <= --stop-min-lr {cfg.stop_min_lr:g}")
                break
            if not run.epoch() or run.patience_out:
                break
            t.state.epoch += 1
            t.state.iterations_in_epoch = 0
    except Stop:  # a second signal in the middle of an update: the state is that of the last finished one
        t.optimizer.zero_grad()
        saving.save(t, False, None, t.state.best_val, last_only=True)
