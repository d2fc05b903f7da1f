"""``adaptive-lm convert``: any supported model -> our folder (``config.json``, ``model.safetensors`` with tied
tensors stored once, ``dict.txt``), or back to a fairseq ``model.pt`` (``--to fairseq``) that fairseq's own
loader accepts: fairseq's key names (tied tensors under every name, split q/k/v, untied tail projections in
fairseq's orientation, ``version`` buffers) and a ``cfg`` of plain dicts (``fairseq/checkpoint_utils.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

from adaptive_lm.core.fairseq_format import to_fairseq_checkpoint
from adaptive_lm.core.files import atomic_path, atomic_torch_save, atomic_write_json
from adaptive_lm.core.serialization import FORMAT, unique_state_dict
from adaptive_lm.inference.hub import LanguageModel
from adaptive_lm.inference.loading import from_pretrained


def export_folder(lm: LanguageModel, dst: str | os.PathLike) -> Path:
    from safetensors.torch import save_file

    out = Path(dst)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in unique_state_dict(lm.model).items()}
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(sd, str(tmp), metadata={"format": FORMAT})
    meta = {"format": FORMAT, "model": lm.cfg.to_dict(), "tokens_per_sample": lm.tokens_per_sample}
    atomic_write_json(out / "config.json", meta)
    lm.dictionary.save(out / "dict.txt")
    return out


def convert(src: str, dst: str, to: str = "folder", dictionary: str | None = None) -> Path:
    lm = from_pretrained(src, dictionary=dictionary)
    if to == "folder":
        return export_folder(lm, dst)
    out = Path(dst)
    if out.suffix != ".pt":
        out.mkdir(parents=True, exist_ok=True)
        lm.dictionary.save(out / "dict.txt")
        out = out / "model.pt"
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        lm.dictionary.save(out.parent / "dict.txt")
    atomic_torch_save(to_fairseq_checkpoint(lm.model, lm.cfg, lm.tokens_per_sample), out)
    return out
