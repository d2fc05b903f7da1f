"""Shallow fusion into pyctcdecode (extra ``asr``; CI installs it, so pyctcdecode is imported, never skipped).

Synthetic CTC posteriors over a small alphabet spell sentences of the fixture model's dictionary. Checked: the
LM resolves an acoustically ambiguous word the way the model prefers; the fused score of the best beam is
acoustic + alpha * LM + beta * words computed independently (``LanguageModel.score`` and a direct model call);
our class gives the numbers of pyctcdecode's own KenLM class driving the same model through a stand-in ``kenlm``;
extending a prefix feeds one token (forward calls counted by a hook), and beams share cache tensors unchanged.
"""

from __future__ import annotations

import math
import time
import types

import numpy as np
import pyctcdecode.language_model as pyctc_lm  # a plain import: a missing extra fails loudly
import pytest
import torch
from pyctcdecode.alphabet import Alphabet
from pyctcdecode.decoder import BeamSearchDecoderCTC

import adaptive_lm
from adaptive_lm.core.errors import UserError
from adaptive_lm.inference import fusion
from adaptive_lm.inference.fusion import FusionDecoderCTC, FusionLanguageModel, build_fusion_decoder

LABELS = ["", " ", *"abcdefghijklmnopqrstuvwxyz"]  # blank, word boundary, letters
INDEX = {c: i for i, c in enumerate(LABELS)}
SENTENCE = "the song was released in the united states"
ALPHA, BETA = 0.5, 1.0


@pytest.fixture(scope="module")
def lm():
    from conftest import FAIRSEQ_TINY

    return adaptive_lm.from_pretrained(FAIRSEQ_TINY / "model" / "checkpoint_last.pt")


def ctc_logits(text: str, ambiguous: dict[int, tuple[tuple[str, float], tuple[str, float]]] | None = None):
    """(2 * len(text), |labels|) log-posteriors: each character (p = 0.96) then a blank frame; at the character
    positions in ``ambiguous`` two letters share the mass."""
    rows = []
    for k, ch in enumerate(text):
        p = np.full(len(LABELS), 0.04 / (len(LABELS) - 1))
        if ambiguous and k in ambiguous:
            (a, pa), (b, pb) = ambiguous[k]
            p[:] = (1 - pa - pb) / (len(LABELS) - 2)
            p[INDEX[a]], p[INDEX[b]] = pa, pb
        else:
            p[INDEX[ch]] = 0.96
        blank = np.full(len(LABELS), 0.04 / (len(LABELS) - 1))
        blank[0] = 0.96
        rows += [p, blank]
    return np.log(np.array(rows))


def confusable(word: str, vocab) -> tuple[int, str] | None:
    """(position, letter) of the first one-letter change of ``word`` that is another word of ``vocab``."""
    for j in range(len(word)):
        for c in LABELS[2:]:
            if c != word[j] and word[:j] + c + word[j + 1 :] in vocab:
                return j, c
    return None


def sentence_lm(lm, text: str, with_eos: bool) -> float:
    """ln p(text) by LanguageModel.score (final </s> not scored), plus ln p(</s> | text) from a direct model call."""
    total = float(lm.score(text)["positional_scores"].double().sum())
    if with_eos:
        ids = lm.encode(text)  # words + </s>
        src = torch.cat([torch.tensor([lm.dictionary.eos()]), ids[:-1]])[None]
        with torch.no_grad():
            total += float(lm.model.target_log_probs(src, ids[None])[0, -1])
    return total


# ---- a stand-in kenlm module: pyctcdecode's own KenLM class then drives our model (an independent path) -----------
class _KenState:
    def __init__(self) -> None:
        self.tokens: list[int] = []


