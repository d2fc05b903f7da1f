"""Dropout, causal attention and cross-entropy for CPU training, fast and memory-lean (GPUs mostly use PyTorch's
own kernels).

Why: on CPU, PyTorch's dropout draws one Mersenne-Twister number per element (a third of a small model's step
time) and ``scaled_dot_product_attention`` with dropout falls back to a math path that stores B x H x T x T
probabilities and masks per layer (gigabytes at the recipe's T = 3072). Here:

* ``dropout``: the keep-mask comes from 16-bit lanes of 64-bit random words (4 draws per word, numpy's
  PCG64-DXSM), seeded from the global torch RNG (so the trainer's per-update seeding makes resumed runs
  identical), and is kept for backward already scaled, in the input's dtype. Keep probability is quantised to
  1/65536 and the scale uses the exact quantised value, so the expectation is preserved.
* ``causal_attention``: at T x T small enough to keep, the probabilities are stored (``_StoredAttention``, a
  few heads at a time so that every pass over the scores stays in cache); above that, flash-attention-style
  (``_CausalAttention``): query blocks attend only to the keys at or before them (the masked upper triangle
  is skipped, about half the FLOPs at long T), softmax in fp32, attention dropout with regenerated masks;
  only q, k, v and one log-sum-exp per query are kept for backward.
* ``add_dropout``: a residual ``x + dropout(h)`` in one ``addcmul`` pass.
* ``cross_entropy_sum``: summed cross-entropy whose backward is softmax - onehot in one pass (any device).
* ``pad_rows``: row counts rounded to a few sizes where oneDNN builds a kernel per shape (CPU half precision,
  and fp32 inside ``OneDNNLinears``).
* ``OneDNNLinears``: fp32 ``F.linear`` (forward, and both backward GEMMs under autograd) on oneDNN instead of MKL,
  whose fp32 path on AMD CPUs runs at half the rate.

Which kernels run is an explicit setting, ``use_plain_kernels(True)`` (``--kernels plain`` on the command line):
then CPU runs exactly what CUDA runs (PyTorch's dropout, ``F.scaled_dot_product_attention(is_causal=True)``, no
row padding, the sync-free branch of ``cross_entropy_sum``), which is how the GPU path is tested on CPU.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

_LANES = 65536
MATH_PATH_MAX_SCORES = 16 << 20  # B*H*T*T up to this: store the probabilities (faster); above: recompute blocks


class _Settings:
    """The kernel choice: ``plain`` = PyTorch's own kernels on every device; ``compile_safe`` = the random-number
    helpers are hidden from TorchDynamo (set by ``prepare_for_compile``)."""

    plain: bool = False
    compile_safe: bool = False


SETTINGS = _Settings()


def use_plain_kernels(on: bool = True) -> None:
    """Run PyTorch's kernels (what CUDA runs) on every device, CPU included; ``False`` restores ours on CPU."""
    SETTINGS.plain = bool(on)


@contextlib.contextmanager
def plain_kernels(on: bool = True) -> Iterator[None]:
    """``use_plain_kernels`` for the duration of a ``with`` block."""
    before = SETTINGS.plain
    SETTINGS.plain = bool(on)
    try:
        yield
    finally:
        SETTINGS.plain = before


def ours(t: Tensor) -> bool:
    """Whether our CPU kernels handle ``t`` (a CPU tensor, plain kernels off)."""
    return t.device.type == "cpu" and not SETTINGS.plain


def _lanes(shape: torch.Size | tuple[int, ...], seed: int, device: torch.device) -> Tensor:
    """Uniform random int16 values of ``shape``: the 16-bit lanes of 64-bit words from numpy's PCG64-DXSM (which
    fills words 2.4x faster than torch's CPU Mersenne Twister; masks were a tenth of a bf16 step)."""
    if SETTINGS.compile_safe:
        return _COMPILE_SAFE["lanes"](shape, seed, device)
    return _lanes_impl(shape, seed, device)


