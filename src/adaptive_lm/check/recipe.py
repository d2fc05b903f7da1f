"""Recipe checks on the seed recipe's model (``transformer_lm_wiki103``, V = 267,744, T = 3,072, bf16 on a GPU):
tokens/s, MFU and peak memory at update-freq 1 and 3; host syncs per micro-batch and per update
(``torch.cuda.set_sync_debug_mode``); the top kernels of one profiled step.

MFU here is honest by construction: the FLOPs the step executed (``FlopCounterMode``) per second, over the measured
matmul peak *of the dtype that ran* (a bf16 run against a bf16 matmul, an fp32 run against an fp32 one, with TF32
as the run had it). A measured peak below the achieved rate (a loaded machine, a small probe) is raised to the
achieved rate and the record says so: MFU never exceeds 100%.
"""

from __future__ import annotations

import contextlib
import io
import math
import resource
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adaptive_lm.check.context import NO_CUDA, SKIP, Ctx, Record, skip, tf32, verdict
from adaptive_lm.training.config import TrainConfig
from adaptive_lm.training.trainer import Trainer


@dataclass
class Peak:
    """The measured matmul rate of the dtype a run used: MFU's denominator (before ``mfu``'s floor)."""

    tflops: float
    dtype: str  # "bf16", "fp16", "fp32" or "tf32"
    source: str


def run_dtype(cfg: TrainConfig, cuda: bool) -> tuple[torch.dtype, str]:
    """The matmul dtype a training run executes: its autocast dtype, else fp32 (TF32 on CUDA unless --no-tf32)."""
    if cfg.bf16:
        return torch.bfloat16, "bf16"
    if cfg.fp16:
        return torch.float16, "fp16"
    return torch.float32, "tf32" if cuda and cfg.tf32 else "fp32"


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int, seconds: float) -> float:
    """TFLOP/s of back-to-back ``n``^3 matmuls in ``dtype`` for about ``seconds`` (TF32 as the caller set it)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    it, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        it += 1
        if device.type == "cuda" and it % 10 == 0:
            torch.cuda.synchronize()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * it / (time.perf_counter() - t0) / 1e12


def measured_peak(ctx: Ctx, cfg: TrainConfig) -> Peak:
    """The matmul peak of the run's own dtype on this device, measured now (8192^3 on a GPU, 1024^3 on a CPU)."""
    dtype, name = run_dtype(cfg, ctx.cuda)
    n, seconds = (8192, 2.0) if ctx.cuda else (1024, 1.0)
    with tf32(name == "tf32" if ctx.cuda else None):
        tflops = matmul_tflops(ctx.device, dtype, n, seconds)
    where = torch.cuda.get_device_name(0) if ctx.cuda else "this CPU"
    return Peak(tflops, name, f"measured {n}^3 {name} matmul on {where}")


def mfu(achieved_tflops: float, peak: Peak) -> tuple[float, bool]:
    """(MFU in percent, whether the peak was raised to the achieved rate): achieved / max(peak, achieved). The ratio
    first, then the percentage: 100 * a / a rounds to 100.00000000000001 for about 5% of floats a."""
    raised = achieved_tflops > peak.tflops
    return 100.0 * (achieved_tflops / max(peak.tflops, achieved_tflops)), raised


def timed_updates(ctx: Ctx, uf: int, flops_per_token: float, peak: Peak) -> tuple[dict[str, Any], list[float]]:
    """``recipe_updates`` timed updates of ``uf`` micro-batches after a warm-up: their figures and losses."""
    for _ in range(2 if ctx.cuda else 0 if ctx.quick else 1):  # warm-up (allocator, cuBLAS/flash plans)
        ctx.recipe_step(ctx.recipe_samples(uf))
    groups = [ctx.recipe_samples(uf) for _ in range(ctx.plan.recipe_updates)]
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats()
    ctx.sync()
    t0 = time.perf_counter()
    outs = [ctx.recipe_step(g) for g in groups]
    ctx.sync()
    secs = time.perf_counter() - t0
    tokens = sum(o["ntokens"] for o in outs)
    achieved = tokens / secs * flops_per_token / 1e12
    percent, raised = mfu(achieved, peak)
    figs = dict(updates=len(outs), tokens=tokens, seconds=round(secs, 3), tokens_per_s=round(tokens / secs),
                s_per_update=round(secs / len(outs), 4), achieved_tflops=achieved, mfu_percent=percent,
                peak_raised_to_achieved=raised,
                peak_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if ctx.cuda else None)  # fmt: skip
    return figs, [o["loss"] for o in outs]


def speed_note(peak: Peak, figs: dict[str, Any]) -> str:
    raised = [k for k in ("uf1", "uf3") if figs[k]["peak_raised_to_achieved"]]
    note = f"MFU against the {peak.source} ({peak.tflops:.3g} TFLOP/s), the dtype the run used"
    if raised:
        note += f"; {' and '.join(raised)} ran faster than that measured peak, which was raised to the achieved rate"
    return note + "; FLOPs counted by FlopCounterMode (attention as full T x T)"


