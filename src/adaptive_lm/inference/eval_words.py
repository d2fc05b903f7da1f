"""fairseq-eval-lm's per-word outputs (``fairseq_cli/eval_lm.py``: ``eval_lm`` and ``WordStat``), rule for rule.

* ``--post-process`` / ``--remove-bpe``: fairseq 0.12 accepts only ``subword_nmt`` (``--remove-bpe``'s value when
  given bare) and ``@@ ``; the continuation marker is the value with trailing spaces stripped, so ``@@ `` merges
  subword-nmt pieces (symbols ending in ``@@``) and ``subword_nmt`` looks for symbols ending in ``subword_nmt``, which
  merges nothing in practice. In each block a continuation piece at positions 0..n-2 hands its score to the next
  position (a float32 sum, as fairseq's scores are) and counts as one token fewer: loss and perplexity are per word;
  the last position keeps its own score (counted) whatever it is.
* ``--output-word-probs``: one line per block, ``ID word [ln p]\\t...``, ID being the block's index in the split,
  blocks in the order fairseq's batches visit them (``evaluate.fairseq_visit_order``), pieces merged into words (a
  trailing piece of a block is dropped from the line, its score stays in the loss).
* ``--output-word-stats``: every word once, by count (most frequent first, ties in order of first appearance):
  ``word, count, sum of ln p (float64), is_bpe (of its first appearance), sum of the next word's ln p (float32), how
  many of its occurrences had a next word in the block``, tab-separated, values as Python prints them.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from adaptive_lm.core.dictionary import Dictionary
from adaptive_lm.core.errors import UserError
from adaptive_lm.core.metrics import perplexity
from adaptive_lm.inference.evaluate import EvalResult

POST_PROCESS = ("subword_nmt", "@@ ")


def continuation(post_process: str | None) -> str | None:
    """The marker a ``--post-process`` value strips (None: no post-processing); refuses what fairseq 0.12 refuses."""
    if post_process is None:
        return None
    if post_process not in POST_PROCESS:
        raise UserError(
            f"--post-process {post_process!r}: fairseq-eval-lm 0.12 implements only 'subword_nmt' and '@@ ' "
            "(subword-nmt pieces ending in '@@'); sentencepiece and GPT-2 BPE are not merged into words there"
        )
    return post_process.rstrip()


def blocks(res: EvalResult) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(block id, token ids, float32 ln p) per block, in the order fairseq-eval-lm visits them."""
    assert res.scores is not None and res.targets is not None
    assert res.block_ids is not None and res.block_order is not None
    ends = np.cumsum([0, *res.block_lengths])
    out = []
    for b in res.block_order:
        s, e = int(ends[b]), int(ends[b + 1])
        out.append((int(res.block_ids[b]), res.targets[s:e], res.scores[s:e].astype(np.float32)))
    return out


def merged(ids: np.ndarray, scores: np.ndarray, pieces: np.ndarray) -> tuple[np.ndarray, int]:
    """One block's scores with each continuation piece's score moved onto the next position (fairseq's loop over
    positions 0..n-2, in order, so a chain of pieces accumulates into its last one); and how many were moved."""
    pos = scores.copy()
    skipped = 0
    for i in range(len(ids) - 1):
        if pieces[ids[i]]:
            skipped += 1
            pos[i + 1] += pos[i]
            pos[i] = 0
    return pos, skipped


def post_process(res: EvalResult, d: Dictionary, cont: str) -> tuple[EvalResult, np.ndarray]:
    """``res`` with the pieces ending in ``cont`` merged into words (scores, count, loss, perplexity), and the mask of
    the dictionary's piece ids."""
    pieces = np.array([d[i].endswith(cont) for i in range(len(d))], dtype=bool)
    assert res.scores is not None
    ends = np.cumsum([0, *res.block_lengths])
    scores = res.scores.copy()
    count = 0
    for b in range(len(res.block_lengths)):
        s, e = int(ends[b]), int(ends[b + 1])
        pos, skipped = merged(res.targets[s:e], res.scores[s:e].astype(np.float32), pieces)
        scores[s:e] = pos
        count += int(np.isfinite(pos).sum()) - skipped  # eval-lm drops +-inf scores, then subtracts the pieces
    total = float(scores[np.isfinite(scores)].sum())
    loss = -total / count / math.log(2) if count > 0 else 0.0
    return replace(res, scores=scores, n_tokens=count, loss_base2=loss, ppl=perplexity(loss)), pieces


def word_lines(
    res: EvalResult, d: Dictionary, cont: str | None, pieces: np.ndarray | None, probs: bool, stats: bool
) -> tuple[list[str], list[str]]:
    """fairseq's ``--output-word-probs`` lines (per block) and its ``--output-word-stats`` lines (which fairseq prints
    between its two summary lines)."""
    cut = len(cont) if cont is not None else 0
    lines: list[str] = []
    table: dict[str, list] = {}  # word -> [count, sum ln p, is_bpe, next sum (float32 or 0), with next]
    for block_id, ids, pos in blocks(res):
        nonzero = np.flatnonzero(pos != 0)
        w, is_bpe, words = "", False, []
        for i, t in enumerate(ids.tolist()):
            w += d[t]
            if pieces is not None and pieces[t]:
                w, is_bpe = w[:-cut], True
                continue
            words.append(f"{w} [{float(pos[i]):2f}]")
            after = nonzero[np.searchsorted(nonzero, i, side="right") :]
            stat = table.setdefault(w, [0, 0, is_bpe, 0, 0])
            stat[0] += 1
            stat[1] += float(pos[i])
            if len(after):
                stat[3] = np.float32(stat[3]) + pos[after[0]]
                stat[4] += 1
            w, is_bpe = "", False
        if probs:
            lines.append(f"{block_id} " + "\t".join(words))
    out: list[str] = []
    if stats:
        for word, (n, lp, bpe, nxt, with_next) in sorted(table.items(), key=lambda x: x[1][0], reverse=True):
            nxt_s = "0" if isinstance(nxt, int) else repr(float(nxt))
            out.append(f"{word}\t{n}\t{lp!r}\t{bpe}\t{nxt_s}\t{with_next}")
    return lines, out
