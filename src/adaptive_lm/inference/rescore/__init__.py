"""``adaptive-lm rescore``: add a language-model score to every hypothesis of n-best lists, pick each list's best
under ``existing + lm_weight * lm + word_bonus * words``, and tune the two weights on references (WER).

Why a command: speech recognisers (wav2vec 2.0, Whisper) and translation systems produce n-best lists that a
word-level LM reranks, and with fairseq this is do-it-yourself (fairseq#3774, NeMo#2287): its hub ``score`` runs
the full (N, V) softmax and a Python loop per sentence. Here every hypothesis is one sentence, framed exactly as
``LanguageModel.score`` and fairseq's hub frame it (``framing.frame``: input ``</s> w1 .. wn``, or ``<s> w1 ..
wn`` for ``add_bos_token`` models, targets ``w1 .. wn``, the final ``</s>`` not scored unless ``score_eos``),
scored in length-sorted batches (little padding) through the target-only softmax
(``target_log_probs_from_features``: no (N, V) tensor), padding rows skipped.

Inputs: a TSV ``id<TAB>hypothesis[<TAB>score columns...]`` (an optional ``#`` header naming the columns), or
fairseq-generate's output (``H-<id><TAB><score><TAB><text>`` hypotheses, ``T-<id>`` references). Output: every
input row in input order with one more column, the LM log-probability in nats.

Modules, bottom to top: ``nbest`` (reading the lists and references), ``score`` (the LM scores) <- ``tune`` (each
list's best, WER by jiwer, the weight grid, the report). The names below are the public ones.
"""

from __future__ import annotations

from adaptive_lm.inference.rescore.nbest import (
    NBest,
    detect_format,
    read_fairseq,
    read_nbest,
    read_references,
    read_tsv,
)
from adaptive_lm.inference.rescore.score import (
    LM_COLUMN,
    LM_COLUMN_EOS,
    PROGRESS_LOG_MIN,
    encode_hypotheses,
    sentence_logprobs,
)
from adaptive_lm.inference.rescore.tune import (
    GridResult,
    best_per_list,
    check_references,
    combined_score,
    fmt_number,
    grid_search,
    jiwer_module,
    wer_report,
    word_errors,
)
from adaptive_lm.inference.scoring import length_batches

__all__ = [
    "LM_COLUMN",
    "LM_COLUMN_EOS",
    "PROGRESS_LOG_MIN",
    "GridResult",
    "NBest",
    "best_per_list",
    "check_references",
    "combined_score",
    "detect_format",
    "encode_hypotheses",
    "fmt_number",
    "grid_search",
    "jiwer_module",
    "length_batches",
    "read_fairseq",
    "read_nbest",
    "read_references",
    "read_tsv",
    "sentence_logprobs",
    "wer_report",
    "word_errors",
]
