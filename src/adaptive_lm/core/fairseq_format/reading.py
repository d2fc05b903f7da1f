"""Reading fairseq checkpoints without running code from the file: ``safe_load`` (``torch.load(weights_only=True)``
with an explicit allow-list), the stored settings, and the ``ModelConfig`` fairseq 0.12 builds from them."""

from __future__ import annotations

import os
import pickle
import re
import types
import warnings
from pathlib import Path
from typing import Any

import torch

from adaptive_lm.core.config import NORMFORMER, ModelConfig, typed_overrides
from adaptive_lm.core.errors import UserError
from adaptive_lm.core.presets import ALIASES, PRESETS, apply_preset

# What a fairseq checkpoint really holds besides tensors and builtin containers. Old checkpoints pickle their
# settings as an ``argparse.Namespace``: it is rebuilt as a ``types.SimpleNamespace`` (the same attributes, no argparse
# anywhere below the command line); nothing else is constructed from the file.
SAFE_GLOBALS: list[Any] = [(types.SimpleNamespace, "argparse.Namespace")]
try:  # numpy scalars/dtypes appear in old extra_state (best val loss); they are plain data
    import numpy as np

    _np_core = getattr(np, "_core", None) or np.core  # numpy 2 renamed core -> _core
    SAFE_GLOBALS += [_np_core.multiarray.scalar, np.dtype]
    SAFE_GLOBALS += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32")]
except Exception:  # pragma: no cover - numpy is a dependency, but never fail loading over it
    pass


def _file_kind(path: Path) -> str:
    """What the first bytes say: a zip archive (torch.save since 1.6), a legacy pickle, or something else."""
    with open(path, "rb") as f:
        head = f.read(8)
    if not head:
        return "empty"
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if head[:3] == b"BZh" or head[:2] == b"\x1f\x8b":
        return "archive"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"
    return "other"


def safe_load(path: str | os.PathLike, mmap: bool = True, verify: bool = True) -> Any:
    """``torch.load`` that only accepts tensors, containers and the allow-listed types; memory-maps when it can.

    Every failure is one line naming the file and what is wrong with it (empty, truncated, not a checkpoint, an
    archive, a refused type). PyTorch's own hint to retry with ``weights_only=False`` is never passed on: that load
    runs whatever code the file contains, which is what this loader exists to avoid.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    kind = _file_kind(path)
    if kind == "empty":
        raise UserError(f"{path}: empty file (an interrupted copy or save?); use an intact checkpoint")
    if kind == "archive":
        raise UserError(
            f"{path}: a bzip2/gzip-compressed file, not a checkpoint; a released .tar.bz2/.tar.gz archive loads "
            f"through from_pretrained/convert (or extract it: tar xf), a compressed checkpoint needs bunzip2/gunzip "
            f"first"
        )
    if kind == "other":
        raise UserError(
            f"{path}: not a PyTorch checkpoint (neither a zip nor a pickle file); pass a model.pt or "
            f"checkpoint*.pt written by fairseq or adaptive-lm"
        )
    if kind == "zip" and verify:  # verify=False: a first look whose caller loads the file again (verified) later
        _check_checksums(path)
    with torch.serialization.safe_globals(SAFE_GLOBALS), warnings.catch_warnings():
        # a legacy pickle of another protocol: PyTorch warns that its safe unpickler "might not support" it; it
        # reads it, or fails with one of the errors below
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and kind == "zip")
        except pickle.UnpicklingError as e:
            m = re.search(r"(?:GLOBAL|global) ([\w.]+)", str(e))
            if m:
                raise UserError(
                    f"{path}: refused to load: the file pickles {m.group(1)}, which is not on the allow-list of "
                    f"types fairseq checkpoints contain (loading it could run code); if you trust the file, re-save "
                    f"its tensors and settings as plain data"
                ) from None
            raise UserError(
                f"{path}: damaged checkpoint (its pickled data cannot be read); use an intact copy"
            ) from None
        except (RuntimeError, EOFError, ValueError, OSError) as e:
            text = str(e)
            if "central directory" in text or "zip archive" in text or isinstance(e, EOFError):
                raise UserError(
                    f"{path}: truncated or damaged checkpoint (the zip archive is incomplete); use an intact copy"
                ) from None
            if "inline_container" in text or "PytorchStreamReader" in text:  # a zip of something else
                raise UserError(
                    f"{path}: a zip file but not a PyTorch checkpoint (no data.pkl in a folder of it); pass a model.pt "
                    f"or checkpoint*.pt written by fairseq or adaptive-lm"
                ) from None
            raise UserError(f"{path}: cannot read checkpoint ({text.splitlines()[0][:120]})") from None


def _check_checksums(path: Path) -> None:
    """Every entry of a zip checkpoint against the CRC-32 its writer stored. Why: ``torch.load`` does not check them,
    so a file damaged after it was written (a bad disk, a copy cut short inside a tensor) loaded without a word and
    scored garbage (perplexity inf). Reading the file once more costs about 0.3 s per GB. Entries stored with CRC 0
    (``torch.serialization.set_crc32_options(False)``) cannot be checked and are skipped; a truncated archive is left
    to ``torch.load``'s own error, caught below."""
    import zipfile
    import zlib

    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.CRC == 0 or info.is_dir():
                    continue
                try:
                    with z.open(info) as f:  # zipfile compares the CRC-32 when the entry has been read to its end
                        while f.read(1 << 24):
                            pass
                except (zipfile.BadZipFile, zlib.error) as e:
                    if "CRC" not in str(e) and not isinstance(e, zlib.error):
                        return  # not a checksum: torch.load says what is wrong
                    raise UserError(
                        f"{path}: damaged checkpoint (its entry {info.filename} fails the checksum written with it: "
                        f"the file changed after it was saved); use an intact copy"
                    ) from None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError):
        return


