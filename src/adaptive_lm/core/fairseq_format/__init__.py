"""fairseq's checkpoints without fairseq, and without running code from the file.

* ``reading``: ``safe_load`` (``torch.load(weights_only=True)`` with an explicit allow-list: argparse.Namespace, read
  as a SimpleNamespace, and numpy scalars, which old fairseq checkpoints pickle; anything else is refused with a
  message naming the type);
  ``config_from_fairseq``: the architecture from the checkpoint's stored ``cfg["model"]`` or ``args``, with the
  arch name's defaults only filling what is missing (the released WikiText-103 model says
  ``transformer_lm_gbw``), plus fairseq's backward-compatibility rules (``base_lm_architecture``,
  ``checkpoint_utils._upgrade_state_dict``).
* ``keys``: fairseq key names <-> ours (q/k/v or the old fused in_proj into our fused ``qkv``, untied tail
  projections transposed, duplicated tied tensors collapsed), and ``load_into``.
* ``writing``: ``to_fairseq_checkpoint``, a checkpoint fairseq's own loader and hub accept.

Modules, bottom to top: ``reading``, ``keys`` <- ``writing``. The names below are the public ones.
"""

from __future__ import annotations

from adaptive_lm.core.fairseq_format.keys import load_into, state_dict_from_fairseq, state_dict_to_fairseq
from adaptive_lm.core.fairseq_format.reading import (
    SAFE_GLOBALS,
    config_from_fairseq,
    safe_load,
    stored_settings,
    stored_vocab_size,
)
from adaptive_lm.core.fairseq_format.writing import (
    FAIRSEQ_DATASET,
    FAIRSEQ_GENERATION,
    fairseq_model_cfg,
    to_fairseq_checkpoint,
)

__all__ = [
    "FAIRSEQ_DATASET",
    "FAIRSEQ_GENERATION",
    "SAFE_GLOBALS",
    "config_from_fairseq",
    "fairseq_model_cfg",
    "load_into",
    "safe_load",
    "state_dict_from_fairseq",
    "state_dict_to_fairseq",
    "stored_settings",
    "stored_vocab_size",
    "to_fairseq_checkpoint",
]
