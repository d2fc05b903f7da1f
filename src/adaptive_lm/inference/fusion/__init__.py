"""Shallow fusion of our Transformer LM into pyctcdecode's CTC beam search (optional extra: ``[asr]``).

pyctcdecode (the CTC decoder of the Hugging Face wav2vec 2.0 pipelines) fuses only KenLM n-grams
(pyctcdecode#20, #86, #110). ``FusionLanguageModel`` implements its ``AbstractLanguageModel`` over a word-level
``LanguageModel``, with the semantics of its KenLM class so that tuned settings carry over, and key/value-cached
states that beams share. ``FusionDecoderCTC`` (from ``build_fusion_decoder``) collects all the words of a decoding
step first and runs one batched forward per prefix length for them; a plain ``BeamSearchDecoderCTC`` works too,
one word at a time.

Modules, bottom to top: ``backend`` (pyctcdecode, imported quietly, stand-ins when absent) <- ``language_model``
(``LMState``, ``FusionStats``, ``FusionLanguageModel``) <- ``decoder`` (``FusionDecoderCTC``,
``build_fusion_decoder``). The names below are the public ones.
"""

from __future__ import annotations

from adaptive_lm.inference.fusion.backend import HAVE_PYCTCDECODE, MISSING  # a copy: backend's is the one read
from adaptive_lm.inference.fusion.decoder import FusionDecoderCTC, build_fusion_decoder
from adaptive_lm.inference.fusion.language_model import FusionLanguageModel, FusionStats, LMState

__all__ = [
    "HAVE_PYCTCDECODE",
    "MISSING",
    "FusionDecoderCTC",
    "FusionLanguageModel",
    "FusionStats",
    "LMState",
    "build_fusion_decoder",
]