def stored_vocab_size(sd: dict[str, Any]) -> int | None:
    """The vocabulary size a fairseq state dict was trained with (None if its layout does not say)."""
    for k in ("decoder.embed_tokens.weight", "decoder.output_projection.weight", "decoder.embed_out"):
        if k in sd:
            return int(sd[k].shape[0])
    bands = [k for k in sd if k.startswith("decoder.embed_tokens.embeddings.") and k.endswith(".0.weight")]
    if bands:
        return sum(int(sd[k].shape[0]) for k in bands)
    return None


def _as_dict(obj: Any) -> dict[str, Any]:
    if obj is None:
        return {}
    if isinstance(obj, types.SimpleNamespace):
        return dict(vars(obj))
    if isinstance(obj, dict):
        return dict(obj)
    raise UserError(f"unexpected type {type(obj).__name__} for the stored model configuration")


def stored_settings(ckpt: dict[str, Any]) -> dict[str, Any]:
    """Model settings as stored, from ``cfg`` (task values underneath) or, for old files, ``args``."""
    cfg = ckpt.get("cfg")
    if cfg:
        out = _as_dict(cfg.get("task"))
        out.update(_as_dict(cfg.get("model")))
        if "_name" in out:
            out["arch"] = out.pop("_name")
        return out
    args = _as_dict(ckpt.get("args"))
    if not args:
        raise UserError("checkpoint has neither 'cfg' nor 'args': not a fairseq checkpoint")
    return args


def config_from_fairseq(
    settings: dict[str, Any],
    vocab_size: int,
    overrides: dict[str, Any] | None = None,
    state_keys: Any = None,
) -> ModelConfig:
    """fairseq settings (+ load-time overrides, fairseq's ``arg_overrides``) -> the ModelConfig fairseq 0.12 builds.

    As ``fairseq/models/__init__.py::build_model`` does: a plain ``transformer_lm`` takes the stored values over
    the dataclass defaults (so it is post-LN unless ``decoder_normalize_before`` was stored true); a named arch
    (``transformer_lm_wiki103``, ...) runs its architecture function over the stored values, which fills what is
    unset (``None``) and forces pre-LN. Old option names follow ``base_lm_architecture``'s compatibility rules.
    With ``state_keys`` (the checkpoint's weight names), NormFormer layers exist exactly when their weights do:
    fairseq 0.12 builds none whatever its config says (``config.NORMFORMER``), older versions did.
    """
    s = dict(settings)
    s.update(typed_overrides(overrides or {}))
    if "no_tie_adaptive_proj" in s:  # pre-2020 option name
        s["no_decoder_final_norm"] = True
        if s["no_tie_adaptive_proj"] is False:
            s["tie_adaptive_proj"] = True
    if "decoder_final_norm" in s:
        s["no_decoder_final_norm"] = not s["decoder_final_norm"]
    if s.get("max_target_positions") is None:
        s["max_target_positions"] = s.get("tokens_per_sample") or 1024
    fields = set(ModelConfig.__dataclass_fields__) - {"vocab_size", "padding_idx"}
    given = {k: s[k] for k in fields if k in s}
    arch = str(s.get("arch", "transformer_lm"))
    if ALIASES.get(arch, arch) in PRESETS and ALIASES.get(arch, arch) != "transformer_lm":
        values = apply_preset(arch, given)
    else:  # the dataclass path (also for arch names we do not know: their stored values are complete)
        values = given
    for k in ("adaptive_input_factor", "adaptive_softmax_factor"):
        if values.get(k) is not None:
            values[k] = float(values[k])
    values["vocab_size"] = vocab_size
    if state_keys is not None:
        for k, param in NORMFORMER.items():
            values[k] = any(name.endswith(param) for name in state_keys)
    cfg = ModelConfig.from_dict(values)
    cfg.validate()
    return cfg
