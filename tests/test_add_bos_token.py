"""Issue 24: rescoring and shallow fusion score an ``add_bos_token`` model's sentences as ``LanguageModel.score``
does, from ``<s>`` (fairseq's hub: ``build_dataset_for_inference``, ``inference_step``), not from ``</s>``.

A tiny model with random weights in float64, so that the only differences between the paths are the float32
roundings of the scores they return: ``LanguageModel.score`` and fusion return each position's ln p rounded to
float32, ``sentence_logprobs`` sums the float64 values. The same sentences started from ``</s>`` score differently
by far more than those roundings (checked first), so a path that started from ``</s>`` fails here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adaptive_lm import Dictionary, build_model
from adaptive_lm.inference.fusion import FusionLanguageModel
from adaptive_lm.inference.hub import LanguageModel
from adaptive_lm.inference.rescore import sentence_logprobs

WORDS = [f"w{i}" for i in range(60)]  # beyond the tiny preset's cutoffs (20, 40): all three softmax clusters used
F32_HALF_ULP = 2.0**-24  # relative error of rounding a float64 to the nearest float32
FP64_SLACK = 1e-12  # the float64 computation in other batch shapes and another summation order: ~1e-15 per position


@pytest.fixture(scope="module")
def lm() -> LanguageModel:
    d = Dictionary.from_counts({w: 100 - i for i, w in enumerate(WORDS)})
    torch.manual_seed(0)
    model = build_model("tiny", len(d), add_bos_token=True).double().eval()
    return LanguageModel(model, d)


@pytest.fixture(scope="module")
def sentences() -> list[str]:
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(WORDS, size=n)) for n in (1, 2, 3, 5, 7, 8, 12, 4, 1, 9)]


def reference_scores(lm: LanguageModel, sentences: list[str]) -> list[torch.Tensor]:
    """``LanguageModel.score``'s positional scores (float32), each sentence's words' ln p."""
    return [r["positional_scores"] for r in lm.score(sentences, batch_size=4)]


def direct_scores(lm: LanguageModel, ids: list[int], start: int) -> torch.Tensor:
    """ln p of each word given ``start`` and the words before it: one model call, float64."""
    src = torch.tensor([[start, *ids[:-1]]])  # (1, n)
    with torch.no_grad():
        return lm.model.target_log_probs(src, torch.tensor([ids]))[0]  # (n,)


def test_languagemodel_score_starts_from_bos_and_eos_would_differ(lm, sentences):
    """The anchor: ``score`` is the model started from ``<s>``; started from ``</s>`` every first word's score moves
    by more than a thousand times the tolerances used below."""
    d = lm.dictionary
    assert lm.start_token == d.bos() != d.eos()
    for text, ps in zip(sentences, reference_scores(lm, sentences)):
        ids = lm.ids(text)
        with_bos, with_eos = direct_scores(lm, ids, d.bos()), direct_scores(lm, ids, d.eos())
        assert ps.dtype == torch.float32 and len(ps) == len(ids)
        assert torch.equal(ps, with_bos.float())  # the same float64 arithmetic, rounded once
        assert abs(float(with_bos[0] - with_eos[0])) > 1000 * abs(float(with_bos[0])) * 2.0**-23


def test_rescore_sums_equal_languagemodel_score(lm, sentences):
    ids = [lm.ids(t) for t in sentences]
    got = sentence_logprobs(lm, ids, max_tokens=16)  # several length-sorted batches of different widths
    for g, ps in zip(got, reference_scores(lm, sentences)):
        want = ps.double().sum().item()
        # each float32 score is within half an ulp of the float64 value rescoring sums
        tol = ps.double().abs().sum().item() * F32_HALF_ULP + FP64_SLACK
        assert abs(g - want) <= tol, (g, want, tol)


def within_one_f32_ulp(got: list[float], ps: torch.Tensor) -> None:
    """Both sides are float32 roundings of float64 values equal to ~1e-15 (cached keys/values against the full
    forward): at most one float32 ulp apart."""
    want = ps.double()
    assert len(got) == len(want)
    diff = (torch.tensor(got, dtype=torch.float64) - want).abs()  # (n,)
    tol = want.abs() * 2.0**-23 + FP64_SLACK  # (n,)
    assert bool((diff <= tol).all()), f"fusion {got} != score {want.tolist()}"


def test_fusion_word_scores_equal_languagemodel_score(lm, sentences):
    """alpha 1, beta 0, no boundary: the fused score of each word is its ln p, one word at a time (``score``) and
    all the sentences' words of a step in one batch (``score_many``)."""
    flm = FusionLanguageModel(lm, alpha=1.0, beta=0.0, score_boundary=False)
    words = [t.split() for t in sentences]
    want = reference_scores(lm, sentences)
    for ws, ps in zip(words, want):
        state, got = flm.get_start_state(), []
        for w in ws:
            s, state = flm.score(state, w)
            got.append(s)
        within_one_f32_ulp(got, ps)
    states = [flm.get_start_state() for _ in words]
    batched: list[list[float]] = [[] for _ in words]
    for k in range(max(map(len, words))):
        live = [j for j, ws in enumerate(words) if k < len(ws)]
        for j, (s, state) in zip(live, flm.score_many([(states[j], words[j][k], False) for j in live])):
            batched[j].append(s)
            states[j] = state
    for got, ps in zip(batched, want):
        within_one_f32_ulp(got, ps)


def test_rescore_with_shared_prefixes_starts_from_bos(lm, sentences):
    """Hypotheses sharing prefixes (rescoring computes each after the prefix it shares with an earlier one, from the
    ``<s>`` both start with): the same sums, within the float32 rounding of the positional scores and the float64
    slack of other batch shapes; the shared path did run (the model was fed fewer positions than the words)."""
    from adaptive_lm.inference.scoring import framed, plan

    base = [s.split() for s in sentences if len(s.split()) >= 7]
    texts = [" ".join(b[: len(b) - k] + WORDS[k : k + j]) for b in base for k in (0, 1, 2) for j in (0, 2)]
    ids = [lm.ids(t) for t in texts]
    seqs = framed(ids, lm.start_token, lm.dictionary.eos(), False)
    _, parent, shared = plan(seqs, np.array([len(x) for x in ids]))
    assert (parent >= 0).sum() >= len(texts) - len(base) and lm.start_token == lm.dictionary.bos()
    fed = []
    hook = lm.model.register_forward_pre_hook(lambda m, args: fed.append(int(args[0].numel())))
    try:
        got = sentence_logprobs(lm, ids, max_tokens=16)
    finally:
        hook.remove()
    assert sum(fed) < sum(len(x) for x in ids)
    for g, ps in zip(got, reference_scores(lm, texts)):
        want = ps.double().sum().item()
        tol = ps.double().abs().sum().item() * F32_HALF_ULP + FP64_SLACK
        assert abs(g - want) <= tol, (g, want, tol)