def check_recipe_speed(ctx: Ctx) -> Record:
    from torch.utils.flop_counter import FlopCounterMode

    r = ctx.recipe()
    t: Trainer = r["trainer"]
    with tf32(None):
        with FlopCounterMode(display=False) as counter:  # one micro-batch, forward + backward + update
            out = ctx.recipe_step(ctx.recipe_samples(1))
        flops_per_token = counter.get_total_flops() / out["ntokens"]
        peak = measured_peak(ctx, r["cfg"])
        figs: dict[str, Any] = dict(device=ctx.where, vocab=len(t.dictionary), tokens_per_sample=ctx.plan.recipe_T,
                                    parameters=t.model.num_parameters(), dtype=peak.dtype,
                                    build_seconds=round(r["build_s"], 1), gflop_per_token=flops_per_token / 1e9,
                                    peak_tflops=peak.tflops, peak_source=peak.source)  # fmt: skip
        losses: list[float] = []
        for uf in (1, 3):
            figs[f"uf{uf}"], more = timed_updates(ctx, uf, flops_per_token, peak)
            losses += more
    if not ctx.cuda:
        figs["process_peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    finite = all(math.isfinite(x) for x in losses)
    u1, u3 = figs["uf1"], figs["uf3"]
    mem = f", peak {u1['peak_memory_gib']} / {u3['peak_memory_gib']} GiB" if ctx.cuda else ""
    summary = (
        f"{ctx.where} V={len(t.dictionary):,} T={ctx.plan.recipe_T} {peak.dtype}: {u1['tokens_per_s']:,} / "
        f"{u3['tokens_per_s']:,} tok/s (uf 1 / 3), MFU {u1['mfu_percent']:.3g}% / {u3['mfu_percent']:.3g}%{mem}"
    )
    return Record(verdict(finite), summary, figs, speed_note(peak, figs) if finite else "non-finite loss")


def count_syncs(ctx: Ctx, samples: list[dict[str, Any]]) -> tuple[int, Counter]:
    """Synchronising CUDA calls during one update, by Python source line (``set_sync_debug_mode("warn")``)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            ctx.recipe_step(samples)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    return len(syncs), Counter(f"{Path(w.filename).name}:{w.lineno}" for w in syncs)


def check_recipe_syncs(ctx: Ctx) -> Record:
    if not ctx.cuda:
        return skip(NO_CUDA + " (torch.cuda.set_sync_debug_mode)")
    with tf32(None):
        ctx.recipe_step(ctx.recipe_samples(1))  # warm
        n1, where1 = count_syncs(ctx, ctx.recipe_samples(1))
        n3, where3 = count_syncs(ctx, ctx.recipe_samples(3))
    per_micro = (n3 - n1) / 2
    per_update = n1 - per_micro
    figs = dict(update_freq_1=n1, update_freq_3=n3, per_micro_batch=per_micro, per_update=per_update,
                where_uf1=dict(where1), where_uf3=dict(where3))  # fmt: skip
    ok = per_micro == 0 and per_update <= 1
    summary = f"{per_micro:g} per micro-batch, {per_update:g} per update (uf1: {n1}, uf3: {n3})"
    details = [f"host syncs in one update with update-freq 3, by source line: {dict(where3)}"] if n3 else []
    return Record(verdict(ok), summary, figs, "" if ok else "goal: 0 per micro-batch, 1 per update", details)


def device_time(e: Any) -> float:
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(e, attr):
            return float(getattr(e, attr))
    return 0.0


def cpu_time(e: Any) -> float:
    return float(e.self_cpu_time_total)


def profiled_events(ctx: Ctx) -> tuple[list[Any], set[str], Any]:
    """(timed events: CUDA kernels, or CPU ops in a dry run; every op's name; the timing function) of one step."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    samples = ctx.recipe_samples(1)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.cuda else [])
    with tf32(None), contextlib.redirect_stdout(io.StringIO()), profile(activities=acts) as prof:
        ctx.recipe_step(samples)
        ctx.sync()
    events = prof.key_averages()
    ops = {e.key for e in events}
    if not ctx.cuda:
        return [e for e in events if e.self_cpu_time_total > 0], ops, cpu_time
    kernels = [e for e in events if getattr(e, "device_type", None) == DeviceType.CUDA and device_time(e) > 0]
    return kernels or [e for e in events if device_time(e) > 0], ops, device_time


def check_recipe_profile(ctx: Ctx) -> Record:
    kernels, ops, timing = profiled_events(ctx)
    total = sum(timing(e) for e in kernels) or 1.0
    top = sorted(kernels, key=timing, reverse=True)[:10]
    listing = [f"{100 * timing(e) / total:5.1f}%  {timing(e) / 1e3:8.2f} ms  x{e.count:<4d} {e.key[:110]}" for e in top]
    fused_ops = sorted(o for o in ops if o.startswith("aten::_scaled_dot_product_") and "math" not in o)
    math_path = sorted(o for o in ops if "_scaled_dot_product_attention_math" in o)
    names = ("flash", "fmha", "sdpa", "attention")
    attn_kernels = [e.key for e in kernels if any(s in e.key.lower() for s in names)] if ctx.cuda else []
    softmax_share = sum(timing(e) for e in kernels if "softmax" in e.key.lower()) / total
    figs = dict(device=ctx.where, top10=listing, fused_attention_ops=fused_ops, math_attention_ops=math_path,
                attention_kernels=attn_kernels[:6], softmax_share=softmax_share)  # fmt: skip
    unit = "CUDA" if ctx.cuda else "CPU"
    details = [f"top {len(top)} {'kernels' if ctx.cuda else 'ops'} of one recipe step by self {unit} time:"]
    details += ["    " + x for x in listing]
    summary = (
        f"top: {top[0].key[:48] if top else '-'}; fused attention {bool(fused_ops or attn_kernels)}, "
        f"math path {bool(math_path)}, softmax {100 * softmax_share:.1f}%"
    )
    if not ctx.cuda:
        return Record(SKIP, summary, figs, NO_CUDA + " (CPU SDPA with dropout takes the math path)", details)
    ok = bool(fused_ops or attn_kernels) and not math_path and softmax_share < 0.25
    return Record(verdict(ok), summary, figs, "" if ok else "no fused attention kernel, or a T x T softmax", details)
