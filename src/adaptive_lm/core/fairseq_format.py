"""Reading fairseq checkpoints without fairseq, and without running code from the file.

* ``safe_load``: ``torch.load(weights_only=True)`` with an explicit allow-list (argparse.Namespace and numpy
  scalars, which old fairseq checkpoints pickle); anything else is refused with a message naming the type.
* ``config_from_fairseq``: the architecture from the checkpoint's stored ``cfg["model"]`` or ``args``, with the
  arch name's defaults only filling what is missing (the released WikiText-103 model says
  ``transformer_lm_gbw``), plus fairseq's backward-compatibility rules (``base_lm_architecture``,
  ``checkpoint_utils._upgrade_state_dict``).
* ``state_dict_from_fairseq``: fairseq key names -> ours (q/k/v or the old fused in_proj into our fused
  ``qkv``, untied tail projections transposed, duplicated tied tensors collapsed).
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from adaptive_lm.core.config import ALIASES, NORMFORMER, PRESETS, ModelConfig, apply_preset
from adaptive_lm.core.errors import UserError
from adaptive_lm.core.model import prune_layers

# What a fairseq checkpoint really holds besides tensors and builtin containers.
SAFE_GLOBALS: list[Any] = [argparse.Namespace]
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


def safe_load(path: str | os.PathLike, mmap: bool = True) -> Any:
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
            f"{path}: this is a .tar.bz2/.tar.gz archive, not a checkpoint; extract it (tar xf) or pass "
            f"the archive to from_pretrained/convert"
        )
    if kind == "other":
        raise UserError(
            f"{path}: not a PyTorch checkpoint (neither a zip nor a pickle file); pass a model.pt or "
            f"checkpoint*.pt written by fairseq or adaptive-lm"
        )
    with torch.serialization.safe_globals(SAFE_GLOBALS):
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
            raise UserError(f"{path}: cannot read checkpoint ({text.splitlines()[0][:120]})") from None


def _as_dict(obj: Any) -> dict[str, Any]:
    if obj is None:
        return {}
    if isinstance(obj, argparse.Namespace):
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
    s.update(overrides or {})
    if "no_tie_adaptive_proj" in s:  # pre-2020 option name
        s["no_decoder_final_norm"] = True
        if s["no_tie_adaptive_proj"] is False:
            s["tie_adaptive_proj"] = True
    if "decoder_final_norm" in s:
        s["no_decoder_final_norm"] = not s["decoder_final_norm"]
    if s.get("max_target_positions") in (None, 0):
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


_DROP = re.compile(r"(^version$|_float_tensor$|^embed_positions\.weights$|^adaptive_softmax\.version$)")


def state_dict_from_fairseq(sd: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Rename fairseq's decoder keys to ours; fuse q/k/v; transpose untied tail projections; keep only
    ``decoder_layers_to_keep`` (fairseq's ``prune_state_dict``)."""
    sd = prune_layers(sd, cfg.decoder_layers_to_keep)
    src = {k[len("decoder.") :] if k.startswith("decoder.") else k: v for k, v in sd.items()}
    out: dict[str, Tensor] = {}
    qkv: dict[str, dict[str, Tensor]] = {}
    c0 = cfg.adaptive_softmax_cutoff[0] if cfg.adaptive_softmax_cutoff else 0
    tied_proj = cfg.tie_adaptive_weights and cfg.tie_adaptive_proj
    for k, v in src.items():
        if _DROP.search(k):
            continue
        if cfg.decoder_learned_pos is False and k == "embed_positions.weight":
            continue
        m = re.fullmatch(r"embed_tokens\.embeddings\.(\d+)\.([01])\.weight", k)
        if m:
            out[f"embed_tokens.{'embeddings' if m.group(2) == '0' else 'projections'}.{m.group(1)}.weight"] = v
            continue
        m = re.fullmatch(r"layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", k)
        if m:
            qkv.setdefault(f"layers.{m.group(1)}.self_attn.qkv.{m.group(3)}", {})[m.group(2)] = v
            continue
        m = re.fullmatch(r"layers\.(\d+)\.self_attn\.in_proj_(weight|bias)", k)
        if m:
            out[f"layers.{m.group(1)}.self_attn.qkv.{m.group(2)}"] = v
            continue
        m = re.fullmatch(r"layers\.(\d+)\.layer_norms\.([01])\.(weight|bias)", k)
        if m:
            name = "self_attn_layer_norm" if m.group(2) == "0" else "final_layer_norm"
            out[f"layers.{m.group(1)}.{name}.{m.group(3)}"] = v
            continue
        if k == "adaptive_softmax.head.weight":  # untied head: one matrix, words then clusters
            out["adaptive_softmax.word_weight"] = v[:c0]
            out["adaptive_softmax.class_weight"] = v[c0:]
            continue
        if k in ("adaptive_softmax.head.word_proj.weight", "adaptive_softmax.head.word_proj.1.weight"):
            out["adaptive_softmax.word_weight"] = v
            continue
        if k == "adaptive_softmax.head.word_proj.0.weight":
            out["adaptive_softmax.head_in_proj.weight"] = v
            continue
        if k == "adaptive_softmax.head.class_proj.weight":
            out["adaptive_softmax.class_weight"] = v
            continue
        m = re.fullmatch(r"adaptive_softmax\.tail\.(\d+)\.([02])\.weight", k)
        if m:
            i = m.group(1)
            if m.group(2) == "2":
                out[f"adaptive_softmax.tail_out.{i}"] = v
            else:
                out[f"adaptive_softmax.tail_proj.{i}"] = v if tied_proj else v.t()
            continue
        if k == "embed_out":
            out["output_projection.weight"] = v
            continue
        if k.startswith("embed_tokens.highway.layers."):  # char CNN: fairseq's Highway module holds a ModuleList
            out["embed_tokens.highway." + k[len("embed_tokens.highway.layers.") :]] = v
            continue
        if k == "output_projection.weight" and cfg.adaptive_softmax_cutoff is not None:
            continue  # fairseq#3545: an unused output projection next to an adaptive softmax
        out[k] = v
    for name, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise UserError(f"checkpoint has an incomplete attention projection set for {name}")
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def load_into(
    model: torch.nn.Module, sd: dict[str, Tensor], source: str = "checkpoint", dtype: torch.dtype | None = None
) -> None:
    """Strict load that accepts each tied tensor under any one of its names (fairseq stores it under all).

    A model built on the meta device is filled by *assigning* the loaded tensors (no second copy of the weights;
    with a memory-mapped file the pages are read on first use), then re-tied; ``dtype`` converts on the way.
    """
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    full = dict(sd)
    for names in groups.values():
        have = [n for n in names if n in full]
        if have:
            for n in names:
                full.setdefault(n, full[have[0]])
    expected = set(model.state_dict().keys())
    missing = sorted(expected - set(full))
    unexpected = sorted(set(full) - expected)
    if missing or unexpected:
        raise UserError(
            f"{source}: weights do not match the model built from its settings "
            f"(missing: {', '.join(missing[:5]) or 'none'}; unexpected: {', '.join(unexpected[:5]) or 'none'})"
        )
    own = model.state_dict()
    for k, v in full.items():
        if tuple(own[k].shape) != tuple(v.shape):
            raise UserError(f"{source}: {k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}")
    meta = any(p.is_meta for p in model.parameters())
    if dtype is not None:
        cache: dict[int, Tensor] = {}
        full = {k: cache.setdefault(id(v), v.to(dtype) if v.is_floating_point() else v) for k, v in full.items()}
    if meta:
        model.load_state_dict(full, strict=True, assign=True)
        model.tie_weights()  # type: ignore[operator]
        model.materialize_buffers()  # type: ignore[operator]
    else:
        model.load_state_dict(full, strict=True)


