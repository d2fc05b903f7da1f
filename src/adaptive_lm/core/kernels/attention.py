"""Causal attention with dropout on CPU.

At T x T small enough to keep, the probabilities are stored (``_StoredAttention``, a few heads at a time so that
every pass over the scores stays in cache); above that, flash-attention-style (``_CausalAttention``): query blocks
attend only to the keys at or before them (the masked upper triangle is skipped, about half the FLOPs at long T),
softmax in fp32, attention dropout with regenerated masks; only q, k, v and one log-sum-exp per query are kept for
backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from adaptive_lm.core.kernels.choice import CHOICE
from adaptive_lm.core.kernels.dropout import _scale, _scaled_keep, _threshold
from adaptive_lm.core.kernels.switch import _lanes, _new_seed, ours

MATH_PATH_MAX_SCORES = 16 << 20  # B*H*T*T up to this: store the probabilities (faster); above: recompute blocks
# Without gradients and dropout, up to this T: scores, softmax and the product a few heads at a time instead of
# PyTorch's flash kernel. Measured on Zen 4 (fp32, 2 threads, head dim 32): 2.8x at T = 20, 2.3x at 40, 1.5x at 80,
# 1.2x at 128; flash wins from 256 on (rescoring's sentences are 10-50 tokens; eval blocks are usually longer).
SHORT_T_MAX = 128
SUFFIX_MAX_SCORES = 2 << 20  # ``suffix_attention``'s own path below this many scores per head (T x S), SDPA above
# Inference (no gradients or dropout) from SHORT_T_MAX + 1 to this T: PyTorch's flash kernel or queries in blocks of
# INFERENCE_BLOCK through ``_short_attention``, whichever measures faster for the shape on this machine (``choice``).
# At T = 256 PyTorch's CPU kernel takes all keys as one block and computes the masked half too; the blocks stop at
# their last query. Measured (Zen 5, fixture evaluation, T = 256, head dim 32): 5% faster end to end natively, 4%
# under the AVX2 caps; the flash kernel won some larger shapes, in isolation.
BLOCKS_T_MAX = 512
INFERENCE_BLOCK = 64


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Softmax/accumulation dtype: fp32 for half types, the input's own otherwise (fp64 stays exact)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


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


def _chunk(BH: int, T: int, keys: int, scores: int = 1 << 20) -> int:
    """Heads per chunk: about ``scores`` scores. Training: 1M (4 MiB in fp32, 2 MiB per core's L2 for each of the two
    threads here); measured on the benchmark shapes, 256K to 4M all within 15%, 1M the best or near it for fp32 and
    bf16. Inference at short T (``_short_attention``, nothing stored for backward): 256K measured best."""
    return max(1, min(BH, scores // max(1, T * keys)))


# ``_StoredAttention``'s query rows per block, chosen by measurement per shape among these (and one block of all T
# rows): block b attends to keys [0, its last row], so the masked keys after a block's end are neither computed nor
# read back, and a block's scores stay in cache. Measured on Zen 5 (fp32, 2 threads, 32 heads, forward + backward,
# natively and under the AVX2 caps): T = 256, head dim 32, one block 9.3 ms, blocks of 128 7.6, of 64 6.9, of 32
# 8.7; T = 512, head dim 64: 128 and 64 within 3% of each other, 32 1.2x. Which wins moves with the shape (and had
# moved with the kernel's code: an earlier version was fastest at T = 256 in one block), hence the measurement.
QUERY_BLOCKS = (128, 64)


def _query_blocks(T: int, block: int) -> list[tuple[int, int]]:
    """(first, end) rows of each query block of ``block`` rows (the last may be short)."""
    return [(r0, min(T, r0 + block)) for r0 in range(0, T, block)]


def stored_block(q: Tensor, k: Tensor, v: Tensor, p: float) -> int:
    """``_StoredAttention``'s query block for this (heads, T, head dim, dtype) on this machine: 0 (one block of all
    T rows) or one of ``QUERY_BLOCKS`` below T, whichever ran forward + backward fastest on copies of the real
    operands (measured once per shape, T in classes of 64, then read from ``choice``'s cache: a given shape keeps
    its block, so its numbers, in the processes of a job that read the cache). The choice changes only roundings:
    each row sees the same keys whatever its block."""
    BH, T, hd = q.shape
    sizes = [b for b in QUERY_BLOCKS if b < T]
    if not sizes:
        return 0
    ops: list[Tensor] = []  # the copies, made only when measuring (not at every call that reads the choice)

    def run(block: int):
        def f() -> Tensor:
            with torch.inference_mode(False), torch.enable_grad():  # (copies of inference tensors can take grads)
                if not ops:
                    ops.extend(t.detach().clone().requires_grad_() for t in (q, k, v))
                    ops.append(torch.ones_like(ops[0]))
                qc, kc, vc, g = ops
                _StoredAttention.apply(qc, kc, vc, p, 0, block).backward(g)  # fixed seed: no draw of the user's RNG
            return g

        return f

    runs = {f"rows{b}": run(b) for b in (0, *sizes)}  # rows0: one block of all T rows
    width = -(-T // 64) * 64  # size classes: with break modes other than none, T changes from batch to batch
    name = CHOICE.pick(f"stored-{str(q.dtype)[6:]}-p{int(p > 0)}", BH, width, hd, runs, linear=False)
    return int(name[4:])


def _add_bmm(dst: Tensor, a: Tensor, b: Tensor) -> None:
    """``dst += a @ b`` batched. A query block's keys [0, r1) with r1 < T are a strided slice of the (c, T, hd)
    gradient, on which PyTorch's in-place ``baddbmm_`` falls back to one ``addmm_`` per head (16 GEMM calls where
    one would do: 20 us more per block at the small benchmark's shapes); there the product is made whole, then
    added."""
    if dst.is_contiguous():
        dst.baddbmm_(a, b)
    else:
        dst += torch.bmm(a, b)


class _StoredAttention(torch.autograd.Function):
    """Causal attention with dropout that keeps the probabilities (for T x T small enough to store).

    Why: done tensor-wide, scores, softmax, mask, dropout and their backward are each a pass over B x H x T x T
    values in main memory; done a few heads at a time every pass after the first hits the L2 cache (softmax alone
    runs 4x faster). Within a chunk, query blocks of ``block`` rows (``stored_block``'s measured choice; 0 or T: one
    block) stop at their last key: the scores past a block's end (all masked) are neither computed nor read back
    (forward and backward at T = 512 in blocks of 128: 0.79x the time of stop 33's unblocked kernel). Kept for
    backward, in the compute dtype: the probabilities and the dropped probabilities (8 bytes per score in fp32,
    fairseq keeps 9), plus the 0/1 mask in half types (6 bytes); backward then makes no mask (deciding it again from
    stored int16 random lanes cost a third of the attention backward). The dropout scale is folded into the
    (T, hd)-sized outputs instead of the (T, T) scores. The mask of score (row, key) is lane (row, key) of the
    (B*H, T, T) lanes, whatever the blocks.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, q: Tensor, k: Tensor, v: Tensor, p: float, seed: int, block: int = 0
    ) -> Tensor:
        BH, T, hd = q.shape
        scale, dscale = hd**-0.5, _scale(p)
        blocks = _query_blocks(T, block or T)
        half = q.dtype in (torch.float16, torch.bfloat16)
        # per query block (rows r0 .. r1 - 1 over keys 0 .. r1 - 1), (BH, rb, r1) each: softmax(q k^T / sqrt(hd))
        # undropped, the dropped probabilities (what multiplies v, kept for dv) and, in half types only, the 0/1 mask
        probs = [q.new_empty(BH, r1 - r0, r1) for r0, r1 in blocks]
        dropped = [torch.empty_like(t) for t in probs]
        keeps = [torch.empty_like(t) for t in probs] if half else []
        lanes = _lanes((BH, T, T), seed, q.device)  # (BH, T, T) int16; keep iff >= thr, decided in cache per chunk
        thr = _threshold(p)
        out = torch.empty_like(q)
        c = _chunk(BH, T, T)
        for i in range(0, BH, c):
            j = min(BH, i + c)
            for b, (r0, r1) in enumerate(blocks):
                bias = _bias(r1 - r0, r0, r1, q.device, q.dtype)
                s = torch.baddbmm(bias, q[i:j, r0:r1], k[i:j, :r1].transpose(1, 2), alpha=scale)  # (c, rb, r1)
                torch._softmax(s, -1, False, out=probs[b][i:j])  # half types accumulate in fp32 inside the kernel
                kf = lanes[i:j, r0:r1, :r1].ge(thr).view(torch.uint8).to(q.dtype)  # (c, rb, r1) 0/1
                if half:
                    keeps[b][i:j] = kf
                pd = torch.mul(probs[b][i:j], kf, out=dropped[b][i:j])  # (c, rb, r1)
                torch.bmm(pd, v[i:j, :r1], out=out[i:j, r0:r1])  # (c, rb, hd)
        out.mul_(dscale)
        ctx.save_for_backward(q, k, v, *probs, *dropped, *keeps)
        ctx.dscale, ctx.blocks = dscale, blocks
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):  # type: ignore[override]
        q, k, v, *kept = ctx.saved_tensors
        n = len(ctx.blocks)
        probs, dropped, keeps = kept[:n], kept[n : 2 * n], kept[2 * n :]
        BH, T, hd = q.shape
        dscale = ctx.dscale
        dout = dout.contiguous()
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        c = _chunk(BH, T, T)
        for i in range(0, BH, c):
            j = min(BH, i + c)
            for b, (r0, r1) in enumerate(ctx.blocks):
                pr, pd, do = probs[b][i:j], dropped[b][i:j], dout[i:j, r0:r1]  # (c, rb, r1) x2, (c, rb, hd)
                _add_bmm(dv[i:j, :r1], pd.transpose(1, 2), do)  # (c, r1, hd)
                dpd = torch.bmm(do, v[i:j, :r1].transpose(1, 2))  # (c, rb, r1) d(dropped probs) / dscale
                if not keeps:
                    # softmax backward with dp = keep * dpd, written so the mask is not needed: pr * dp = pd * dpd
                    # exactly (keep is 0 or 1), so ds = pd * dpd - pr * sum(pd * dpd); fp32/fp64 only, since in a
                    # half type the extra roundings of the product would cost precision
                    t = dpd.mul_(pd)
                    ds = torch.addcmul(t, pr, t.sum(-1, keepdim=True), value=-1)  # (c, rb, r1), also / dscale
                else:
                    ds = torch._softmax_backward_data(dpd.mul_(keeps[b][i:j]), pr, -1, q.dtype)  # fp32 inside
                torch.bmm(ds, k[i:j, :r1], out=dq[i:j, r0:r1])  # (c, rb, hd)
                _add_bmm(dk[i:j, :r1], ds.transpose(1, 2), q[i:j, r0:r1])  # (c, r1, hd)
        f = dscale * hd**-0.5
        return dq.mul_(f), dk.mul_(f), dv.mul_(dscale), None, None, None


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