def _lanes_impl(shape: torch.Size | tuple[int, ...], seed: int, device: torch.device) -> Tensor:
    n = 1
    for s in shape:
        n *= s
    words = np.random.PCG64DXSM(seed).random_raw((n + 3) // 4)  # uint64
    return torch.from_numpy(words.view(np.int16)[:n]).view(shape).to(device)


_COMPILE_SAFE: dict = {}


def prepare_for_compile() -> None:
    """Keep TorchDynamo out of the numpy mask generator (it mis-traces the uint64 -> int16 view); called by the
    trainer under ``--compile`` only, because ``torch.compiler.disable`` imports TorchDynamo (0.7 s)."""
    _COMPILE_SAFE.update(lanes=torch.compiler.disable(_lanes_impl), seed=torch.compiler.disable(_new_seed_impl))
    SETTINGS.compile_safe = True


# ---- row padding for oneDNN ------------------------------------------------------------------------------------
def bucket(n: int) -> int:
    """``n`` rounded up to a coarse size: a multiple of 64 up to 128, then of half the power of two below ``n``
    (128, 192, 256, 384, 512, 768, ...; at most 50% padding, a handful of sizes per octave).

    Why: the rows of an adaptive-softmax tail or an adaptive-input band change with every batch, and CPU bf16
    matmuls (oneDNN) build and cache a kernel per shape; with rounded sizes the few shapes repeat across steps.
    """
    if n <= 128:
        return -(-n // 64) * 64
    step = 1 << (n.bit_length() - 2)  # half of the power of two at or below n
    return -(-n // step) * step


def wants_buckets(device: torch.device, dtype: torch.dtype) -> bool:
    """Row bucketing pays only where oneDNN runs the matmuls: CPU in bf16/fp16 (autocast or half weights), and fp32
    inside ``OneDNNLinears``. Plain fp32 on CPU goes to MKL, which caches nothing per shape; there the padding was
    pure cost (3% of a small step)."""
    if device.type != "cpu" or SETTINGS.plain:
        return False
    return dtype in (torch.bfloat16, torch.float16) or torch.is_autocast_enabled(device.type) or OneDNNLinears.active()


def pad_rows(rows: Tensor, weight: Tensor) -> Tensor:
    """``rows`` (a 1-D index list) extended to ``bucket(len)`` entries by repeating its first one where the
    matmuls with ``weight`` run on oneDNN (see ``wants_buckets``); callers keep the first ``len(rows)`` results,
    so only the matmul shapes change (and repeat across batches). Elsewhere ``rows`` unchanged."""
    n = rows.numel()
    if n == 0 or not wants_buckets(weight.device, weight.dtype) or bucket(n) == n:
        return rows
    return torch.cat([rows, rows[:1].expand(bucket(n) - n)])


def _threshold(p: float) -> int:
    """Keep a lane iff lane >= this (P = 1 - round(p * 65536) / 65536)."""
    return round(p * _LANES) - _LANES // 2


def _keep_mask(shape: torch.Size | tuple[int, ...], p: float, seed: int, device: torch.device) -> Tensor:
    """0/1 int16 keep-mask (clamping first avoids int16 overflow; cheaper to make than a bool mask)."""
    thr = _threshold(p)
    return _lanes(shape, seed, device).clamp_(thr - 1, thr).sub_(thr - 1)


def _scale(p: float) -> float:
    return 1.0 / (1.0 - round(p * _LANES) / _LANES)


def _scaled_keep(x: Tensor, p: float, seed: int) -> Tensor:
    """The keep-mask for ``x``, in its dtype, already scaled: 0 or 1 / (1 - p)."""
    return _keep_mask(x.shape, p, seed, x.device).to(x.dtype).mul_(_scale(p))


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Softmax/accumulation dtype: fp32 for half types, the input's own otherwise (fp64 stays exact)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _new_seed() -> int:
    """A mask seed from the global torch RNG (so seeding torch, as the trainer does per update, fixes the masks)."""
    if SETTINGS.compile_safe:
        return _COMPILE_SAFE["seed"]()
    return _new_seed_impl()


def _new_seed_impl() -> int:
    return int(torch.randint(0, 2**62, (1,)).item())


class _Dropout(torch.autograd.Function):
    """The keep-mask is kept for backward already scaled, in the input's dtype: forward and backward are then one
    multiply each (an int16 0/1 mask costs a conversion and a second multiply on both sides)."""

    @staticmethod
    def forward(ctx, x: Tensor, p: float, seed: int) -> Tensor:  # type: ignore[override]
        keep = _scaled_keep(x, p, seed)
        ctx.save_for_backward(keep)
        return x * keep

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (keep,) = ctx.saved_tensors
        return grad * keep, None, None


class _DropoutAdd(torch.autograd.Function):
    """x + dropout(h) in one pass (``addcmul``) instead of a multiply then an add: every residual connection."""

    @staticmethod
    def forward(ctx, x: Tensor, h: Tensor, p: float, seed: int) -> Tensor:  # type: ignore[override]
        keep = _scaled_keep(h, p, seed)
        ctx.save_for_backward(keep)
        return torch.addcmul(x, h, keep)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (keep,) = ctx.saved_tensors
        return grad, grad * keep, None, None


def add_dropout(x: Tensor, h: Tensor, p: float, training: bool) -> Tensor:
    """``x + F.dropout(h, p, training)`` (same mask as ``dropout(h, ...)`` would draw)."""
    if not training or p == 0.0 or not ours(h) or x.shape != h.shape or x.dtype != h.dtype:
        return x + dropout(h, p, training)
    return _DropoutAdd.apply(x, h, p, _new_seed())


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """``F.dropout`` semantics; the fast regenerated mask on CPU, PyTorch's kernel elsewhere."""
    if not training or p == 0.0:
        return x
    if not ours(x):
        return F.dropout(x, p, True)
    return _Dropout.apply(x, p, _new_seed())


# ---- causal attention -------------------------------------------------------------------------------------------
_BIAS: dict[tuple, Tensor] = {}


def _bias(rows: int, c0: int, keys: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Additive causal mask for queries c0..c0+rows-1 over keys 0..keys-1 (-inf above the diagonal), cached."""
    key = (rows, c0, keys, device, dtype)
    if key not in _BIAS:
        if len(_BIAS) > 256:
            _BIAS.clear()
        _BIAS[key] = torch.full((rows, keys), float("-inf"), device=device, dtype=dtype).triu_(diagonal=c0 + 1)
    return _BIAS[key]


def _block(T: int) -> int:
    return T if T <= 256 else 256


def _chunk(BH: int, T: int, keys: int) -> int:
    """Heads per chunk: about 1M scores (4 MiB in fp32, 2 MiB per core's L2 for each of the two threads here);
    measured on the benchmark shapes, 256K to 4M all within 15%, 1M the best or near it for fp32 and bf16."""
    return max(1, min(BH, (1 << 20) // max(1, T * keys)))


class _StoredAttention(torch.autograd.Function):
    """Causal attention with dropout that keeps the probabilities (for T x T small enough to store).

    Why: done tensor-wide, scores, softmax, mask, dropout and their backward are each a pass over B x H x T x T
    values in main memory; done a few heads at a time every pass after the first hits the L2 cache (softmax alone
    runs 4x faster). Kept for backward, in the compute dtype: the probabilities and the dropped probabilities
    (8 bytes per score in fp32, fairseq keeps 9), plus the 0/1 mask in half types (6 bytes); backward then
    makes no mask (deciding it again from stored int16 random lanes cost a third of the attention backward).
    The dropout scale is folded into the (T, hd)-sized outputs instead of the (T, T) scores.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, p: float, seed: int) -> Tensor:  # type: ignore[override]
        BH, T, hd = q.shape
        scale, dscale = hd**-0.5, _scale(p)
        probs = torch.empty(BH, T, T, dtype=q.dtype, device=q.device)  # softmax(q k^T / sqrt(hd)), undropped
        dropped = torch.empty_like(probs)  # probs * keep (0/1): what multiplies v, kept for dv
        half = q.dtype in (torch.float16, torch.bfloat16)
        keeps = torch.empty_like(probs) if half else None  # 0/1 keep-mask (half types only, see backward)
        lanes = _lanes((BH, T, T), seed, q.device)  # (BH, T, T) int16; keep iff >= thr, decided in cache per chunk
        thr = _threshold(p)
        out = torch.empty_like(q)
        bias = _bias(T, 0, T, q.device, q.dtype)
        c = _chunk(BH, T, T)
        for i in range(0, BH, c):
            j = min(BH, i + c)
            s = torch.baddbmm(bias, q[i:j], k[i:j].transpose(1, 2), alpha=scale)  # (c, T, T)
            torch._softmax(s, -1, False, out=probs[i:j])  # half types accumulate in fp32 inside the kernel
            kf = lanes[i:j].ge(thr).view(torch.uint8).to(q.dtype)  # (c, T, T) 0/1
            if keeps is not None:
                keeps[i:j] = kf
            torch.bmm(torch.mul(probs[i:j], kf, out=dropped[i:j]), v[i:j], out=out[i:j])  # (c, T, hd)
        out.mul_(dscale)
        ctx.save_for_backward(q, k, v, probs, dropped, keeps)
        ctx.dscale = dscale
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):  # type: ignore[override]
        q, k, v, probs, dropped, keeps = ctx.saved_tensors
        BH, T, hd = q.shape
        dscale = ctx.dscale
        dout = dout.contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        c = _chunk(BH, T, T)
        for i in range(0, BH, c):
            j = min(BH, i + c)
            pr, pd = probs[i:j], dropped[i:j]
            torch.bmm(pd.transpose(1, 2), dout[i:j], out=dv[i:j])
            dpd = torch.bmm(dout[i:j], v[i:j].transpose(1, 2))  # (c, T, T) d(dropped probs) / dscale
            if keeps is None:
                # softmax backward with dp = keep * dpd, written so the mask is not needed: pr * dp = pd * dpd
                # exactly (keep is 0 or 1), so ds = pd * dpd - pr * sum(pd * dpd); fp32/fp64 only, since in a
                # half type the extra roundings of the product would cost precision
                t = dpd.mul_(pd)
                ds = torch.addcmul(t, pr, t.sum(-1, keepdim=True), value=-1)  # (c, T, T), also / dscale
            else:
                ds = torch._softmax_backward_data(dpd.mul_(keeps[i:j]), pr, -1, q.dtype)  # fp32 inside the kernel
            torch.bmm(ds, k[i:j], out=dq[i:j])
            torch.bmm(ds.transpose(1, 2), q[i:j], out=dk[i:j])
        f = dscale * hd**-0.5
        return dq.mul_(f), dk.mul_(f), dv.mul_(dscale), None, None


class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, p: float, seed: int) -> Tensor:  # type: ignore[override]
        BH, T, hd = q.shape
        scale = hd**-0.5
        out = torch.empty_like(q)
        acc = _acc(q.dtype)
        lse = torch.empty(BH, T, dtype=acc, device=q.device)
        blk = _block(T)
        for i, c0 in enumerate(range(0, T, blk)):
            c1 = min(T, c0 + blk)
            s = torch.baddbmm(
                _bias(c1 - c0, c0, c1, q.device, q.dtype), q[:, c0:c1], k[:, :c1].transpose(1, 2), alpha=scale
            ).to(acc)  # (BH, c, c1)
            m = torch.logsumexp(s, dim=-1, keepdim=True)  # (BH, c, 1)
            pr = torch.exp(s - m)
            if p > 0:
                pr = pr * _scaled_keep(pr, p, seed + i)
            out[:, c0:c1] = torch.bmm(pr.to(v.dtype), v[:, :c1])  # (BH, c, hd)
            lse[:, c0:c1] = m.squeeze(-1)
        ctx.save_for_backward(q, k, v, lse)
        ctx.p, ctx.seed = p, seed
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):  # type: ignore[override]
        q, k, v, lse = ctx.saved_tensors
        p, seed = ctx.p, ctx.seed
        BH, T, hd = q.shape
        scale = hd**-0.5
        acc = _acc(q.dtype)
        dq = torch.zeros_like(q, dtype=acc)
        dk = torch.zeros_like(k, dtype=acc)
        dv = torch.zeros_like(v, dtype=acc)
        dout = dout.contiguous()
        blk = _block(T)
        for i, c0 in enumerate(range(0, T, blk)):
            c1 = min(T, c0 + blk)
            s = torch.baddbmm(
                _bias(c1 - c0, c0, c1, q.device, q.dtype), q[:, c0:c1], k[:, :c1].transpose(1, 2), alpha=scale
            ).to(acc)
            pr = torch.exp(s - lse[:, c0:c1, None])  # (BH, c, c1) softmax probabilities
            do = dout[:, c0:c1]
            dpd = torch.bmm(do, v[:, :c1].transpose(1, 2)).to(acc)  # d(dropped probs)
            if p > 0:
                keep = _scaled_keep(pr, p, seed + i)
                pd, dp = pr * keep, dpd * keep
            else:
                pd, dp = pr, dpd
            dv[:, :c1] += torch.bmm(pd.to(do.dtype).transpose(1, 2), do).to(acc)
            ds = pr * (dp - (dp * pr).sum(-1, keepdim=True))  # softmax backward
            ds = ds.to(q.dtype)
            dq[:, c0:c1] += torch.bmm(ds, k[:, :c1]).to(acc) * scale
            dk[:, :c1] += torch.bmm(ds.transpose(1, 2), q[:, c0:c1]).to(acc) * scale
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def causal_attention(q: Tensor, k: Tensor, v: Tensor, dropout_p: float, training: bool) -> Tensor:
    """(B, H, T, hd) x3 -> (B, H, T, hd), causal, with attention dropout when training."""
    p = dropout_p if training else 0.0
    B, H, T, hd = q.shape
    if not ours(q) or p == 0.0:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else q.dtype
    with torch.autocast("cpu", enabled=False):
        qf, kf, vf = (t.to(dtype).reshape(B * H, T, hd) for t in (q, k, v))
        if B * H * T * T <= MATH_PATH_MAX_SCORES:  # small: keep the T x T probabilities rather than recompute
            out = _StoredAttention.apply(qf.contiguous(), kf.contiguous(), vf.contiguous(), p, _new_seed())
        else:
            out = _CausalAttention.apply(qf.contiguous(), kf.contiguous(), vf.contiguous(), p, _new_seed())
    return out.view(B, H, T, hd)


# ---- cross-entropy ----------------------------------------------------------------------------------------------
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


# ---- a full-softmax head without (N, V) logits ------------------------------------------------------------------
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
            logits = F.linear(x[i : i + rows].to(dt), w).to(lse.dtype)  # (r, V)
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
        logits = F.linear(x, weight)
        return cross_entropy_sum(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits,
                                 target, ignore_index)  # fmt: skip
    rows = max(1, max_elements // weight.shape[0])
    with torch.autocast(x.device.type, enabled=False):
        return _ChunkedLinearCrossEntropy.apply(x, weight, target, ignore_index, rows, dt)


# ---- fp32 matmuls on oneDNN ------------------------------------------------------------------------------------
def _onednn_linear(x2: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """(N, in) x (out, in)^T (+ b) -> (N, out) in fp32 by oneDNN's GEMM."""
    return torch.ops.mkldnn._linear_pointwise(x2, w.contiguous(), b, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """``F.linear`` whose forward and backward GEMMs all run on oneDNN: d(x) = dy @ W and d(W) = dy^T @ x as linears
    over transposed operands (a copy of W and of x per backward: bandwidth, small next to the GEMMs' flops)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:  # type: ignore[override]
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        ctx.save_for_backward(x2, w)
        ctx.x_shape, ctx.has_bias = x.shape, b is not None
        return _onednn_linear(x2, w, b).view(*x.shape[:-1], w.shape[0])  # (..., out)

    @staticmethod
    def backward(ctx, gy: Tensor):  # type: ignore[override]
        x2, w = ctx.saved_tensors
        gy2 = gy.reshape(-1, gy.shape[-1]).contiguous()  # (N, out)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _onednn_linear(gy2, w.t(), None).view(ctx.x_shape)  # (N, out) @ (out, in)
        if ctx.needs_input_grad[1]:
            gw = _onednn_linear(gy2.t(), x2.t(), None)  # (out, N) @ (N, in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy2.sum(0)  # (out,)
        return gx, gw, gb


class OneDNNLinears(TorchFunctionMode):
    """Within ``with OneDNNLinears():``, fp32 CPU ``F.linear`` calls run on oneDNN, not MKL; under autograd the
    backward's two GEMMs too (``_OneDNNLinear``).

    Why: MKL takes a slower path on AMD CPUs; on an AMD EPYC (Zen 5) its fp32 GEMMs of our shapes run at 40-45%
    of oneDNN's (2048^3: 217 vs 460 GFLOP/s on 2 cores; 4096 x 128 x 2002, the fixture's softmax head: 139 vs
    384), forward + backward of a linear layer 1.5-1.9x faster at the 14M model's shapes, with fp32 results equal
    up to summation order. A torch function mode is thread-local and ends with the block, so no other code is
    affected; every other call (other dtypes or devices, autocast, a PyTorch without the op) goes through
    unchanged. Used by training, validation, evaluation, scoring and rescoring on our CPU kernels."""

    _ok: bool | None = None
    _depth = threading.local()  # how many of these blocks this thread is in (row bucketing asks)

    @classmethod
    def active(cls) -> bool:
        return getattr(cls._depth, "n", 0) > 0

    def __enter__(self) -> OneDNNLinears:
        OneDNNLinears._depth.n = getattr(OneDNNLinears._depth, "n", 0) + 1
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        OneDNNLinears._depth.n -= 1
        super().__exit__(*exc)

    @classmethod
    def available(cls) -> bool:
        if cls._ok is None:
            op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
            try:
                g = torch.Generator().manual_seed(0)  # never the global generator: it is the user's
                x, w, b = (torch.randn(*s, generator=g) for s in ((3, 8), (5, 8), (5,)))
                cls._ok = bool(
                    op is not None
                    and torch.backends.mkldnn.is_available()
                    and torch.allclose(op(x, w, b, "none", [], ""), F.linear(x, w, b), atol=1e-5)
                )
            except (RuntimeError, TypeError):
                cls._ok = False
        return cls._ok

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func is F.linear and not torch.is_autocast_enabled("cpu"):
            x, w = args[0], args[1]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            if x.dtype == torch.float32 and w.dtype == torch.float32 and x.device.type == "cpu" and x.dim() >= 1:
                if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w, b)):
                    return _OneDNNLinear.apply(x, w, b)
                y = _onednn_linear(x.reshape(-1, x.shape[-1]), w, b)  # (N, out)
                return y.view(*x.shape[:-1], w.shape[0])
        return func(*args, **kwargs)


def recompute_contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """``context_fn`` for ``torch.utils.checkpoint``: the recomputation in backward runs under the same linear
    kernels as the forward did (a torch function mode is not active inside the autograd engine), so it saves the
    same tensors and computes the same numbers."""
    again = OneDNNLinears() if OneDNNLinears.active() else contextlib.nullcontext()
    return contextlib.nullcontext(), again


def fast_linears(device: torch.device) -> contextlib.AbstractContextManager:
    """``OneDNNLinears`` on our CPU kernels (not with plain kernels: CUDA's path has no such mode)."""
    ok = device.type == "cpu" and not SETTINGS.plain and OneDNNLinears.available()
    return OneDNNLinears() if ok else contextlib.nullcontext()
