"""pyctcdecode's beam search with our language model: ``build_fusion_decoder`` (its ``build_ctcdecoder`` with a
``FusionLanguageModel`` in place of KenLM) and ``FusionDecoderCTC``, which scores a decoding step's words in one
batch."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

from adaptive_lm.inference.fusion.backend import Alphabet, BeamSearchDecoderCTC, _merge_tokens, require_pyctcdecode
from adaptive_lm.inference.fusion.language_model import FusionLanguageModel


class FusionDecoderCTC(BeamSearchDecoderCTC):  # type: ignore[misc,valid-type]
    """pyctcdecode's beam search with the words of each decoding step scored in one batch by a
    ``FusionLanguageModel`` before its own per-beam loop asks for them (same results, fewer forward calls).

    Why a subclass: pyctcdecode asks its language model for one word at a time; the hook reads the step's beams
    from ``_get_lm_beams`` (pyctcdecode 0.5's layout) and falls back to the one-at-a-time path if that changes."""

    def _get_lm_beams(self, beams, hotword_scorer, cached_lm_scores, cached_partial_token_scores, is_eos=False):
        lm = self._language_model
        if isinstance(lm, FusionLanguageModel):
            try:
                todo = []
                for beam in beams:
                    text, next_word = beam[0], beam[1]
                    if (_merge_tokens(text, next_word), is_eos) not in cached_lm_scores:
                        todo.append((cached_lm_scores[(text, False)][-1], next_word, is_eos))
                lm.prefetch(todo)
            except (KeyError, IndexError, TypeError):  # another pyctcdecode layout: score word by word
                lm.clear_prefetched()
        try:
            return super()._get_lm_beams(
                beams, hotword_scorer, cached_lm_scores, cached_partial_token_scores, is_eos=is_eos
            )
        finally:
            if isinstance(lm, FusionLanguageModel):
                lm.clear_prefetched()


def build_fusion_decoder(
    labels: list[str],
    lm: Any,
    alpha: float = 0.5,
    beta: float = 1.5,
    unk_score_offset: float = -10.0,
    score_boundary: bool = True,
    unigrams: Collection[str] | None = None,
    normalize: Callable[[str], str] | None = None,
    batched: bool = True,
) -> FusionDecoderCTC:
    """pyctcdecode's ``build_ctcdecoder`` with our LM in place of KenLM: ``labels`` are the CTC model's output
    symbols (``""`` or ``"<pad>"`` the blank, ``" "`` or ``"|"`` the word boundary, as pyctcdecode reads them);
    ``lm`` a ``LanguageModel`` (``adaptive_lm.from_pretrained``) or a ready ``FusionLanguageModel``.
    ``batched=False`` returns pyctcdecode's own decoder class (one word per forward)."""
    require_pyctcdecode()
    if not isinstance(lm, FusionLanguageModel):
        lm = FusionLanguageModel(
            lm,
            alpha=alpha,
            beta=beta,
            unk_score_offset=unk_score_offset,
            score_boundary=score_boundary,
            unigrams=unigrams,
            normalize=normalize,
        )
    cls = FusionDecoderCTC if batched else BeamSearchDecoderCTC
    return cls(Alphabet.build_alphabet(labels), lm)
