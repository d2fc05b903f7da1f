"""Position scores of many sentences at once, for rescoring (``rescore.sentence_logprobs``) and the hub's
``LanguageModel.score``: length-sorted batches, and sentences that share prefixes computed once.

Shared prefixes. Why: the hypotheses of an n-best list differ in a few words, so most of them repeat the first words
of another. A causal model's states at a shared prefix are the same in both, and so are the position scores there.
On ``benchmarks/bench_rescore.py``'s lists (word-level edits of WikiText sentences) about a fifth of the positions
are not computed again. The numbers are those of scoring each sentence whole, up to the rounding of different batch
shapes (the fp32 bound of the tests).

How: the sentences are sorted (their framed tokens, lexicographically); each one's parent is the earliest earlier
sentence with which it shares its longest prefix, found for all at once with a stack (the previous smaller
common-prefix length). A sentence that shares fewer than ``MIN_SHARED`` scored positions is computed whole, and all
are when fewer than ``MIN_SAVED`` of the positions would be shared (then length-sorted batches, ``length_batches``).
The rows run in waves, a parent's wave before its children's, in batches of the part after the shared prefix
(``suffix_batches``); each layer's cache holds the parents' keys and values of the shared positions
(``TransformerLM.forward``'s ``prefix_lens``, ``kernels.prefix_attention``), and a row's shared positions' scores are
copied from its parent's. The sorted order is cut into segments whose kept keys and values fit ``CACHE_BYTES``.

Output (``position_scores``): every sentence's float32 position scores, one after the other in input order (a flat
array and each sentence's offset), as ``LanguageModel.score`` returns them one sentence at a time.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from adaptive_lm.core.errors import UserError
from adaptive_lm.inference.framing import frame, ragged

MIN_SHARED = 4  # scored positions: sharing fewer, a hypothesis is computed whole (measured: 1 and 4 save the same)
CACHE_BYTES = 256 << 20  # keys and values kept for a segment of the sorted hypotheses
MIN_SAVED = 0.12  # of the positions: sharing fewer, every hypothesis is scored whole (break-even measured ~0.12)
GROUP_WIDTHS = 64  # distinct suffix widths one batch group may span (``suffix_batches``)


def framed(ids: Sequence[Sequence[int]], start: int, eos: int, score_eos: bool) -> list[list[int]]:
    """Each sentence as the model reads and scores it: ``<start> w1 .. wn`` (then ``</s>`` with ``score_eos``); its
    positions are the first n (n + 1) tokens and their targets the next ones (``framing.frame``)."""
    end = [eos] if score_eos else []
    return [[start, *x, *end] for x in ids]


def check_inputs(lm: Any, ids: Sequence[Sequence[int]], max_sentences: int | None = None, max_tokens: int = 1) -> None:
    """Refuse, with one line, what would otherwise score garbage or fail deep inside the model: a batch limit below
    one, a word id outside the model's vocabulary (as a target it would be scored silently), a sentence that with its
    ``</s>`` exceeds the model's positions (fairseq's hub refuses it; a learned position table cannot embed it).
    ``ids``: each sentence's word ids."""
    if max_sentences is not None and max_sentences < 1:
        raise UserError(f"the batch size must be a positive number of sentences (None: no limit), not {max_sentences}")
    if max_tokens < 1:
        raise UserError(f"max_tokens must be positive, not {max_tokens}")
    if not ids:
        return
    lens = np.fromiter((len(x) for x in ids), np.int64, len(ids))  # (N,) words
    flat = np.fromiter(itertools.chain.from_iterable(ids), np.int64, int(lens.sum()))
    V = lm.model.cfg.vocab_size
    bad = (flat < 0) | (flat >= V)
    if bad.any():
        first = int(np.searchsorted(np.cumsum(lens), int(np.argmax(bad)), side="right"))
        raise UserError(f"sentence {first + 1}: {int(bad.sum())} word ids outside the model's vocabulary [0, {V})")
    limit = lm.model.cfg.max_target_positions
    if int(lens.max()) + 1 > limit:
        first = int(np.argmax(lens + 1 > limit))
        raise UserError(
            f"sentence {first + 1} has {int(lens[first])} tokens: with its </s> more than the model's {limit} "
            "positions (fairseq's hub refuses it too); split it into shorter pieces, or for a document's perplexity "
            "in sliding windows save it as DIR/valid beside the model's dict.txt and run `adaptive-lm eval DIR "
            "--gen-subset valid --dataset-impl raw --context-window C`"
        )


