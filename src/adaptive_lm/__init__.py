"""adaptive-lm: word-level Transformer LMs with adaptive input representations (Baevski & Auli, 2018).

fairseq's ``transformer_lm`` + ``adaptive_loss`` recipe, numerically identical to fairseq, without fairseq.

The package is layered (``docs/architecture.md``): ``core`` (dictionary, data, config, model, kernels, optimizer,
fairseq's formats) <- ``training`` and ``inference`` (the hub, evaluation, generation, kNN-LM, rescoring, fusion,
conversion) <- ``check`` (the GPU self-check) <- ``cli``. The names below are imported on first use, so
``import adaptive_lm`` is instant and pulls in torch only when a model is touched.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_NAMES = {  # public name -> the module that defines it
    "AdaptiveInput": "adaptive_lm.core.model",
    "AdaptiveSoftmax": "adaptive_lm.core.model",
    "TransformerLM": "adaptive_lm.core.model",
    "ModelConfig": "adaptive_lm.core.config",
    "make_config": "adaptive_lm.core.presets",
    "build_model": "adaptive_lm.core.model",
    "Dictionary": "adaptive_lm.core.dictionary",
    "UserError": "adaptive_lm.core.errors",
    "ConfigError": "adaptive_lm.core.errors",
    "LanguageModel": "adaptive_lm.inference.hub",
    "from_pretrained": "adaptive_lm.inference.loading",
    "TrainConfig": "adaptive_lm.training.config",
    "train": "adaptive_lm.training.loop",
}
_MODULES = {  # public submodules by their short names
    "knn": "adaptive_lm.inference.knn",
    "rescore": "adaptive_lm.inference.rescore",
    "fusion": "adaptive_lm.inference.fusion",
    "generate": "adaptive_lm.inference.generate",
    "evaluate": "adaptive_lm.inference.evaluate",
    "convert": "adaptive_lm.inference.convert",
}


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name]), name)
    elif name in _MODULES:
        value = importlib.import_module(_MODULES[name])
    else:
        raise AttributeError(f"module 'adaptive_lm' has no attribute {name!r}")
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_NAMES, *_MODULES])


__all__ = sorted(_NAMES)