def _masked_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scores: int) -> Tensor:
    """(BH, T, hd) queries, (BH, S, hd) keys and values, an additive mask ``bias`` ((T, S) for every head, or one
    (BH, T, S) per head) -> (BH, T, hd): scores, softmax and product a few heads (about ``scores`` scores) at a time,
    no dropout or gradients. The softmax of half types accumulates in fp32 inside the kernel."""
    BH, T, hd = q.shape
    S = k.shape[1]
    out = torch.empty_like(q)
    c = _chunk(BH, T, S, scores=scores)
    for i in range(0, BH, c):
        j = min(BH, i + c)
        b = bias if bias.dim() == 2 else bias[i:j]
        s = torch.baddbmm(b, q[i:j], k[i:j].transpose(1, 2), alpha=hd**-0.5)  # (c, T, S)
        torch.bmm(torch._softmax(s, -1, False), v[i:j], out=out[i:j])  # (c, T, hd)
    return out


def _short_attention(q: Tensor, k: Tensor, v: Tensor, scores: int = 1 << 18) -> Tensor:
    """Causal attention without dropout or gradients, (BH, T, hd) queries of the last T of S positions, (BH, S, hd)
    keys and values -> (BH, T, hd), a few heads (about ``scores`` scores) at a time.

    Why: at short T PyTorch's CPU flash kernel spends its time on per-block bookkeeping; here every pass over a
    chunk's scores (about 256K of them, 1 MiB in fp32, measured best) stays in the L2 cache. The softmax of half
    types accumulates in fp32 inside the kernel, as in ``_StoredAttention``."""
    T, S = q.shape[1], k.shape[1]
    return _masked_attention(q, k, v, _bias(T, S - T, S, q.device, q.dtype), scores)  # query t: keys to S - T + t