def plan(seqs: Sequence[Sequence[int]], n: np.ndarray, min_shared: int = MIN_SHARED) -> tuple[np.ndarray, ...]:
    """(order, parent, shared): the hypotheses in sorted order; for each (by index), the hypothesis whose first
    ``shared`` position scores and keys it reuses (-1: none, ``shared`` 0). ``seqs``: framed tokens (``framed``),
    ``n``: scored positions of each.

    Two framed sequences with a common prefix of L tokens agree on their first L - 1 positions (inputs and targets):
    ``shared = min(L - 1, n)``; ``shared == n`` (a duplicate, or a prefix without ``</s>``) leaves nothing to
    compute."""
    N = len(seqs)
    order = np.array(sorted(range(N), key=seqs.__getitem__), dtype=np.int64)  # (N,)
    lens = np.array([len(seqs[i]) for i in order.tolist()], dtype=np.int64)  # (N,) in sorted order
    flat = np.fromiter(itertools.chain.from_iterable(seqs[i] for i in order.tolist()), np.int64, int(lens.sum()))
    starts = np.cumsum(lens) - lens  # (N,)
    m = np.minimum(lens[:-1], lens[1:])  # (N - 1,) each sorted sequence against the next, up to the shorter's length
    pair, col = ragged(m)  # (sum m,) flat memory: one long sequence costs its length, not rows x its length
    differ = flat[starts[:-1][pair] + col] != flat[starts[1:][pair] + col]  # (sum m,)
    common = np.zeros(N, dtype=np.int64)  # (N,) common prefix length with the previous sorted sequence
    common[1:] = m
    hit = pair[differ]
    firsts, at = np.unique(hit, return_index=True)  # each pair's first differing place (places ascend in a pair)
    common[1:][firsts] = col[differ][at]
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


