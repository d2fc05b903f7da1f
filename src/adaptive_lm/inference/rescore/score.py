"""The LM score of every hypothesis: word ids through the model's text pipeline, then length-sorted batches framed
as ``LanguageModel.score`` frames a sentence (``framing.frame``) and scored through the target-only softmax."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from adaptive_lm.core.kernels import fast_linears
from adaptive_lm.core.progress import Progress
from adaptive_lm.inference.framing import frame
from adaptive_lm.inference.rescore.prefixes import shared_prefix_logprobs

LM_COLUMN = "lm_logprob (natural log)"
LM_COLUMN_EOS = "lm_logprob (natural log, </s> included)"
PROGRESS_LOG_MIN = 100_000  # hypotheses: below this, no progress lines in a log (a few seconds of work)


def encode_hypotheses(lm: Any, texts: Sequence[str]) -> list[list[int]]:
    """Word ids of each text (the model's text pipeline applied, no ``</s>``): what ``LanguageModel.score`` feeds."""
    return [lm.ids(t) for t in texts]


def length_batches(lengths: Sequence[int], max_tokens: int, max_sentences: int | None = None) -> list[np.ndarray]:
    """Indices grouped into batches of similar length, longest first, each at most ``max_tokens`` padded positions.

    Why longest first: the largest batch shape is met at once (memory peak known from the start, the allocator
    reuses its blocks for the smaller ones)."""
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        width = max(1, int(lengths[order[start]]))  # the widest row of this batch (sorted: the first)
        n = max(1, max_tokens // width)
        if max_sentences:
            n = min(n, max_sentences)
        batches.append(order[start : start + n])
        start += n
    return batches


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

    Batches of at most ``max_tokens`` padded positions (and ``max_sentences`` rows); the softmax only for the scored
    positions (``target_log_probs_from_features``: no (N, V) tensor, nothing for padding). ``share_prefixes`` (the
    default): each hypothesis is computed after the prefix it shares with an earlier one (``prefixes``: n-best lists
    repeat their first words; the same scores up to the rounding of other batch shapes); otherwise each whole, in
    length-sorted batches."""
    model, d = lm.model, lm.dictionary
    device = next(model.parameters()).device
    n = np.array([len(x) + 1 if score_eos else len(x) for x in ids], dtype=np.int64)  # scored positions
    out = np.zeros(len(ids), dtype=np.float64)
    todo = np.nonzero(n > 0)[0]  # an empty sentence without </s> scores nothing: 0
    with Progress(len(ids), "rescore", enabled=progress, unit="hyp") as bar, fast_linears(device, packed=True):
        bar.update(len(ids) - len(todo))
        if share_prefixes:
            todo_ids = [ids[i] for i in todo.tolist()]
            got = shared_prefix_logprobs(lm, todo_ids, score_eos, max_tokens, bar, max_sentences)
            if got is not None:
                out[todo] = got
                return out
        for batch in length_batches(n[todo], max_tokens, max_sentences):
            rows = todo[batch]
            src, tgt, m = frame([ids[i] for i in rows.tolist()], lm.start_token, d.pad(), d.eos(), score_eos)
            valid = torch.arange(src.shape[1])[None, :] < m[:, None]  # (B, W) the scored positions
            feats = model(src.to(device))  # (B, W, d)
            x = feats[valid.to(device)]  # (N, d)
            lp = model.target_log_probs_from_features(x, tgt[valid].to(device))  # (N,)
            which = valid.nonzero()[:, 0].to(device)  # (N,) the row of each position
            sums = torch.zeros(len(rows), dtype=torch.float64, device=device).index_add_(0, which, lp.double())
            out[rows] = sums.cpu().numpy()
            bar.update(len(rows))
    return out