def suffix_attention(q: Tensor, k: Tensor, v: Tensor, dropout_p: float, training: bool) -> Tensor:
    """(B, H, T, hd) queries of the last T of S positions, (B, H, S, hd) keys and values -> (B, H, T, hd): query t
    sees keys up to S - T + t (evaluation's context window, queries after cached positions).

    Why: PyTorch's CPU flash kernel with an explicit mask took 1.25-1.35x the time of scores, softmax and product
    a few heads at a time (``_short_attention``, 1M scores per chunk: measured best of 64K-1M) at the fixture's
    evaluation shape (8 x 4 heads, 128 queries over 256 keys, head dim 32; Zen 5, natively and under the AVX2 caps),
    1.05-1.14x with 16 heads of 512 queries over 3,072 keys (the paper's evaluation), but 0.96-0.98x with 1,024
    queries over 2,048 keys: from ``SUFFIX_MAX_SCORES`` scores per head on, SDPA. Training (dropout or gradients) and
    plain kernels: SDPA with the mask."""
    p = dropout_p if training else 0.0
    B, H, T, hd = q.shape
    S = k.shape[2]
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if not ours(q) or p > 0.0 or grad or T * S >= SUFFIX_MAX_SCORES:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)  # (T, S)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else q.dtype
    with torch.autocast("cpu", enabled=False):
        qf = q.to(dtype).reshape(B * H, T, hd).contiguous()  # (BH, T, hd)
        kf, vf = (t.to(dtype).reshape(B * H, S, hd).contiguous() for t in (k, v))  # (BH, S, hd)
        return _short_attention(qf, kf, vf, scores=1 << 20).view(B, H, T, hd)


