"""The self-check's runner: the list of checks, running a selection of them (an exception is that check's FAIL,
the others still run), and ``main``: one run from a ``CheckConfig`` to an ``Outcome`` (the records, the report
text, the JSON file written).

What "works on GPU" means, check by check (each a function returning one ``Record``):

1. env       torch / CUDA / cuDNN / NCCL versions, the GPU, flash / memory-efficient attention, bf16, the CPU.
2. kernels   ``causal_attention`` fp32 on the device = on the CPU (max |diff| <= 1e-5, forward and gradients);
             ``cross_entropy_sum`` value and gradient (also loss-scaled) = CPU within fp32 rounding (rel 1e-5);
             dropout: the same seed gives the same mask, another seed another one, the kept fraction is 1 - p.
3. model     a 2-layer wiki103-shaped model in fp64, device vs CPU: loss, target log-probs, every gradient (1e-10).
4. trainer   ``train(TrainConfig(...))`` in fp32 / bf16 / fp16: losses fall, fp16's skipped updates and loss
             scale; 8 updates == 4 + resume; ``compile=True`` vs eager losses (dropout 0).
5. distrib.  a world-1 group (NCCL on CUDA) through the gradient all-reduce and validation (subprocess); with >= 2
             GPUs a real ``torchrun --nproc_per_node=2`` run against one process with ``--update-freq 2``.
6. recipe    the seed recipe's model (V = 267,744, T = 3,072, bf16): tokens/s, MFU (against the measured matmul
             peak of the dtype that ran), peak memory; host syncs per micro-batch and update; the top CUDA kernels.
7. eval      evaluation, generation (with and without the cache) and n-best rescoring tokens/s; with ``--fixture``
             the fixture's fairseq-eval-lm perplexity (within 1e-3 bits).

Without CUDA (or with ``dry_run``) the same functions run on the CPU with ``adaptive_lm.core.kernels`` switched to
the plain kernels (what CUDA runs: ``F.scaled_dot_product_attention``, PyTorch dropout, no row padding, the
sync-free cross-entropy branch), at reduced sizes; whatever only a GPU can show (flash kernels, NCCL, host syncs,
GPU memory) is SKIP, with the reason.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from adaptive_lm.check import distributed, environment, inference, kernels, model, recipe, trainer
from adaptive_lm.check.config import CheckConfig
from adaptive_lm.check.context import FAIL, Ctx, Record
from adaptive_lm.check.report import json_report, text_report
from adaptive_lm.core.errors import UserError
from adaptive_lm.core.files import atomic_write_text

log = logging.getLogger("adaptive_lm.check")

CHECKS: list[tuple[str, str, Callable[[Ctx], Record]]] = [
    ("env", "env: machine", environment.check_machine),
    ("env", "env: GPU, attention kernels, bf16", environment.check_gpu_features),
    ("kernels", "kernels: attention fp32 (device vs CPU, fp64)", kernels.check_attention),
    ("kernels", "kernels: cross_entropy_sum value + grads", kernels.check_cross_entropy),
    ("kernels", "kernels: dropout reseeding + kept fraction", kernels.check_dropout),
    ("model", "model: 2 layers fp64, device vs CPU", model.check_model_fp64),
    ("trainer", "trainer: fp32", trainer.check_train_fp32),
    ("trainer", "trainer: bf16", trainer.check_train_bf16),
    ("trainer", "trainer: fp16 (loss scaling)", trainer.check_train_fp16),
    ("trainer", "trainer: 8 updates == 4 + resume", trainer.check_resume),
    ("trainer", "trainer: compile vs eager", trainer.check_compile),
    ("distributed", "distributed: world-1 group (subprocess)", distributed.check_world1_group),
    ("distributed", "distributed: 2 processes vs update-freq 2", distributed.check_two_processes),
    ("recipe", "recipe: tokens/s, MFU, memory", recipe.check_recipe_speed),
    ("recipe", "recipe: host syncs per step", recipe.check_recipe_syncs),
    ("recipe", "recipe: top kernels of one step", recipe.check_recipe_profile),
    ("eval", "eval: tokens/s with a context window", inference.check_eval),
    ("eval", "generate: tokens/s with/without cache", inference.check_generate),
    ("eval", "rescore: tokens/s (n-best scoring)", inference.check_score),
    ("eval", "fixture: fairseq eval-lm perplexity", inference.check_fixture),
]


@dataclass
class Outcome:
    """One finished run: its records, what it ran on, and where its JSON went."""

    records: list[Record]
    mode: str
    where: str
    seconds: float
    out: Path

    @property
    def exit_code(self) -> int:
        """1 if any check FAILed (a SKIP is not a failure: it says what this machine cannot show)."""
        return 1 if any(r.status == FAIL for r in self.records) else 0

    def text(self, width: int = 160) -> str:
        return text_report(self.records, self.mode, self.where, self.seconds, width)


def selected(only: set[str] | None) -> list[tuple[str, str, Callable[[Ctx], Record]]]:
    """The checks ``only`` names: whole groups, or any check whose name contains one of its other words."""
    groups = {c[0] for c in CHECKS}
    names = [o for o in only or () if o not in groups]
    unknown = [o for o in names if not any(o in c[1] for c in CHECKS)]
    if unknown:
        raise UserError(
            f"--only {','.join(sorted(only or ()))}: {unknown[0]!r} names no check; groups: "
            f"{', '.join(sorted(groups))} (or a word of a check's name)"
        )
    return [c for c in CHECKS if not only or c[0] in only or any(o in c[1] for o in names)]


def failure(e: Exception) -> Record:
    """An exception inside a check: that check's FAIL, with the message and the end of the traceback."""
    tb = traceback.format_exc().strip().splitlines()
    first = str(e).splitlines()[0][:150] if str(e) else ""
    return Record(FAIL, f"{type(e).__name__}: {first}", {"traceback": tb[-25:]}, f"{type(e).__name__}: {e}"[:500],
                  details=tb[-8:])  # fmt: skip


