"""The LM score of every hypothesis: word ids through the model's text pipeline, then the sums of their position
scores (``scoring.position_scores``: framed as ``LanguageModel.score`` frames a sentence, shared prefixes computed
once, the target-only softmax)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from adaptive_lm.core.kernels import fast_linears
from adaptive_lm.core.progress import Progress
from adaptive_lm.inference.scoring import position_scores

LM_COLUMN = "lm_logprob (natural log)"
LM_COLUMN_EOS = "lm_logprob (natural log, </s> included)"
PROGRESS_LOG_MIN = 100_000  # hypotheses: below this, no progress lines in a log (a few seconds of work)


def encode_hypotheses(lm: Any, texts: Sequence[str]) -> list[list[int]]:
    """Word ids of each text (the model's text pipeline applied, no ``</s>``): what ``LanguageModel.score`` feeds."""
    return [lm.ids(t) for t in texts]


@torch.no_grad()
def sentence_logprobs(
    lm: Any,
    ids: Sequence[Sequence[int]],
    score_eos: bool = False,
    max_tokens: int = 4096,
    max_sentences: int | None = None,
    progress: bool = False,
    share_prefixes: bool = True,
) -> np.ndarray:
    """Natural-log probability of each sentence (word ids, no ``</s>``), in input order, float64 sums of the float32
    position scores; framed by ``framing.frame`` exactly as ``LanguageModel.score`` frames it (``<s>`` first for
    ``add_bos_token`` models).

    ``scoring.position_scores``: batches of at most ``max_tokens`` padded positions (and ``max_sentences`` rows), the
    softmax only for the scored positions; ``share_prefixes`` (the default): each hypothesis computed after the
    prefix it shares with an earlier one (n-best lists repeat their first words; the same scores up to the rounding
    of other batch shapes); otherwise each whole, in length-sorted batches."""
    device = next(lm.model.parameters()).device
    with Progress(len(ids), "rescore", enabled=progress, unit="hyp") as bar, fast_linears(device, packed=True):
        scores, offsets = position_scores(lm, ids, score_eos, max_tokens, max_sentences, bar, share_prefixes)
    out = np.zeros(len(ids), dtype=np.float64)  # an empty sentence without </s> scores nothing: 0
    scored = np.diff(offsets) > 0  # (N,)
    if scored.any():
        out[scored] = np.add.reduceat(scores.astype(np.float64), offsets[:-1][scored])
    return out
