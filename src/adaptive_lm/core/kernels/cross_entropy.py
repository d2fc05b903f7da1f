"""Summed cross-entropy whose backward is softmax - onehot in one pass (any device), and a full-softmax head that
never holds the (N, V) logits at once."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from adaptive_lm.core.kernels.linears import linear
from adaptive_lm.core.kernels.switch import ours


def log_softmax_(logits: Tensor) -> Tensor:
    """``log_softmax`` over the last dim, written over ``logits`` (bit for bit PyTorch's result) unless a gradient
    must flow through them or they are not contiguous (PyTorch's ``out=`` kernel would write a strided tensor as if
    it were dense). The caller's ``logits`` must be a fresh buffer nothing reads afterwards. Why: one buffer of a
    chunk in cache instead of two made the 2002-way head's and the tails' log-softmax 30% faster (Zen 4, fp32)."""
    if (torch.is_grad_enabled() and logits.requires_grad) or not logits.is_contiguous():
        return F.log_softmax(logits, dim=-1)
    return torch._log_softmax(logits, -1, False, out=logits)


class _SummedCrossEntropy(torch.autograd.Function):
    """sum over rows with target != ignore of -log_softmax(logits)[row, target], with a one-pass backward.

    Why: ``F.cross_entropy`` backward first writes a zero (N, V) gradient, scatters -1 into it, then runs the
    log-softmax backward over it and the saved output (three passes over N x V floats); the gradient is simply
    softmax - onehot, one exp over the saved log-probabilities plus N scattered values. The adaptive-softmax
    head's (2048 x 2002) cross-entropy went from 4.0 to 2.9 ms, forward + backward, on the small benchmark.
    Same arithmetic as PyTorch's (exp(logp) - 1 at the target); only the exp routine may differ in the last bit.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, ignore_index: int) -> Tensor:  # type: ignore[override]
        logp = torch.log_softmax(logits, dim=-1)  # (N, V)
        ignored = target.eq(ignore_index)  # (N,)
        safe = target.masked_fill(ignored, 0)  # (N,) ignored rows point at column 0, zeroed in backward
        picked = logp.gather(1, safe.unsqueeze(1)).squeeze(1)  # (N,)
        ctx.on_cpu = ours(logits)
        # CPU: the (usually empty) list of ignored rows; CUDA (and plain kernels): the mask of kept rows (a list
        # costs a host sync there)
        rows = ignored.nonzero().squeeze(1) if ctx.on_cpu else ~ignored  # (n_ignored,) or (N,)
        ctx.save_for_backward(logp, safe, rows)
        return -picked.masked_fill(ignored, 0).sum()

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        logp, safe, rows = ctx.saved_tensors
        grad = torch.exp(logp)  # (N, V) softmax
        grad.scatter_add_(1, safe.unsqueeze(1), grad.new_full((safe.numel(), 1), -1.0))  # - onehot
        if not ctx.on_cpu:
            return grad.mul_(rows.unsqueeze(1).to(grad.dtype) * g), None, None
        if rows.numel():
            grad.index_fill_(0, rows, 0.0)
        if float(g) != 1.0:  # loss scaling or a weighted loss; plain loss.backward() skips this pass
            grad.mul_(g)
        return grad, None, None


def cross_entropy_sum(logits: Tensor, target: Tensor, ignore_index: int) -> Tensor:
    """``F.cross_entropy(logits, target, ignore_index=..., reduction="sum")`` for (N, V) logits, faster backward."""
    return _SummedCrossEntropy.apply(logits, target, ignore_index)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum over kept rows of -log_softmax(x @ W^T)[row, target], ``rows`` rows at a time: forward keeps one
    log-sum-exp per row, backward recomputes each chunk's logits. Memory is ``rows`` x V instead of N x V (plus the
    fp32 copy and its gradient): 8.7 GB per copy at V = 267K and 8K tokens otherwise."""

    @staticmethod
    def forward(
        ctx, x: Tensor, weight: Tensor, target: Tensor, ignore_index: int, rows: int, dt: torch.dtype
    ) -> Tensor:  # type: ignore[override]
        w = weight.to(dt)
        lse = torch.empty(x.shape[0], dtype=torch.float32 if dt != torch.float64 else dt, device=x.device)
        total = torch.zeros((), dtype=lse.dtype, device=x.device)
        keep = target.ne(ignore_index)  # (N,)
        safe = target.masked_fill(~keep, 0)
        for i in range(0, x.shape[0], rows):
            logits = linear(x[i : i + rows].to(dt), w).to(lse.dtype)  # (r, V)
            lse[i : i + rows] = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, safe[i : i + rows, None]).squeeze(1)
            total += ((lse[i : i + rows] - picked) * keep[i : i + rows]).sum()
        ctx.save_for_backward(x, weight, safe, keep, lse)
        ctx.rows, ctx.dt = rows, dt
        return total

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        x, weight, safe, keep, lse = ctx.saved_tensors
        rows, dt = ctx.rows, ctx.dt
        w = weight.to(dt)
        dx = torch.empty_like(x)
        dw = torch.zeros(weight.shape, dtype=torch.float32 if weight.dtype != torch.float64 else weight.dtype,
                         device=weight.device)  # fmt: skip
        for i in range(0, x.shape[0], rows):
            xc = x[i : i + rows].to(dt)
            p = torch.exp(F.linear(xc, w).to(lse.dtype) - lse[i : i + rows, None])  # (r, V) softmax
            p.scatter_add_(1, safe[i : i + rows, None], p.new_full((p.shape[0], 1), -1.0))  # - onehot
            p.mul_((keep[i : i + rows, None] * g).to(p.dtype))
            pd = p.to(dt)
            dx[i : i + rows] = (pd @ w).to(dx.dtype)
            dw += (pd.t() @ xc).to(dw.dtype)
        return dx, dw.to(weight.dtype), None, None, None, None


def linear_cross_entropy_sum(
    x: Tensor, weight: Tensor, target: Tensor, ignore_index: int, max_elements: int = 1 << 24
) -> Tensor:
    """``F.cross_entropy(x @ weight.T, target, ignore_index, reduction="sum")`` for (N, d) ``x`` and a (V, d) head,
    in the autocast dtype if one is active; chunked (see above) when N x V exceeds ``max_elements``."""
    dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    if x.shape[0] * weight.shape[0] <= max_elements:
        logits = linear(x, weight)
        return cross_entropy_sum(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits,
                                 target, ignore_index)  # fmt: skip
    rows = max(1, max_elements // weight.shape[0])
    with torch.autocast(x.device.type, enabled=False):
        return _ChunkedLinearCrossEntropy.apply(x, weight, target, ignore_index, rows, dt)
