"""adaptive-lm: word-level Transformer LMs with adaptive input representations (Baevski & Auli, 2018).

fairseq's ``transformer_lm`` + ``adaptive_loss`` recipe, numerically identical to fairseq, without fairseq.
"""

from __future__ import annotations

from typing import Any

from .config import ConfigError, ModelConfig, make_config
from .dictionary import Dictionary
from .errors import UserError
from .hub import LanguageModel, from_pretrained
from .model import AdaptiveInput, AdaptiveSoftmax, TransformerLM

__version__ = "0.1.0"


def build_model(arch: str, vocab_size: int, **overrides: Any) -> TransformerLM:
    """A freshly initialised model of a preset (``transformer_lm_wiki103``, ``tiny``, ...) with overrides."""
    return TransformerLM(make_config(arch, vocab_size, **overrides))


__all__ = [
    "AdaptiveInput",
    "AdaptiveSoftmax",
    "ConfigError",
    "Dictionary",
    "LanguageModel",
    "ModelConfig",
    "TransformerLM",
    "UserError",
    "build_model",
    "from_pretrained",
    "make_config",
]
