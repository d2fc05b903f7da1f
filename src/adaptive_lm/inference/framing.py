"""One way to frame sentences for a language model, used by scoring, rescoring, fusion, generation and kNN-LM.

fairseq's hub feeds a sentence ``w1 .. wn`` as ``<start> w1 .. wn`` and scores ``w1 .. wn`` (``score_eos``: also
the final ``</s>``), where ``<start>`` is ``</s>``, or ``<s>`` for ``add_bos_token`` models
(``build_dataset_for_inference``, ``inference_step``). Everything that scores a sentence goes through ``frame``, so
an ``add_bos_token`` model is framed the same way everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def frame(
    ids: Sequence[Sequence[int]], start: int, pad: int, eos: int, score_eos: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded inputs and targets (B, W) of word-id sentences (no ``</s>``), and each sentence's number of
    scored positions (B,).

    Without ``score_eos`` a sentence of n words feeds ``<start> w1 .. w(n-1)`` (n positions) and scores
    ``w1 .. wn``; with it, ``<start> w1 .. wn`` and ``w1 .. wn </s>``. An empty sentence feeds ``<start>`` and scores
    nothing (or ``</s>``)."""
    n = torch.tensor([len(x) + int(score_eos) for x in ids], dtype=torch.long)  # (B,)
    W = max(1, int(n.max()) if len(n) else 1)
    src = torch.full((len(ids), W), pad, dtype=torch.long)  # (B, W)
    tgt = torch.full((len(ids), W), pad, dtype=torch.long)  # (B, W)
    src[:, 0] = start
    for r, x in enumerate(ids):
        x = torch.as_tensor(list(x), dtype=torch.long)
        m = int(n[r])
        if m > 1:
            src[r, 1:m] = x[: m - 1]
        tgt[r, : len(x)] = x
        if score_eos:
            tgt[r, len(x)] = eos
    return src, tgt, n