# ---- writing: our model as a fairseq checkpoint ------------------------------------------------------------
def state_dict_to_fairseq(model: torch.nn.Module, cfg: ModelConfig) -> dict[str, Tensor]:
    """Our weights under fairseq's ``decoder.*`` names, tied tensors shared between their names (the inverse of
    ``state_dict_from_fairseq``)."""
    own = model.state_dict()
    out: dict[str, torch.Tensor] = {"decoder.version": torch.tensor([3.0])}
    tied_proj = cfg.tie_adaptive_weights and cfg.tie_adaptive_proj
    d = cfg.decoder_embed_dim
    for k, v in own.items():
        v = v.detach().cpu()
        if k.startswith("embed_tokens.embeddings."):
            i = k.split(".")[2]
            out[f"decoder.embed_tokens.embeddings.{i}.0.weight"] = v
        elif k.startswith("embed_tokens.projections."):
            i = k.split(".")[2]
            out[f"decoder.embed_tokens.embeddings.{i}.1.weight"] = v
        elif ".self_attn.qkv." in k:
            kind = k.rsplit(".", 1)[1]
            prefix = k.split(".self_attn.")[0]
            q, kk, vv = v.split(d, dim=0)
            for n, t in zip("qkv", (q, kk, vv)):
                out[f"decoder.{prefix}.self_attn.{n}_proj.{kind}"] = t.clone()
        elif k == "adaptive_softmax.word_weight":
            if cfg.tie_adaptive_weights:
                out["decoder.adaptive_softmax.head.word_proj.weight"] = v
            else:
                out["decoder.adaptive_softmax.head.weight"] = torch.cat([v, own["adaptive_softmax.class_weight"]])
        elif k == "adaptive_softmax.class_weight":
            if cfg.tie_adaptive_weights:
                out["decoder.adaptive_softmax.head.class_proj.weight"] = v
        elif k == "adaptive_softmax.head_in_proj.weight":
            out["decoder.adaptive_softmax.head.word_proj.0.weight"] = v
        elif k.startswith("adaptive_softmax.tail_proj."):
            out[f"decoder.adaptive_softmax.tail.{k.split('.')[-1]}.0.weight"] = v if tied_proj else v.t().contiguous()
        elif k.startswith("adaptive_softmax.tail_out."):
            out[f"decoder.adaptive_softmax.tail.{k.split('.')[-1]}.2.weight"] = v
        elif k.startswith("embed_tokens.highway."):  # fairseq's Highway keeps its layers in .layers
            out["decoder.embed_tokens.highway.layers." + k[len("embed_tokens.highway.") :]] = v
        else:
            out[f"decoder.{k}"] = v
    if "decoder.adaptive_softmax.head.word_proj.0.weight" in out:  # word_proj became a Sequential
        out["decoder.adaptive_softmax.head.word_proj.1.weight"] = out.pop(
            "decoder.adaptive_softmax.head.word_proj.weight"
        )
    if cfg.adaptive_input:
        out["decoder.embed_tokens._float_tensor"] = torch.zeros(1)
    if cfg.adaptive_softmax_cutoff is not None:
        out["decoder.adaptive_softmax.version"] = torch.tensor([1])
        out["decoder.adaptive_softmax.head._float_tensor"] = torch.zeros(1)
    return out


