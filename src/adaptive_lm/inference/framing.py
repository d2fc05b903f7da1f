"""One way to frame sentences for a language model, used by scoring, rescoring, fusion, generation and kNN-LM.

fairseq's hub feeds a sentence ``w1 .. wn`` as ``<start> w1 .. wn`` and scores ``w1 .. wn`` (``score_eos``: also
the final ``</s>``), where ``<start>`` is ``</s>``, or ``<s>`` for ``add_bos_token`` models
(``build_dataset_for_inference``, ``inference_step``). Everything that scores a sentence goes through ``frame``, so
an ``add_bos_token`` model is framed the same way everywhere.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def ragged(lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of every element of rows of ``lens`` elements laid one after the other: its row and its place in
    that row (the index arithmetic of flat, variable-length batches)."""
    row = np.repeat(np.arange(len(lens)), lens)  # (total,)
    col = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)  # (total,)
    return row, col


def frame(
    ids: Sequence[Sequence[int]], start: int, pad: int, eos: int, score_eos: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded inputs and targets (B, W) of word-id sentences (no ``</s>``), and each sentence's number of
    scored positions (B,).

    Without ``score_eos`` a sentence of n words feeds ``<start> w1 .. w(n-1)`` (n positions) and scores
    ``w1 .. wn``; with it, ``<start> w1 .. wn`` and ``w1 .. wn </s>``. An empty sentence feeds ``<start>`` and scores
    nothing (or ``</s>``)."""
    lens = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))  # (B,) words per sentence
    n = lens + int(score_eos)  # (B,) scored positions
    W = max(1, int(n.max()) if len(n) else 1)
    src = np.full((len(ids), W), pad, dtype=np.int64)  # (B, W)
    tgt = np.full((len(ids), W), pad, dtype=np.int64)  # (B, W)
    src[:, 0] = start
    # every word at once (no per-sentence tensor work: rescoring frames 10,000s of sentences): word j of row r is
    # the target at (r, j) and, when a later position still scores, the input at (r, j + 1)
    words = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lens.sum()))  # (total,)
    row, col = ragged(lens)  # (total,) each word's sentence and position in it
    tgt[row, col] = words
    fed = col + 1 < n[row]  # (total,) without score_eos the last word is never fed
    src[row[fed], col[fed] + 1] = words[fed]
    if score_eos:
        tgt[np.arange(len(ids)), lens] = eos
    return torch.from_numpy(src), torch.from_numpy(tgt), torch.from_numpy(n)
