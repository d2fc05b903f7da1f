"""Trainer checks: ``train(TrainConfig(...))`` on the device in fp32 / bf16 / fp16 on a generated corpus (the loss
falls; fp16's skipped updates and final loss scale), 8 updates == 4 + resume, and ``compile=True`` against eager.
"""

from __future__ import annotations

import math
import shutil
from typing import Any

import torch

from adaptive_lm.check.context import (
    FAIL,
    NO_DROPOUT,
    PASS,
    SKIP,
    Ctx,
    Record,
    final_weights,
    fmt,
    losses_of,
    maxdiff,
    run_training,
    skip,
    verdict,
)

PRECISION_FLAGS: dict[str, dict[str, Any]] = {"fp32": {}, "bf16": {"bf16": True}, "fp16": {"fp16": True}}


def fp16_figures(ctx: Ctx, precision: str, hist: list[dict[str, Any]], log: str) -> dict[str, Any]:
    """fp16 only: how many updates the loss scaler skipped, the scale it ended at, its overflow lines."""
    ck = torch.load(ctx.work / f"train-{precision}" / "checkpoint_last.pt", weights_only=True, map_location="cpu")
    return dict(
        skipped_updates=sum(1 for h in hist if h.get("skipped")),
        final_loss_scale=ck["train_state"]["loss_scale"],
        overflow_lines=[x for x in log.splitlines() if "fp16 overflow" in x][:5],
    )