def fairseq_model_cfg(cfg: ModelConfig, tokens_per_sample: int) -> dict[str, Any]:
    """Every field of fairseq's TransformerLanguageModelConfig, as built: ``_name`` is the plain ``transformer_lm``
    (fairseq then honours every stored value, decoder_normalize_before included), a pruned model is stored with
    its layer count and no ``decoder_layers_to_keep`` (fairseq would prune it again)."""
    m: dict[str, Any] = {k: v for k, v in cfg.to_dict().items() if k not in ("vocab_size", "padding_idx")}
    for k in ("adaptive_input_cutoff", "adaptive_softmax_cutoff"):
        m[k] = ",".join(map(str, m[k])) if m[k] is not None else None
    m.update(_name="transformer_lm", tokens_per_sample=tokens_per_sample, decoder_layers=cfg.num_layers,
             decoder_layers_to_keep=None)  # fmt: skip
    return m


# fairseq 0.12's GenerationConfig defaults (fairseq/dataclass/configs.py), as fairseq-train writes them
FAIRSEQ_GENERATION: dict[str, Any] = {
    "_name": None, "beam": 5, "beam_mt": 0, "nbest": 1, "max_len_a": 0.0, "max_len_b": 200, "max_len_a_mt": 0.0,
    "max_len_b_mt": 200, "min_len": 1, "match_source_len": False, "unnormalized": False, "no_early_stop": False,
    "no_beamable_mm": False, "lenpen": 1.0, "lenpen_mt": 1.0, "unkpen": 0.0, "replace_unk": None, "sacrebleu": False,
    "score_reference": False, "prefix_size": 0, "no_repeat_ngram_size": 0, "sampling": False, "sampling_topk": -1,
    "sampling_topp": -1.0, "constraints": None, "temperature": 1.0, "diverse_beam_groups": -1,
    "diverse_beam_strength": 0.5, "diversity_rate": -1.0, "print_alignment": None, "print_step": False,
    "lm_path": None, "lm_weight": 0.0, "iter_decode_eos_penalty": 0.0, "iter_decode_max_iter": 10,
    "iter_decode_force_max_iter": False, "iter_decode_with_beam": 1, "iter_decode_with_external_reranker": False,
    "retain_iter_history": False, "retain_dropout": False, "retain_dropout_modules": None, "decoding_format": None,
    "no_seed_provided": False, "eos_token": None,
}  # fmt: skip


