"""Kernel checks: the device's kernels (PyTorch's: what CUDA runs) against the CPU's (ours) and against fp64.

Attention (forward and gradients), the summed cross-entropy (value and gradient, also loss-scaled) and dropout
(reseeding, the kept fraction, the residual and attention variants).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from adaptive_lm.check.context import Ctx, Record, fmt, maxabs, maxdiff, tf32, verdict
from adaptive_lm.core.kernels import add_dropout, causal_attention, cross_entropy_sum, dropout, plain_kernels

# the SDPA backends tried one by one on CUDA, per dtype (figures only: which ones run, how close they are)
BACKENDS = (
    (torch.float32, ("EFFICIENT_ATTENTION", "MATH")),
    (torch.bfloat16, ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")),
)


def attention_fp64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor) -> list[torch.Tensor]:
    """Causal softmax(q k^T / sqrt(hd)) v written out in fp64, with its gradients: the exact reference."""
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))  # B, H, T, hd each
    T = q.shape[-2]
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # B, H, T, T
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    out = torch.softmax(s, -1) @ v  # B, H, T, hd
    out.backward(dout.double())
    return [out.detach(), q.grad, k.grad, v.grad]


def run_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor,
    device: Any,
    plain: bool,
    dtype: torch.dtype = torch.float32,
    backend: Any = None,
) -> list[torch.Tensor]:
    """``causal_attention`` (dropout 0) forward and backward on ``device``; outputs and gradients on the CPU."""
    from torch.nn.attention import sdpa_kernel

    with plain_kernels(plain), sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
        ts = [t.to(device, dtype, copy=True).requires_grad_() for t in (q, k, v)]  # fresh leaves on any device
        out = causal_attention(*ts, 0.0, True)  # B, H, T, hd
        out.backward(dout.to(device, dtype))
    return [out.detach().double().cpu()] + [t.grad.double().cpu() for t in ts]


def backend_figures(ctx: Ctx, qkv: tuple[torch.Tensor, ...], dout: torch.Tensor, exact: list[torch.Tensor]) -> dict:
    """Each CUDA SDPA backend alone, fp32 and bf16, against fp64: which run on this GPU and how close they are."""
    from torch.nn.attention import SDPBackend

    per: dict[str, Any] = {}
    for dt, names in BACKENDS:
        for name in names:
            key = f"{str(dt).split('.')[-1]}_{name.lower()}"
            try:
                with tf32(False):
                    r = run_attention(*qkv, dout, ctx.device, True, dt, getattr(SDPBackend, name))
                per[key] = dict(
                    fwd_vs_fp64=maxdiff(r[0], exact[0]), dq_rel_vs_fp64=maxdiff(r[1], exact[1]) / maxabs(exact[1])
                )
            except Exception as e:  # noqa: BLE001 - a backend that does not support the shape/dtype
                per[key] = f"n/a ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})"
    return per


def check_attention(ctx: Ctx) -> Record:
    B, H, T, hd = ctx.plan.attention_shape
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(B, H, T, hd, generator=g) for _ in range(4))
    exact = attention_fp64(q, k, v, dout)
    with tf32(False):  # fp32 means fp32 here (the trainer turns TF32 on for training)
        cpu = run_attention(q, k, v, dout, "cpu", plain=False)
        dev = run_attention(q, k, v, dout, ctx.device, plain=True)
    fwd = maxdiff(dev[0], cpu[0])
    grad = max(maxdiff(a, b) / max(maxabs(b), 1e-30) for a, b in zip(dev[1:], cpu[1:]))
    fwd64 = maxdiff(dev[0], exact[0])
    grad64 = max(maxdiff(a, b) / max(maxabs(b), 1e-30) for a, b in zip(dev[1:], exact[1:]))
    figs: dict[str, Any] = dict(shape=[B, H, T, hd], device=ctx.where, fwd_max_abs_diff_vs_cpu=fwd,
                                grad_max_rel_diff_vs_cpu=grad, fwd_max_abs_diff_vs_fp64=fwd64,
                                grad_max_rel_diff_vs_fp64=grad64)  # fmt: skip
    if ctx.cuda:
        figs["backends"] = backend_figures(ctx, (q, k, v), dout, exact)
    ok = fwd <= 1e-5 and grad <= 1e-5 and fwd64 <= 1e-5 and grad64 <= 1e-5
    summary = f"{ctx.where}: fwd |d| {fmt(fwd)} (vs fp64 {fmt(fwd64)}), grads rel {fmt(grad)} (vs fp64 {fmt(grad64)})"
    return Record(verdict(ok), summary, figs, "" if ok else "above 1e-5")


def cross_entropy_diffs(ctx: Ctx, logits: torch.Tensor, target: torch.Tensor, scale: float) -> dict[str, float]:
    """The device's ``cross_entropy_sum`` (value and gradient of ``scale`` x the loss) against ours on the CPU and
    against fp64 ``F.cross_entropy``: relative differences."""

    def run(device: Any, plain: bool) -> tuple[float, torch.Tensor]:
        with plain_kernels(plain):
            x = logits.to(device, copy=True).requires_grad_()  # N, V
            loss = cross_entropy_sum(x, target.to(device), 1)
            (loss * scale).backward()
        return loss.item(), x.grad.cpu()

    (lc, gc), (ld, gd) = run("cpu", False), run(ctx.device, True)
    x64 = logits.double().requires_grad_()
    l64 = F.cross_entropy(x64, target, ignore_index=1, reduction="sum")
    (l64 * scale).backward()
    return dict(
        value_rel_vs_cpu=abs(ld - lc) / abs(lc),
        grad_rel_vs_cpu=maxdiff(gd, gc) / maxabs(gc),
        value_rel_vs_fp64=abs(ld - l64.item()) / abs(l64.item()),
        grad_rel_vs_fp64=maxdiff(gd, x64.grad) / maxabs(x64.grad),
    )


def check_cross_entropy(ctx: Ctx) -> Record:
    N, V = ctx.plan.ce_shape
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(N, V, generator=g) * 4  # N, V
    target = torch.randint(0, V, (N,), generator=g)  # N
    target[::13] = 1  # ignored rows (the padding index)
    figs: dict[str, Any] = dict(shape=[N, V], device=ctx.where)
    worst = 0.0
    for scale in (1.0, 256.0):  # 256: a loss-scaled backward (fp16), the g != 1 branch
        figs[f"scale_{scale:g}"] = diffs = cross_entropy_diffs(ctx, logits, target, scale)
        worst = max(worst, *diffs.values())
    ok = worst <= 1e-5
    return Record(verdict(ok), f"{ctx.where}: worst relative diff {fmt(worst)} (value, grads; x1 and x256)", figs)


def seeded(seed: int, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``fn()`` right after ``torch.manual_seed(seed)``: the same seed must give the same mask."""
    torch.manual_seed(seed)
    return fn()


