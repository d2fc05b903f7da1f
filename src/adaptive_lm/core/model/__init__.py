"""The network, top to bottom: token embedders (adaptive input, character CNN), adaptive softmax, the decoder layer
(pre- or post-LN, NormFormer options), the language model.

Numerically this is fairseq 0.12's ``transformer_lm`` (``fairseq/models/transformer_lm.py``,
``fairseq/models/transformer/transformer_decoder.py``, ``fairseq/modules/{adaptive_input,adaptive_softmax,
character_token_embedder,transformer_layer,multihead_attention,layer_drop,quant_noise}.py``) for every option of
its config (``core.config``), written for speed and reuse rather than as a port:

* one fused q/k/v projection (fairseq's separate q/k/v tensors are split/concatenated at load time, in
  ``core.fairseq_format``); the attention, dropout and cross-entropy kernels are in ``core.kernels``;
* tied tensors are *the same* ``nn.Parameter`` in both modules, so ``model.parameters()`` counts them once and
  both sides' gradients accumulate into one ``.grad``;
* the adaptive softmax has three entry points: ``loss`` (training; each tail sees only its own rows),
  ``log_prob`` (the full V-way distribution) and ``target_log_prob`` (log p(target) with no rows x V tensor);
* random draws happen in fairseq's order, so a seed gives fairseq's initial weights, layer-drop choices and
  quant-noise masks.

Modules, bottom to top: ``init`` (fairseq's weight draws and quant-noise) <- ``adaptive`` (band routing, the
adaptive input) <- ``softmax`` (the adaptive softmax), ``embed`` (character CNN, the embedder choice, positions),
``layer`` (attention, the decoder layer) <- ``lm`` (``TransformerLM``, ``build_model``). The names below are the
public ones.
"""

from __future__ import annotations

from adaptive_lm.core.model.adaptive import AdaptiveInput, Routes, complete_cutoff, route
from adaptive_lm.core.model.embed import (
    CharacterEmbedder,
    SinusoidalPositions,
    char_table,
    make_positions,
    sinusoidal_table,
    token_embedder,
)
from adaptive_lm.core.model.init import fairseq_linear, quant_noise_
from adaptive_lm.core.model.layer import ACTIVATION_FNS, DecoderLayer, SelfAttention
from adaptive_lm.core.model.lm import KVCache, TransformerLM, build_model, prune_layers
from adaptive_lm.core.model.softmax import AdaptiveSoftmax, fp32

__all__ = [
    "ACTIVATION_FNS",
    "AdaptiveInput",
    "AdaptiveSoftmax",
    "CharacterEmbedder",
    "DecoderLayer",
    "KVCache",
    "Routes",
    "SelfAttention",
    "SinusoidalPositions",
    "TransformerLM",
    "build_model",
    "char_table",
    "complete_cutoff",
    "fairseq_linear",
    "fp32",
    "make_positions",
    "prune_layers",
    "quant_noise_",
    "route",
    "sinusoidal_table",
    "token_embedder",
]