def training_record(ctx: Ctx, precision: str) -> Record:
    """A short run in ``precision``: PASS when every loss is finite and the last ones are 0.5 bits below the first."""
    save = ctx.work / f"train-{precision}"
    shutil.rmtree(save, ignore_errors=True)
    result, log, secs = run_training(ctx, ctx.small_cfg(save, **PRECISION_FLAGS[precision]))
    losses, hist = losses_of(result), result["history"]
    k = max(1, min(5, len(losses) // 4))
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    finite = all(math.isfinite(x) for x in losses) and len(losses) > 0
    figs = dict(device=ctx.where, updates=len(hist), first_losses=[round(x, 4) for x in losses[:k]],
                last_losses=[round(x, 4) for x in losses[-k:]], valid_losses=result["valid_losses"],
                seconds=round(secs, 1), s_per_update=round(secs / max(1, len(hist)), 3))  # fmt: skip
    summary = f"{ctx.where}: {len(hist)} updates, loss {first:.3f} -> {last:.3f} bits"
    if result["valid_losses"]:
        summary += f", valid {result['valid_losses'][-1]:.3f}"
    if precision == "fp16":
        figs.update(fp16_figures(ctx, precision, hist, log))
        summary += f", {figs['skipped_updates']} skipped, loss scale {figs['final_loss_scale']:g}"
    ok = finite and last < first - 0.5 and result["signal"] == 0
    note = (
        "" if ok else "non-finite loss" if not finite else f"loss did not fall by 0.5 bits ({first:.3f} -> {last:.3f})"
    )
    return Record(verdict(ok), summary, figs, note)


def check_train_fp32(ctx: Ctx) -> Record:
    return training_record(ctx, "fp32")


def check_train_bf16(ctx: Ctx) -> Record:
    return training_record(ctx, "bf16")


def check_train_fp16(ctx: Ctx) -> Record:
    return training_record(ctx, "fp16")


def resume_runs(ctx: Ctx, n: int) -> dict[str, tuple[dict[str, Any], dict[str, torch.Tensor]]]:
    """(result, final weights) of ``n`` updates straight, of ``n / 2`` + a resumed run to ``n``, and on CUDA of a
    second straight run (how far two identical CUDA runs drift apart)."""
    runs = {}
    for name in ("straight", "split", "straight2") if ctx.cuda else ("straight", "split"):
        save = ctx.work / f"resume-{name}"
        shutil.rmtree(save, ignore_errors=True)
        cfg = ctx.small_cfg(save, max_update=n, disable_validation=True)
        if name == "split":
            half = ctx.small_cfg(save, max_update=n, disable_validation=True, stop_after_updates=n // 2)
            first, _, _ = run_training(ctx, half)
            if first["num_updates"] != n // 2:
                raise RuntimeError(f"the first half stopped after {first['num_updates']} updates, not {n // 2}")
        runs[name] = (run_training(ctx, cfg)[0], final_weights(save))
    return runs


def check_resume(ctx: Ctx) -> Record:
    """8 updates straight == 4 updates, stop, the same config again (it resumes from checkpoint_last.pt)."""
    n = 8 if not ctx.quick else 4
    runs = resume_runs(ctx, n)
    (ra, wa), (rb, wb) = runs["straight"], runs["split"]
    diff = max(maxdiff(wa[k], wb[k]) for k in wa)
    bitwise = all(torch.equal(wa[k], wb[k]) for k in wa)
    la, lb = losses_of(ra)[n // 2 :], losses_of(rb)
    figs = dict(device=ctx.where, updates=n, max_abs_weight_diff=diff, bitwise=bitwise,
                loss_diff_after_resume=max(abs(x - y) for x, y in zip(la, lb)) if la and lb else None)  # fmt: skip
    note = ""
    ok = bitwise and rb["num_updates"] == n
    if ctx.cuda and not bitwise:  # CUDA's atomics (flash backward, embedding/index_add) vary run to run
        base = max(maxdiff(wa[k], runs["straight2"][1][k]) for k in wa)
        figs["straight_vs_straight_max_abs_diff"] = base
        ok = base > 0 and diff <= max(20 * base, 1e-6)
        note = (
            f"not bitwise; two straight runs also differ by {fmt(base)} (non-deterministic CUDA kernels)"
            if ok
            else f"resume differs by {fmt(diff)} while two straight runs differ by {fmt(base)}"
        )
    summary = f"{ctx.where}: {n} == {n // 2} + resume, max |dw| {fmt(diff)}, bitwise {bitwise}"
    return Record(verdict(ok), summary, figs, note)


def check_compile(ctx: Ctx) -> Record:
    """``compile=True`` against eager with dropout 0 (compiled code draws its own dropout masks): the same losses,
    and a fallback to eager is a SKIP that says why."""
    k = ctx.plan.compile_updates
    if not k:
        return skip("--quick: no compilation (a minute on a GPU, more on a CPU)")
    res, logs = {}, {}
    for name, extra in (("eager", {}), ("compiled", {"compile": True})):
        save = ctx.work / f"compile-{name}"
        shutil.rmtree(save, ignore_errors=True)
        cfg = ctx.small_cfg(
            save, model=NO_DROPOUT, stop_after_updates=k, no_save=True, disable_validation=True, **extra
        )
        r, logs[name], secs = run_training(ctx, cfg)
        res[name] = (losses_of(r), secs)
    fell_back = [x for x in logs["compiled"].splitlines() if "--compile failed" in x or "--compile unavailable" in x]
    (le, se), (lc, sc) = res["eager"], res["compiled"]
    diff = max(abs(a - b) for a, b in zip(le, lc)) if len(le) == len(lc) else float("inf")
    tol = 1e-3 if ctx.cuda else 1e-4
    figs = dict(device=ctx.where, updates=k, dropout=0, max_loss_diff=diff, tolerance=tol, eager_s=round(se, 1),
                compiled_s=round(sc, 1), fallback=fell_back[:2])  # fmt: skip
    summary = f"{ctx.where}: {k} updates, max |loss diff| {fmt(diff)} bits, {sc:.1f} s compiled vs {se:.1f} s eager"
    if diff > tol:
        return Record(FAIL, summary, figs, f"compiled losses differ from eager by {fmt(diff)} (> {tol:g})")
    if fell_back:
        return Record(SKIP, summary, figs, "torch.compile fell back to eager: " + fell_back[0][:160])
    return Record(PASS, summary, figs, "dropout 0: compiled code draws its own dropout masks (inductor RNG)")