class _KenModel:
    """kenlm.Model's interface over our model, recomputing the whole sentence for every word (no cache)."""

    order = 3

    def __init__(self, lm) -> None:
        self.lm, self.d = lm, lm.dictionary

    def __contains__(self, word: str) -> bool:
        return word in self.d.indices

    def BeginSentenceWrite(self, state: _KenState) -> None:  # noqa: N802 (kenlm's names)
        state.tokens = [self.d.eos()]

    NullContextWrite = BeginSentenceWrite

    @torch.no_grad()
    def BaseScore(self, prev: _KenState, word: str, end: _KenState) -> float:  # noqa: N802
        i = self.d.indices.get(word, self.d.unk())
        end.tokens = [*prev.tokens, i]
        src, tgt = torch.tensor([prev.tokens]), torch.tensor([[*prev.tokens[1:], i]])
        return float(self.lm.model.target_log_probs(src, tgt)[0, -1]) / math.log(10)  # kenlm answers in log10


@pytest.fixture
def kenlm_class(lm, monkeypatch):
    monkeypatch.setattr(pyctc_lm, "kenlm", types.SimpleNamespace(State=_KenState), raising=False)
    words = [w for w in lm.dictionary.symbols[4:] if not w.startswith("madeupword")]

    def make(unigrams=None, **kw):
        return pyctc_lm.LanguageModel(_KenModel(lm), words if unigrams is None else unigrams, **kw)

    return make


# ---- tests ------------------------------------------------------------------------------------------------------
def test_lm_picks_the_word_the_model_prefers(lm):
    """'was' vs 'war': the acoustics lean to 'r' (0.55 vs 0.40); the model prefers 'was' by ~13 nats."""
    k = SENTENCE.index("was") + 2
    logits = ctc_logits(SENTENCE, {k: (("r", 0.55), ("s", 0.40))})
    other = SENTENCE.replace(" was ", " war ")
    assert sentence_lm(lm, SENTENCE, False) > sentence_lm(lm, other, False) + 5
    acoustic_only = build_fusion_decoder(LABELS, lm, alpha=0.0, beta=0.0)
    assert acoustic_only.decode(logits, beam_width=16) == other
    fused = build_fusion_decoder(LABELS, lm, alpha=ALPHA, beta=BETA)
    assert fused.decode(logits, beam_width=16) == SENTENCE


@pytest.mark.parametrize("boundary", [False, True])
def test_fused_score_is_acoustic_plus_alpha_lm_plus_beta_words(lm, boundary):
    k = SENTENCE.index("was") + 2
    logits = ctc_logits(SENTENCE, {k: (("r", 0.55), ("s", 0.40))})
    dec = build_fusion_decoder(LABELS, lm, alpha=ALPHA, beta=BETA, score_boundary=boundary)
    text, _, _, acoustic, fused = dec.decode_beams(logits, beam_width=16)[0]
    expected = acoustic + ALPHA * sentence_lm(lm, text, boundary) + BETA * len(text.split())
    assert text == SENTENCE
    assert fused == pytest.approx(expected, abs=1e-4)


def test_same_numbers_as_pyctcdecodes_kenlm_class(lm, kenlm_class):
    """pyctcdecode's LanguageModel (KenLM) over a stand-in kenlm that recomputes our model in log10: the same word
    scores (natural log, alpha/beta, unk offset in log10 units, </s> at the end) and partial-word scores."""
    kw = dict(alpha=0.7, beta=0.3, unk_score_offset=-4.0)
    ken, ours = kenlm_class(**kw), FusionLanguageModel(lm, **kw)
    a, b = ken.get_start_state(), ours.get_start_state()
    for word in ["the", "song", "qzxv", "was", "released"]:  # qzxv: unknown
        for last in (False, True):
            assert ours.score(b, word, last)[0] == pytest.approx(ken.score(a, word, last)[0], abs=1e-4)
        a, b = ken.score(a, word)[1], ours.score(b, word)[1]
    for part in ["unite", "qz", "the", "relea", "qqqqqqqqq", "zzzzzzzzzzzz", "a"]:
        assert ours.score_partial_token(part) == ken.score_partial_token(part)
    assert ours.score_partial_token("unite") == 0 and ours.score_partial_token("qz") == -4.0
    assert ours.score_partial_token("qqqqqqqqq") == pytest.approx(-4.0 * 9 / 6)
    # a restricted unigram list: a dictionary word outside it keeps its own probability, plus the offset
    unigrams = [w for w in lm.dictionary.symbols[4:2000] if w != "song"]
    ken, ours = kenlm_class(unigrams=unigrams, **kw), FusionLanguageModel(lm, unigrams=unigrams, **kw)
    a, b = ken.score(ken.get_start_state(), "the")[1], ours.score(ours.get_start_state(), "the")[1]
    assert ours.score(b, "song")[0] == pytest.approx(ken.score(a, "song")[0], abs=1e-4)
    assert not ours.is_prefix("son") or any(w.startswith("son") for w in unigrams)