def prefix_attention(q: Tensor, k: Tensor, v: Tensor, prefix_lens: Tensor) -> Tensor:
    """(B, H, T, hd) queries of T new positions, (B, H, P + T, hd) keys and values whose first P slots hold each
    row's earlier positions (row b's first ``prefix_lens[b]`` of them; the rest is padding) -> (B, H, T, hd): new
    position t of row b sees that row's ``prefix_lens[b]`` earlier keys and the new keys up to t. No dropout or
    gradients (inference).

    Why: rescoring computes a hypothesis only after the prefix it shares with one already scored
    (``inference.scoring``), and the rows of a batch share prefixes of different lengths. Scores, masked
    softmax and the product a few heads at a time, as ``_short_attention``, the additive mask made for about 1M
    scores at a time; from ``SUFFIX_MAX_SCORES`` scores per head on (hypotheses of thousands of words) and with the
    plain kernels, SDPA with the mask."""
    B, H, T, hd = q.shape
    S = k.shape[2]
    j = torch.arange(S, device=q.device)  # (S,) key slots
    t = torch.arange(T, device=q.device)  # (T,) new positions
    new = j - (S - T)  # (S,) slots P.. hold the new positions 0..
    seen = (j[None, None, :] < prefix_lens[:, None, None]) | (
        (new[None, None, :] >= 0) & (new[None, None, :] <= t[None, :, None])
    )  # (B, T, S): the row's own earlier positions, and the new ones up to t
    if not ours(q) or T * S >= SUFFIX_MAX_SCORES:  # long rows: SDPA's kernel, no (T, S) scores per head kept
        return F.scaled_dot_product_attention(q, k, v, attn_mask=seen[:, None])
    out = torch.empty_like(q)  # (B, H, T, hd)
    step = max(1, (1 << 20) // (H * T * S))  # rows whose additive mask is made at once: about 1M scores
    for b in range(0, B, step):
        e = min(B, b + step)
        bias = torch.zeros(seen[b:e].shape, dtype=q.dtype, device=q.device).masked_fill_(~seen[b:e], float("-inf"))
        bias = bias.repeat_interleave(H, dim=0)  # (rows * H, T, S)
        qf = q[b:e].reshape(-1, T, hd)  # (rows * H, T, hd)
        kf, vf = (x[b:e].reshape(-1, S, hd) for x in (k, v))  # (rows * H, S, hd)
        out[b:e] = _masked_attention(qf, kf, vf, bias, scores=1 << 18).view(e - b, H, T, hd)
    return out


def one_query_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """(B, H, 1, hd), (B, H, S, hd) x2 -> (B, H, 1, hd): one new query over every cached key (a decoding step), no
    dropout. Why not SDPA: for one query its CPU kernels cost 1.5-2.2x two batched products and a softmax (Zen 4,
    80 beam rows, S = 20-120 cached keys)."""
    if not ours(q):
        return F.scaled_dot_product_attention(q, k, v)
    s = torch.matmul(q, k.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)  # (B, H, 1, S)
    return torch.matmul(torch.softmax(s, -1), v)  # (B, H, 1, hd)


def _query_block_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """(BH, T, hd) x3 -> (BH, T, hd), causal, no dropout or gradients: queries in blocks of ``INFERENCE_BLOCK``,
    each over the keys up to its last query (``_short_attention``)."""
    BH, T, hd = q.shape
    out = torch.empty_like(q)
    for s in range(0, T, INFERENCE_BLOCK):
        e = min(T, s + INFERENCE_BLOCK)
        out[:, s:e] = _short_attention(q[:, s:e], k[:, :e], v[:, :e])  # (BH, e - s, hd)
    return out


def causal_attention(q: Tensor, k: Tensor, v: Tensor, dropout_p: float, training: bool) -> Tensor:
    """(B, H, T, hd) x3 -> (B, H, T, hd), causal, with attention dropout when training."""
    p = dropout_p if training else 0.0
    B, H, T, hd = q.shape
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    short = p == 0.0 and not grad and T <= SHORT_T_MAX
    middle = p == 0.0 and not grad and SHORT_T_MAX < T <= BLOCKS_T_MAX
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else q.dtype

    def sdpa() -> Tensor:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)

    def own() -> Tensor:
        with torch.autocast("cpu", enabled=False):
            qf, kf, vf = (t.to(dtype).reshape(B * H, T, hd).contiguous() for t in (q, k, v))
            if short:
                out = _short_attention(qf, kf, vf)
            elif middle:
                out = _query_block_attention(qf, kf, vf)
            elif B * H * T * T <= MATH_PATH_MAX_SCORES:  # small: keep the T x T probabilities rather than recompute
                out = _StoredAttention.apply(qf, kf, vf, p, _new_seed(), stored_block(qf, kf, vf, p))
            else:
                out = _CausalAttention.apply(qf, kf, vf, p, _new_seed())
        return out.view(B, H, T, hd)

    if not ours(q) or (p == 0.0 and not short and not middle):
        return sdpa()
    if middle:  # PyTorch's kernel or query blocks, as measured for the shape (T rounded up to whole blocks)
        runs = {"sdpa": sdpa, "blocks": own}
        width = -(-T // INFERENCE_BLOCK) * INFERENCE_BLOCK
        return runs[CHOICE.pick(f"causal-{str(dtype)[6:]}", B * H, width, hd, runs, linear=False)]()
    return own()
