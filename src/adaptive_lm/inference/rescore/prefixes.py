"""Scoring hypotheses that share prefixes: each one is computed only after the longest prefix it shares with a
hypothesis scored before it, whose keys, values and position scores it reuses.

Why: the hypotheses of an n-best list differ in a few words, so most of them repeat the first words of another.
A causal model's states at a shared prefix are the same in both, and so are the position scores there. On
``benchmarks/bench_rescore.py``'s lists (word-level edits of WikiText sentences) about a fifth of the positions are
not computed again. The numbers are those of scoring each hypothesis whole, up to the rounding of different batch
shapes (the fp32 bound of the tests).

How: the hypotheses are sorted (their framed tokens, lexicographically); each one's parent is the earliest earlier
hypothesis with which it shares its longest prefix, found for all at once with a stack (the previous smaller
common-prefix length). A hypothesis that shares fewer than ``MIN_SHARED`` scored positions is computed whole, and
all are when fewer than ``MIN_SAVED`` of the positions would be shared. The rows then run in waves, a parent's wave
before its children's, in batches of the part after the shared prefix (``suffix_batches``); each layer's cache holds
the parents' keys and values of the shared positions (``TransformerLM.forward``'s ``prefix_lens``,
``kernels.prefix_attention``). The sorted order is cut into segments whose kept keys and values fit ``CACHE_BYTES``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

MIN_SHARED = 4  # scored positions: sharing fewer, a hypothesis is computed whole (measured: 1 and 4 save the same)
CACHE_BYTES = 256 << 20  # keys and values kept for a segment of the sorted hypotheses
MIN_SAVED = 0.12  # of the positions: sharing fewer, every hypothesis is scored whole (break-even measured ~0.12)
PLAN_ROWS = 4096  # sorted hypotheses compared with their predecessors at a time (``plan``)
GROUP_WIDTHS = 64  # distinct suffix widths one batch group may span (``suffix_batches``)


def framed(ids: Sequence[Sequence[int]], start: int, eos: int, score_eos: bool) -> list[list[int]]:
    """Each sentence as the model reads and scores it: ``<start> w1 .. wn`` (then ``</s>`` with ``score_eos``); its
    positions are the first n (n + 1) tokens and their targets the next ones (``framing.frame``)."""
    end = [eos] if score_eos else []
    return [[start, *x, *end] for x in ids]


def plan(seqs: Sequence[Sequence[int]], n: np.ndarray, min_shared: int = MIN_SHARED) -> tuple[np.ndarray, ...]:
    """(order, parent, shared): the hypotheses in sorted order; for each (by index), the hypothesis whose first
    ``shared`` position scores and keys it reuses (-1: none, ``shared`` 0). ``seqs``: framed tokens (``framed``),
    ``n``: scored positions of each.

    Two framed sequences with a common prefix of L tokens agree on their first L - 1 positions (inputs and targets):
    ``shared = min(L - 1, n)``; ``shared == n`` (a duplicate, or a prefix without ``</s>``) leaves nothing to
    compute."""
    N = len(seqs)
    order = np.array(sorted(range(N), key=seqs.__getitem__), dtype=np.int64)  # (N,)
    common = np.zeros(N, dtype=np.int64)  # (N,) common prefix length with the previous sorted sequence
    lens = np.array([len(seqs[i]) for i in order.tolist()], dtype=np.int64)  # (N,) in sorted order
    for a in range(0, N - 1, PLAN_ROWS):  # sorted rows a .. b against their predecessors, as padded matrices
        b = min(N, a + PLAN_ROWS + 1)
        width = int(lens[a:b].max())
        m = np.full((b - a, width), -1, dtype=np.int64)  # (rows, width)
        ln = lens[a:b]
        flat = np.fromiter(itertools.chain.from_iterable(seqs[i] for i in order[a:b].tolist()), np.int64, int(ln.sum()))
        m[np.repeat(np.arange(b - a), ln), np.arange(len(flat)) - np.repeat(np.cumsum(ln) - ln, ln)] = flat
        differ = m[1:] != m[:-1]  # (rows - 1, width)
        first = np.where(differ.any(axis=1), differ.argmax(axis=1), width)  # (rows - 1,)
        common[a + 1 : b] = np.minimum(first, np.minimum(lens[a : b - 1], lens[a + 1 : b]))
    c, o, scored = common.tolist(), order.tolist(), n.tolist()
    parent, shared = [-1] * N, [0] * N
    stack: list[int] = [0]  # sorted positions of increasing ``common`` (the first's 0 stays): previous smaller ones
    for a in range(1, N):
        ca = c[a]
        while len(stack) > 1 and c[stack[-1]] >= ca:
            stack.pop()
        first = stack[-1]  # the first sorted sequence sharing ``common[a]`` tokens with this one: its parent
        stack.append(a)
        i = o[a]
        s = min(ca - 1, scored[i])
        if s > 0 and (s >= min_shared or s == scored[i]):
            parent[i], shared[i] = o[first], s
    return order, np.array(parent, dtype=np.int64), np.array(shared, dtype=np.int64)


def suffix_batches(
    widths: np.ndarray, max_tokens: int, per_batch: float, max_sentences: int | None = None
) -> list[np.ndarray]:
    """Indices grouped into batches of at most ``max_tokens`` padded positions (and ``max_sentences`` rows), widest
    first, grouped so that the padded positions plus ``per_batch`` positions' worth of fixed cost per batch are
    fewest (a group spans at most ``GROUP_WIDTHS`` distinct widths: the search stays small for long sentences).

    Why: a wave's suffixes have lengths from 1 to the longest sentence; filling batches up to ``max_tokens`` in
    length order (``score.length_batches``) pads a few hundred rows to the widest one when a wave is small (a large
    model's segments are small), and a batch per length costs each batch's fixed work when it is large. Dynamic
    programming over the distinct widths (a group is a run of widths, padded to its widest, cut into batches)."""
    order = np.argsort(-widths, kind="stable")
    w, counts = np.unique(widths[order], return_counts=True)
    w, counts = w[::-1], counts[::-1]  # widest first
    K = len(w)
    best = np.full(K + 1, np.inf)
    best[0], cut = 0.0, np.zeros(K + 1, dtype=np.int64)
    for k in range(1, K + 1):
        rows = 0
        for i in range(k - 1, max(-1, k - 1 - GROUP_WIDTHS), -1):  # the group of widths i .. k - 1, padded to w[i]
            rows += int(counts[i])
            width = max(1, int(w[i]))
            per = min(max(1, max_tokens // width), max_sentences or max_tokens)
            cost = best[i] + -(-rows // per) * per_batch + rows * width
            if cost < best[k]:
                best[k], cut[k] = cost, i
    groups, k = [], K
    while k > 0:
        groups.append((int(cut[k]), k))
        k = int(cut[k])
    batches, start = [], 0
    for i, k in reversed(groups):  # each group in batches of as many rows as its widest allows
        rows = int(counts[i:k].sum())
        per = min(max(1, max_tokens // max(1, int(w[i]))), max_sentences or max_tokens)
        batches += [order[start + a : start + min(rows, a + per)] for a in range(0, rows, per)]
        start += rows
    return batches


def _batch_cost(model: Any) -> float:
    """A batch's fixed cost in positions' worth of work: about 1 ms of per-call work (tens of operators per layer)
    over a position's FLOPs at 200 GFLOP/s (its layers' and the softmax head's multiply-adds)."""
    layers = sum(p.numel() for p in model.layers.parameters())
    head = model.cfg.decoder_output_dim * (model.cfg.adaptive_softmax_cutoff or [model.cfg.vocab_size])[0]
    return max(1.0, 2e8 / (2.0 * (layers + head)))


class _Store:
    """One wave's parent hypotheses' keys and values, every layer, (positions, H, hd): each parent's positions in
    order, one after the other; what the next wave's hypotheses read their shared prefixes from."""

    def __init__(self, positions: int) -> None:
        self.total = positions
        self.filled = 0
        self.start: dict[int, int] = {}  # segment index -> its first row in the store
        self.kv: list[Tensor] = []  # every layer's keys, then every layer's values

    def put(
        self, cache: list[dict[str, Tensor]], who: np.ndarray, seg: np.ndarray, P: np.ndarray, lens: np.ndarray
    ) -> None:
        """Keep the first ``lens`` (B,) positions' keys and values of batch rows ``who`` (parents, segment indices
        ``seg``): in the layer caches (B, H, Pm + T, hd), row b's position p sits at slot p below its ``P[b]`` shared
        positions, at Pm + p - ``P[b]`` from there on."""
        tensors = [c["k"] for c in cache] + [c["v"] for c in cache]
        _, H, S, hd = tensors[0].shape
        Pm = int(P.max())
        ln = lens[who]
        b = np.repeat(who, ln)  # (M,) batch row of each kept position
        p = np.arange(int(ln.sum())) - np.repeat(np.cumsum(ln) - ln, ln)  # (M,) its position
        slot = np.where(p < P[b], p, Pm + p - P[b])  # (M,)
        if not self.kv:
            self.kv = [t.new_empty(self.total, H, hd) for t in tensors]
        self.start.update(zip(seg.tolist(), (self.filled + np.cumsum(ln) - ln).tolist()))
        rows = slice(self.filled, self.filled + len(b))
        self.filled += len(b)
        for store, t in zip(self.kv, tensors):
            flat, first = _rows(t)  # (R, hd) rows over t's storage; (B, H, S) -> the row of element [b, h, s, 0]
            idx = first(b[:, None], np.arange(H)[None, :], slot[:, None])  # (M, H)
            index = torch.from_numpy(idx.reshape(-1)).to(t.device)
            torch.index_select(flat, 0, index, out=store[rows].view(-1, hd))  # (M * H, hd)

    def get(self, parents: np.ndarray, P: np.ndarray) -> list[Tensor]:
        """Every layer's keys, then values, (B, H, max P, hd): the ``parents``' first ``P`` positions (then
        padding)."""
        Pm = int(P.max())
        start = np.array([self.start[j] for j in parents.tolist()], dtype=np.int64)  # (B,)
        p = np.arange(Pm)[None, :]  # (1, Pm)
        idx = start[:, None] + np.where(p < P[:, None], p, 0)  # (B, Pm) padding reads position 0 (masked)
        index = torch.from_numpy(idx.reshape(-1)).to(self.kv[0].device)
        B, (_, H, hd) = len(parents), self.kv[0].shape
        return [t.index_select(0, index).view(B, Pm, H, hd).transpose(1, 2) for t in self.kv]


def _rows(t: Tensor) -> tuple[Tensor, Any]:
    """``t`` (B, H, S, hd), contiguous in its last dim, as (rows, hd) over its storage, and the row of [b, h, s].

    Why: a layer's keys and values are either a view into the fused q/k/v projection's output (no cache before) or a
    fresh concatenation; gathering rows of either needs no copy of the whole tensor first."""
    hd = t.shape[3]
    st = t.stride()
    if st[3] != 1 or any(x % hd for x in (*st[:3], t.storage_offset())):
        t = t.contiguous()
        st = t.stride()
    n = (t.untyped_storage().nbytes() // t.element_size()) // hd
    flat = t.as_strided((n, hd), (hd, 1), 0)
    off = t.storage_offset() // hd
    return flat, lambda b, h, s: off + (b * st[0] + h * st[1] + s * st[2]) // hd


@torch.no_grad()
def shared_prefix_logprobs(
    lm: Any,
    ids: Sequence[Sequence[int]],
    score_eos: bool,
    max_tokens: int,
    bar: Any,
    max_sentences: int | None = None,
    min_shared: int | None = None,
) -> np.ndarray | None:
    """Natural-log probability of each sentence, as ``score.sentence_logprobs`` (float64 sums of the float32 position
    scores), computing each hypothesis after the prefix it shares with an earlier one (module docstring). None, with
    nothing computed, when fewer than ``MIN_SAVED`` of the positions are shared: then the waves, the longer key rows
    and the kept keys and values cost more than they save (sentences of running text share 1%: 6% slower)."""
    model, d = lm.model, lm.dictionary
    seqs = framed(ids, lm.start_token, d.eos(), score_eos)
    n = np.array([len(s) - 1 for s in seqs], dtype=np.int64)  # (N,) scored positions
    out = np.zeros(len(ids), dtype=np.float64)
    order, parent, shared = plan(seqs, n, MIN_SHARED if min_shared is None else min_shared)
    if shared.sum() < MIN_SAVED * n.sum():
        return None
    per_token = len(model.layers) * 2 * model.cfg.decoder_embed_dim * next(model.parameters()).element_size()
    need = np.zeros(len(ids), dtype=np.int64)  # (N,) positions each one's children read (fewer if cut off)
    np.maximum.at(need, parent[parent >= 0], shared[parent >= 0])
    csum = np.cumsum(need[order])  # (N,) kept positions up to each sorted hypothesis
    per_batch = _batch_cost(model)
    start = 0
    while start < len(order):
        before = int(csum[start - 1]) if start else 0
        stop = max(start + 1, int(np.searchsorted(csum, before + CACHE_BYTES // per_token, side="right")))
        _segment(lm, seqs, order[start:stop], parent, shared, n, (max_tokens, max_sentences), per_batch, out, bar)
        start = stop
    return out


def _segment(
    lm: Any,
    seqs: Sequence[Sequence[int]],
    rows: np.ndarray,
    parent: np.ndarray,
    shared: np.ndarray,
    n_all: np.ndarray,
    limits: tuple[int, int | None],
    per_batch: float,
    out: np.ndarray,
    bar: Any,
) -> None:
    """Score hypotheses ``rows`` (consecutive in sorted order; a parent outside them is not used), wave by wave."""
    local = dict(zip(rows.tolist(), range(len(rows))))
    par = np.array([local.get(p, -1) for p in parent[rows].tolist()], dtype=np.int64)  # (N,) segment index or -1
    P = np.where(par >= 0, shared[rows], 0)  # (N,) positions taken from the parent
    n = n_all[rows]
    wave = [0] * len(rows)
    for j, p in enumerate(par.tolist()):  # sorted order: a parent comes before its children
        if p >= 0:
            wave[j] = wave[p] + 1
    waves = np.array(wave, dtype=np.int64)
    has = par >= 0
    need = np.zeros(len(rows), dtype=np.int64)  # (N,) positions a hypothesis' children read: its largest child's P
    np.maximum.at(need, par[has], P[has])
    is_parent = need > 0
    cum = np.zeros((len(rows), int(n.max()) + 1), dtype=np.float64)  # (N, W + 1) sums of the first p scores
    store: _Store | None = None
    for w in range(int(waves.max()) + 1):
        sel = np.nonzero(waves == w)[0]
        sel = sel[np.argsort(-P[sel], kind="stable")]  # batches of one suffix length: similar prefix lengths
        keep = sel[is_parent[sel]]
        cur = _Store(int(need[keep].sum())) if len(keep) else None
        for batch in suffix_batches(n[sel] - P[sel], limits[0], per_batch, limits[1]):
            j = sel[batch]
            _batch(lm, seqs, rows[j], j, par[j], P[j], n[j], store, cur, need[j], cum, out)
            bar.update(len(j))
        store = cur


def _suffixes(
    seqs: Sequence[Sequence[int]], rows: np.ndarray, P: np.ndarray, n: np.ndarray, T: int, pad: int
) -> tuple[Tensor, Tensor]:
    """Inputs and targets (B, T) of positions ``P`` .. ``n`` - 1 of each framed sequence, right-padded."""
    ln = n - P + 1  # (B,) tokens from position P on: T_b inputs, the last only a target
    flat = np.fromiter(
        itertools.chain.from_iterable(seqs[r][p:] for r, p in zip(rows.tolist(), P.tolist())), np.int64, int(ln.sum())
    )  # (sum ln,)
    row = np.repeat(np.arange(len(rows)), ln)
    col = np.arange(len(flat)) - np.repeat(np.cumsum(ln) - ln, ln)  # (sum ln,) index from position P on
    src = np.full((len(rows), T + 1), pad, dtype=np.int64)  # (B, T + 1): the last column only as room
    tgt = np.full((len(rows), T + 1), pad, dtype=np.int64)
    last = col == ln[row] - 1
    src[row[~last], col[~last]] = flat[~last]
    tgt[row[col > 0], col[col > 0] - 1] = flat[col > 0]
    return torch.from_numpy(src[:, :T]), torch.from_numpy(tgt[:, :T])


def _batch(
    lm: Any,
    seqs: Sequence[Sequence[int]],
    rows: np.ndarray,
    j: np.ndarray,
    par: np.ndarray,
    P: np.ndarray,
    n: np.ndarray,
    store: _Store | None,
    cur: _Store | None,
    need: np.ndarray,
    cum: np.ndarray,
    out: np.ndarray,
) -> None:
    """Score batch rows ``rows`` (segment indices ``j``) after their ``P`` (B,) positions shared with ``par``, into
    ``out``; keep the first ``need`` (B,) positions' keys and values of the parents in ``cur``, their score sums in
    ``cum``."""
    keep = need > 0
    model, d = lm.model, lm.dictionary
    device = next(model.parameters()).device
    pad, layers = d.pad(), len(model.layers)
    B, T = len(rows), int((n - P).max())
    own = np.zeros((B, max(T, 0)), dtype=np.float64)  # (B, T) the computed position scores
    if T > 0:
        src, tgt = _suffixes(seqs, rows, P, n, T, pad)  # (B, T) each
        cols = torch.from_numpy(P)[:, None] + torch.arange(T)[None, :]  # (B, T) positions
        valid = torch.arange(T)[None, :] < torch.from_numpy(n - P)[:, None]  # (B, T) scored positions
        cache, positions, prefix_lens = None, None, None
        if P.max() > 0:
            assert store is not None
            kv = store.get(par, P)
            cache = [{"k": kv[i], "v": kv[layers + i]} for i in range(layers)]
            positions = (cols + pad + 1).masked_fill_(~valid, pad).to(device)  # (B, T)
            prefix_lens = torch.from_numpy(P).to(device)
        elif cur is not None and keep.any():
            cache = [{} for _ in range(layers)]
        feats = model(src.to(device), cache=cache, positions=positions, prefix_lens=prefix_lens)  # (B, T, d)
        lp = model.target_log_probs_from_features(feats[valid.to(device)], tgt[valid].to(device))  # (N,)
        own[valid.numpy()] = lp.double().cpu().numpy()
        if cur is not None and keep.any():
            assert cache is not None
            who = np.nonzero(keep)[0]
            cur.put(cache, who, j[who], P, need)
    has = par >= 0
    base = np.where(has, cum[np.maximum(par, 0), P], 0.0)  # (B,) the parents' sums of the shared positions
    out[rows] = base + own.sum(axis=1)
    if keep.any():  # sums of the first p scores: the parent's up to P, then this row's own
        k = np.nonzero(keep)[0]
        p = np.arange(cum.shape[1])[None, :]  # (1, W + 1)
        inherited = np.where(has[k, None], cum[np.maximum(par[k], 0)[:, None], np.minimum(p, P[k, None])], 0.0)
        own_c = np.concatenate([np.zeros((len(k), 1)), np.cumsum(own[k], axis=1)], axis=1)  # (K, T + 1)
        cum[j[k]] = inherited + own_c[np.arange(len(k))[:, None], np.clip(p - P[k, None], 0, T)]