def test_decoding_matches_pyctcdecodes_kenlm_class(lm, kenlm_class):
    """Whole beam searches: pyctcdecode with its KenLM class (stand-in kenlm) and with ours give the same beams."""
    text = "he was born in the city of london"  # 'london' is not in the fixture's dictionary: the unk path
    amb = {text.index("was") + 2: (("r", 0.5), ("s", 0.45)), text.index("the") + 1: (("i", 0.5), ("h", 0.45))}
    logits = ctc_logits(text, amb)
    theirs = BeamSearchDecoderCTC(Alphabet.build_alphabet(LABELS), kenlm_class(alpha=ALPHA, beta=BETA))
    ours = build_fusion_decoder(LABELS, lm, alpha=ALPHA, beta=BETA)
    got, want = ours.decode_beams(logits, beam_width=8), theirs.decode_beams(logits, beam_width=8)
    assert [b[0] for b in got] == [b[0] for b in want]
    np.testing.assert_allclose([b[4] for b in got], [b[4] for b in want], atol=1e-4)
    assert got[0][0] == text


def test_states_share_the_cache_and_never_change(lm):
    flm = FusionLanguageModel(lm)
    start = flm.get_start_state()
    _, s1 = flm.score(start, "the")
    _, s_song = flm.score(s1, "song")
    _, s_first = flm.score(s1, "first")  # a branch: both children start from s1
    flm.score(s_song, "was")
    flm.score(s_first, "season")  # computes both children (lazy until extended)
    before = [t.clone() for t in s1.kv]
    assert len(s_song.kv) == len(s_first.kv) == len(s1.kv) + 1 == 3
    for child in (s_song, s_first):
        assert all(a is b for a, b in zip(child.kv, s1.kv))  # the parent's tensors, by reference
    assert all(torch.equal(a, b) for a, b in zip(before, s1.kv))
    assert flm.get_start_state() is not start and flm.get_start_state().kv is start.kv  # root computed once