def _rows_per_batch(width: int, max_tokens: int, max_sentences: int | None) -> int:
    """Rows of ``width`` positions in a batch of at most ``max_tokens`` padded positions and ``max_sentences`` rows
    (one row at least)."""
    n = max(1, max_tokens // max(1, width))
    return min(n, max_sentences) if max_sentences else n


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
            per = _rows_per_batch(int(w[i]), max_tokens, max_sentences)
            cost = best[i] + -(-rows // per) * per_batch + rows * max(1, int(w[i]))
            if cost < best[k]:
                best[k], cut[k] = cost, i
    groups, k = [], K
    while k > 0:
        groups.append((int(cut[k]), k))
        k = int(cut[k])
    batches, start = [], 0
    for i, k in reversed(groups):  # each group in batches of as many rows as its widest allows
        rows = int(counts[i:k].sum())
        per = _rows_per_batch(int(w[i]), max_tokens, max_sentences)
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
        row, p = ragged(ln)  # (M,) each kept position's parent and the position
        b = who[row]  # (M,) its batch row
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


def length_batches(lengths: Sequence[int], max_tokens: int, max_sentences: int | None = None) -> list[np.ndarray]:
    """Indices grouped into batches of similar length, longest first, each at most ``max_tokens`` padded positions.

    Why longest first: the largest batch shape is met at once (memory peak known from the start, the allocator
    reuses its blocks for the smaller ones)."""
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        n = _rows_per_batch(int(lengths[order[start]]), max_tokens, max_sentences)  # sorted: the first is the widest
        batches.append(order[start : start + n])
        start += n
    return batches


def _ranges(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """The indices ``starts[i] .. starts[i] + lens[i] - 1`` of every i, one after the other."""
    row, col = ragged(lens)
    return starts[row] + col


@torch.no_grad()
def position_scores(
    lm: Any,
    ids: Sequence[Sequence[int]],
    score_eos: bool = False,
    max_tokens: int = 4096,
    max_sentences: int | None = None,
    bar: Any = None,
    share_prefixes: bool = True,
    min_shared: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, offsets): the float32 ln p of every scored position of every sentence (word ids, no ``</s>``), one
    sentence after the other in input order, sentence i's at ``scores[offsets[i] : offsets[i + 1]]``; framed as
    ``framing.frame`` frames it (``<start> w1 .. wn``, targets ``w1 .. wn``, then ``</s>`` with ``score_eos``).

    Batches of at most ``max_tokens`` padded positions (and ``max_sentences`` rows), the softmax only for the scored
    positions (``target_log_probs_from_features``: no (N, V) tensor, nothing for padding). ``share_prefixes``: each
    sentence computed after the prefix it shares with an earlier one when enough are shared (module docstring);
    otherwise each whole, in length-sorted batches. ``bar``: a progress bar, advanced by sentences."""
    d = lm.dictionary
    check_inputs(lm, ids, max_sentences, max_tokens)
    seqs = framed(ids, lm.start_token, d.eos(), score_eos)
    n = np.array([len(s) - 1 for s in seqs], dtype=np.int64)  # (N,) scored positions
    offsets = np.concatenate([[0], np.cumsum(n)])  # (N + 1,)
    scores = np.zeros(int(offsets[-1]), dtype=np.float32)
    todo = np.nonzero(n > 0)[0]  # an empty sentence without </s> scores nothing
    if bar is not None:
        bar.update(len(ids) - len(todo))
    if share_prefixes and len(todo):
        order, parent, shared = plan(seqs, n, MIN_SHARED if min_shared is None else min_shared)
        if shared.sum() >= MIN_SAVED * n.sum():
            _shared(lm, seqs, order[n[order] > 0], parent, shared, n, offsets, scores, (max_tokens, max_sentences), bar)
            return scores, offsets
    _whole(lm, ids, todo, n, score_eos, offsets, scores, (max_tokens, max_sentences), bar)
    return scores, offsets


def _whole(
    lm: Any,
    ids: Sequence[Sequence[int]],
    todo: np.ndarray,
    n: np.ndarray,
    score_eos: bool,
    offsets: np.ndarray,
    scores: np.ndarray,
    limits: tuple[int, int | None],
    bar: Any,
) -> None:
    """Every sentence ``todo`` whole, in length-sorted batches, its scores into ``scores``."""
    model, d = lm.model, lm.dictionary
    device = next(model.parameters()).device
    for batch in length_batches(n[todo], *limits):
        rows = todo[batch]
        src, tgt, m = frame([ids[i] for i in rows.tolist()], lm.start_token, d.pad(), d.eos(), score_eos)
        valid = torch.arange(src.shape[1])[None, :] < m[:, None]  # (B, W) the scored positions
        feats = model(src.to(device))  # (B, W, d)
        lp = model.target_log_probs_from_features(feats[valid.to(device)], tgt[valid].to(device))  # (N,) row-major
        scores[_ranges(offsets[rows], n[rows])] = lp.float().cpu().numpy()
        if bar is not None:
            bar.update(len(rows))


def _shared(
    lm: Any,
    seqs: Sequence[Sequence[int]],
    order: np.ndarray,
    parent: np.ndarray,
    shared: np.ndarray,
    n: np.ndarray,
    offsets: np.ndarray,
    scores: np.ndarray,
    limits: tuple[int, int | None],
    bar: Any,
) -> None:
    """The sentences in sorted ``order``, each after its ``shared`` positions with ``parent``, segment by segment."""
    model = lm.model
    per_token = len(model.layers) * 2 * model.cfg.decoder_embed_dim * next(model.parameters()).element_size()
    need = _needs(parent, shared)  # (N,) at most: a segment's cut drops some children
    csum = np.cumsum(need[order])  # kept positions up to each sorted sentence
    per_batch = _batch_cost(model)
    start = 0
    while start < len(order):
        before = int(csum[start - 1]) if start else 0
        stop = max(start + 1, int(np.searchsorted(csum, before + CACHE_BYTES // per_token, side="right")))
        _segment(lm, seqs, order[start:stop], parent, shared, n, offsets, scores, limits, per_batch, bar)
        start = stop


def _needs(parent: np.ndarray, shared: np.ndarray) -> np.ndarray:
    """Positions of each sentence that its children read: its largest child's ``shared`` (0 without children)."""
    need = np.zeros(len(parent), dtype=np.int64)
    np.maximum.at(need, parent[parent >= 0], shared[parent >= 0])
    return need


def _segment(
    lm: Any,
    seqs: Sequence[Sequence[int]],
    rows: np.ndarray,
    parent: np.ndarray,
    shared: np.ndarray,
    n_all: np.ndarray,
    offsets: np.ndarray,
    scores: np.ndarray,
    limits: tuple[int, int | None],
    per_batch: float,
    bar: Any,
) -> None:
    """Score sentences ``rows`` (consecutive in sorted order; a parent outside them is not used), wave by wave."""
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
    need = _needs(par, P)  # (N,) positions a sentence's children in this segment read
    copy = np.nonzero(has)[0]  # the shared positions' scores, copied from the parents once they are computed
    store: _Store | None = None
    for w in range(int(waves.max()) + 1):
        sel = np.nonzero(waves == w)[0]
        sel = sel[np.argsort(-P[sel], kind="stable")]  # batches of one suffix length: similar prefix lengths
        keep = sel[need[sel] > 0]
        cur = _Store(int(need[keep].sum())) if len(keep) else None
        for batch in suffix_batches(n[sel] - P[sel], limits[0], per_batch, limits[1]):
            j = sel[batch]
            _batch(lm, seqs, rows[j], j, par[j], P[j], n[j], store, cur, need[j], offsets, scores)
            if bar is not None:
                bar.update(len(j))
        now = copy[waves[copy] == w]  # this wave's rows: their parents are done (and theirs before them)
        scores[_ranges(offsets[rows[now]], P[now])] = scores[_ranges(offsets[rows[par[now]]], P[now])]
        store = cur


def _suffixes(
    seqs: Sequence[Sequence[int]], rows: np.ndarray, P: np.ndarray, n: np.ndarray, T: int, pad: int
) -> tuple[Tensor, Tensor]:
    """Inputs and targets (B, T) of positions ``P`` .. ``n`` - 1 of each framed sequence, right-padded."""
    ln = n - P + 1  # (B,) tokens from position P on: T_b inputs, the last only a target
    flat = np.fromiter(
        itertools.chain.from_iterable(seqs[r][p:] for r, p in zip(rows.tolist(), P.tolist())), np.int64, int(ln.sum())
    )  # (sum ln,)
    row, col = ragged(ln)  # (sum ln,) each token's row and index from position P on
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
    offsets: np.ndarray,
    scores: np.ndarray,
) -> None:
    """Score batch rows ``rows`` (segment indices ``j``) after their ``P`` (B,) positions shared with ``par``, into
    ``scores``; keep the first ``need`` (B,) positions' keys and values of the parents in ``cur``."""
    keep = need > 0
    model, d = lm.model, lm.dictionary
    device = next(model.parameters()).device
    pad, layers = d.pad(), len(model.layers)
    T = int((n - P).max())
    if T == 0:  # duplicates: every position shared (a duplicate is never a parent: its first copy comes earlier)
        return
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
    lp = model.target_log_probs_from_features(feats[valid.to(device)], tgt[valid].to(device))  # (N,) row-major
    scores[_ranges(offsets[rows] + P, n - P)] = lp.float().cpu().numpy()
    if cur is not None and keep.any():
        assert cache is not None
        who = np.nonzero(keep)[0]
        cur.put(cache, who, j[who], P, need)