# fairseq 0.12's DatasetConfig defaults: its hub's batching reads them
FAIRSEQ_DATASET: dict[str, Any] = {
    "_name": None, "num_workers": 1, "skip_invalid_size_inputs_valid_test": False, "max_tokens": None,
    "batch_size": None, "required_batch_size_multiple": 8, "required_seq_len_multiple": 1, "dataset_impl": None,
    "data_buffer_size": 10, "train_subset": "train", "valid_subset": "valid", "combine_valid_subsets": None,
    "ignore_unused_valid_subsets": False, "validate_interval": 1, "validate_interval_updates": 0,
    "validate_after_updates": 0, "fixed_validation_seed": None, "disable_validation": False, "max_tokens_valid": None,
    "batch_size_valid": None, "max_valid_steps": None, "curriculum": 0, "gen_subset": "test", "num_shards": 1,
    "shard_id": 0, "grouped_shuffling": False, "update_epoch_batch_itr": False, "update_ordered_indices_seed": False,
}  # fmt: skip


def to_fairseq_checkpoint(model: torch.nn.Module, cfg: ModelConfig, tokens_per_sample: int | None) -> dict[str, Any]:
    """A checkpoint fairseq's own loader and hub accept: fairseq's key names and a ``cfg`` of plain dicts."""
    tps = tokens_per_sample or cfg.max_target_positions
    task = {
        "_name": "language_modeling",
        "data": ".",
        "sample_break_mode": "none",
        "tokens_per_sample": tps,
        "output_dictionary_size": -1,
        "self_target": False,
        "future_target": False,
        "past_target": False,
        "add_bos_token": cfg.add_bos_token,
        "max_target_positions": None,
        "shorten_method": "none",
        "shorten_data_split_list": "",
        "seed": 1,
    }
    fs_cfg = {
        "_name": None,
        "common": {"_name": None, "seed": 1, "cpu": False, "tpu": False, "bf16": False, "fp16": False,
                   "memory_efficient_fp16": False, "memory_efficient_bf16": False, "user_dir": None,
                   "model_parallel_size": 1},
        "dataset": dict(FAIRSEQ_DATASET),
        "common_eval": {"_name": None, "path": None, "post_process": None, "quiet": False, "model_overrides": "{}",
                        "results_path": None},
        "task": task,
        "model": fairseq_model_cfg(cfg, tps),
        "criterion": {"_name": "adaptive_loss", "sentence_avg": False},
        "generation": dict(FAIRSEQ_GENERATION),  # fairseq's hub (score, sample) copies and reads it
        "bpe": None,
        "tokenizer": None,
    }  # fmt: skip
    return {
        "args": None,
        "cfg": fs_cfg,
        "model": state_dict_to_fairseq(model, cfg),
        "criterion": None,
        "optimizer_history": [
            {
                "criterion_name": "AdaptiveLoss",
                "optimizer_name": "FairseqNAG",
                "lr_scheduler_state": {"best": None},
                "num_updates": 0,
            }
        ],
        "task_state": {},
        "extra_state": {"train_iterator": {"epoch": 1}, "val_loss": None},
        "last_optimizer_state": None,
    }