def test_cached_extension_feeds_one_token(lm):
    """Time per utterance with the cache (batched per step, or one word per forward) vs recomputing the prefix;
    the cached decoders feed exactly one position per forward row (counted by a hook on the model)."""
    text = "the first season of the series was released in the same year and was the most successful of the year"
    amb, pos = {}, 0
    for word in text.split():  # one letter of every word is ambiguous with another dictionary word
        alt = confusable(word, lm.dictionary.indices)
        if alt:
            amb[pos + alt[0]] = ((word[alt[0]], 0.5), (alt[1], 0.45))
        pos += len(word) + 1
    logits = ctc_logits(text, amb)
    widths: list[int] = []
    hook = lm.model.register_forward_pre_hook(lambda mod, args: widths.append(args[0].shape[1]))
    results, stats = {}, {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one-token forwards of a 0.2M model: threads only wait on each other
    try:
        for name, use_cache, batched in (
            ("cached, batched per step", True, True),
            ("cached, one word per forward", True, False),
            ("recomputing, batched per step", False, True),
            ("recomputing, one word per forward", False, False),
        ):
            flm = FusionLanguageModel(lm, alpha=ALPHA, beta=BETA, use_cache=use_cache)
            dec = build_fusion_decoder(LABELS, flm, batched=batched)
            assert isinstance(dec, FusionDecoderCTC) == batched
            dec.decode_beams(logits, beam_width=32)  # warm-up (the root state, allocator)
            widths.clear()
            flm.stats.reset()
            reps = 3
            t0 = time.perf_counter()
            for _ in range(reps):
                beams = dec.decode_beams(logits, beam_width=32)
            secs = (time.perf_counter() - t0) / reps
            results[name] = (beams[0][0], beams[0][4], secs)
            stats[name] = (list(widths), flm.stats.states, flm.stats.positions, flm.stats.forwards)
    finally:
        hook.remove()
        torch.set_num_threads(threads)
    print()
    for name, (_, _, secs) in results.items():
        w, states, positions, forwards = stats[name]
        print(
            f"  {name:34s} {1e3 * secs:7.1f} ms/utterance, {forwards // 3:4d} forwards, "
            f"{states // 3:4d} states, {positions // 3:5d} positions fed"
        )
    cached_w, cached_states, cached_pos, _ = stats["cached, batched per step"]
    assert set(cached_w) == {1} and cached_pos == cached_states  # one position per extended state
    assert set(stats["cached, one word per forward"][0]) == {1}
    full_w, full_states, full_pos, _ = stats["recomputing, batched per step"]
    assert max(full_w) > 10 and full_pos > 5 * full_states
    assert len(cached_w) < stats["cached, one word per forward"][3]  # batching: fewer forward calls
    texts = {r[0] for r in results.values()}
    assert texts == {text}
    scores = [r[1] for r in results.values()]
    assert max(scores) - min(scores) < 1e-4


def test_context_longer_than_the_model_restarts_from_half_a_window(lm):
    flm = FusionLanguageModel(lm, alpha=ALPHA, beta=BETA)
    flm.window = 6
    text = "the song was released in the united states"
    beams = build_fusion_decoder(LABELS, flm).decode_beams(ctc_logits(text), beam_width=4)
    assert beams[0][0] == text and math.isfinite(beams[0][4])
    assert flm.stats.widths[3] > 0  # restarted from the last 6 // 2 tokens


def test_reset_params_and_order(lm):
    dec = build_fusion_decoder(LABELS, lm)
    dec.reset_params(alpha=0.9, beta=0.1, unk_score_offset=-3.0, lm_score_boundary=False)
    flm = dec._language_model
    assert (flm.alpha, flm.beta, flm.unk_score_offset, flm.score_boundary) == (0.9, 0.1, -3.0, False)
    assert flm.order == 256  # the model's context: prune_history merges only identical visible histories
    with pytest.raises(ValueError):
        flm.reset_params(alpha=1)


def test_normalize_maps_decoder_spelling(lm):
    flm = FusionLanguageModel(lm, normalize=str.lower)
    assert flm.word_id("THE") == (lm.dictionary.index("the"), True) and flm.is_prefix("UNIT")
    assert flm.word_id("QZXV") == (lm.dictionary.unk(), False)
    dec = build_fusion_decoder([c.upper() for c in LABELS], flm)
    assert dec.decode(ctc_logits(SENTENCE), beam_width=8) == SENTENCE.upper()  # same columns, capital labels


def test_missing_pyctcdecode_is_one_line(lm, monkeypatch):
    monkeypatch.setattr(fusion.backend, "HAVE_PYCTCDECODE", False)  # the flag the classes read
    with pytest.raises(UserError, match=r"pip install 'adaptive-lm\[asr\]'"):
        build_fusion_decoder(LABELS, lm)
    with pytest.raises(UserError, match="pyctcdecode"):
        FusionLanguageModel(lm)