def run_checks(ctx: Ctx, only: set[str] | None) -> list[Record]:
    """Every selected check in order, each timed; one line per check to the ``adaptive_lm.check`` log."""
    chosen = selected(only)
    records = []
    for i, (group, name, fn) in enumerate(chosen, 1):
        t0 = time.perf_counter()
        try:
            rec = fn(ctx)
        except Exception as e:  # noqa: BLE001 - an exception is this check's FAIL, the others still run
            rec = failure(e)
        rec.name, rec.group, rec.seconds = name, group, time.perf_counter() - t0
        records.append(rec)
        log.info(f"[{i:2d}/{len(chosen)}] {rec.status}  {name}  ({rec.seconds:.1f} s)")
    return records


def output_path(cfg: CheckConfig, cuda: bool) -> Path:
    """The JSON file ``cfg.out`` names: itself, or in a folder ``gpu_check.json`` (``gpu_check_dry.json`` for a dry
    run, so that it never overwrites a GPU result). Checked before the checks run, not after minutes of them."""
    out = Path(cfg.out)
    if out.is_dir():
        out = out / ("gpu_check.json" if cuda else "gpu_check_dry.json")
    parent = out.absolute().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UserError(f"--out {cfg.out}: cannot write in {parent} (no such folder, or not writable)")
    return out


def main(cfg: CheckConfig) -> Outcome:
    """Run the checks ``cfg`` selects on this machine's GPU (or, in a dry run, its CPU with the GPU code path), write
    the JSON report and return the outcome. The work folder is removed at the end unless kept."""
    selected(cfg.selection())  # an --only naming no check fails here, before any work
    ctx = Ctx(cfg)
    why = "" if ctx.cuda else (" (--dry-run)" if cfg.dry_run and torch.cuda.is_available() else " (no CUDA device)")
    t0 = time.perf_counter()
    try:
        out = output_path(cfg, ctx.cuda)
        log.info(f"adaptive-lm GPU check: {ctx.mode} mode{why}, device {ctx.where}, work dir {ctx.work}")
        records = run_checks(ctx, cfg.selection())
    finally:
        if not ctx.keep:
            shutil.rmtree(ctx.work, ignore_errors=True)
    seconds = time.perf_counter() - t0
    doc = json_report(records, ctx.mode, ctx.where, seconds)
    atomic_write_text(out, json.dumps(doc, indent=2, default=str) + "\n")
    return Outcome(records, ctx.mode, ctx.where, seconds, out)