def dropout_checks(ctx: Ctx, n: int, p: float) -> tuple[dict[str, bool], float, float]:
    """The dropout properties on the device: (named checks, kept fraction, its tolerance)."""
    dev = ctx.device
    with plain_kernels(True):
        x = torch.ones(n, device=dev)
        a, b, c = (seeded(s, lambda: dropout(x, p, True)) for s in (1, 1, 2))
        r = seeded(1, lambda: add_dropout(torch.zeros_like(x), x, p, True))  # residual: the same mask as dropout()
        kept = (a != 0).float().mean().item()
        values_ok = torch.allclose(a[a != 0], torch.full((), 1 / (1 - p), device=dev))
        # attention dropout (inside SDPA; bf16 on CUDA, where the flash kernel draws it)
        g = torch.Generator().manual_seed(2)
        dt = torch.bfloat16 if ctx.cuda else torch.float32
        q, k, v = (torch.randn(2, 4, 64, 32, generator=g).to(dev, dt) for _ in range(3))  # B, H, T, hd
        o1, o2, o3 = (seeded(s, lambda: causal_attention(q, k, v, 0.1, True)) for s in (1, 1, 2))
    tol = 6 * math.sqrt(p * (1 - p) / n)  # 6 standard deviations of a binomial fraction
    checks = dict(
        same_seed_same_mask=torch.equal(a, b),
        other_seed_other_mask=not torch.equal(a, c),
        kept_fraction_ok=abs(kept - (1 - p)) <= tol,
        kept_scaled_by_1_over_keep=bool(values_ok),
        residual_same_mask=torch.equal(r, a),
        attention_same_seed_same=torch.equal(o1, o2),
        attention_other_seed_differs=not torch.equal(o1, o3),
    )
    return checks, kept, tol


def check_dropout(ctx: Ctx) -> Record:
    n, p = ctx.plan.dropout_n, 0.3
    checks, kept, tol = dropout_checks(ctx, n, p)
    failed = [k for k, ok in checks.items() if not ok]
    figs = dict(device=ctx.where, n=n, p=p, kept_fraction=kept, tolerance=tol, **checks)
    summary = f"{ctx.where}: kept {kept:.4f} (expect {1 - p}), reseeding ok: {len(checks) - len(failed)}/{len(checks)}"
    return Record(verdict(not failed), summary, figs, ", ".join(failed))
