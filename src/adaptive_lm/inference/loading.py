"""``from_pretrained``: one entry point for every model file a user may hold, with fairseq's hub signature.

Accepted: a fairseq checkpoint (``model.pt`` / ``checkpoint_best.pt``) with ``dict.txt`` beside it or in a
``data-bin/`` folder beside it, one of our training checkpoints (it carries its dictionary), an exported
model folder (``config.json`` + ``model.safetensors`` + ``dict.txt``), a folder holding any of these, a fairseq
archive, or a released model's name.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from adaptive_lm.core.config import ModelConfig, typed_overrides
from adaptive_lm.core.dictionary import Dictionary
from adaptive_lm.core.errors import UserError
from adaptive_lm.core.fairseq_format import (
    config_from_fairseq,
    load_into,
    safe_load,
    state_dict_from_fairseq,
    stored_settings,
    stored_vocab_size,
)
from adaptive_lm.core.model import TransformerLM, prune_layers
from adaptive_lm.core.serialization import FORMAT, dictionary_from_payload
from adaptive_lm.inference.hub import LanguageModel
from adaptive_lm.inference.tokenizer import MOSES_ARGS, make_pipeline

# files fairseq's hub picks up from a model folder by themselves (``hub_utils.from_pretrained``), and ours
BPE_FILES = {"sentencepiece.bpe.model": "sentencepiece_model", "encoder.json": "gpt2_encoder_json",
             "vocab.bpe": "gpt2_vocab_bpe"}  # fmt: skip
BPE_ARGS = ("gpt2_encoder_json", "gpt2_vocab_bpe", "sentencepiece_model")


class NoDictionary(UserError):
    """A model without a dict.txt where ``find_dictionary`` looks (evaluation then takes the data's, as fairseq)."""


def find_dictionary(model_path: Path, tried: list[Path] | None = None) -> Path:
    """dict.txt next to the model, in data-bin/ next to it, or one level up: say which paths were tried."""
    base = model_path if model_path.is_dir() else model_path.parent
    candidates = [base / "dict.txt", base / "data-bin" / "dict.txt", base.parent / "dict.txt"]
    for c in candidates:
        if c.is_file():
            return c
    tried_s = ", ".join(str(c) for c in candidates)
    raise NoDictionary(f"{model_path}: no dict.txt found (tried {tried_s}); pass dictionary=PATH (--dict)")


def _pick_file(folder: Path) -> Path:
    for name in ("model.safetensors", "model.pt", "checkpoint_best.pt", "checkpoint_last.pt"):
        if (folder / name).is_file():
            return folder if name == "model.safetensors" else folder / name
    raise UserError(
        f"{folder}: no model here (looked for model.safetensors, model.pt, checkpoint_best.pt, checkpoint_last.pt)"
    )


def load_fairseq(
    path: Path,
    dictionary: Dictionary,
    ckpt: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    overrides: dict[str, Any] | None = None,
) -> TransformerLM:
    """Build from the checkpoint's stored settings (never the arch name alone), with fairseq-style load-time
    ``overrides`` (e.g. ``decoder_layers_to_keep``), and load its weights: in fp32 unless ``dtype`` says otherwise,
    as fairseq copies them into its fp32 model (a checkpoint stored in fp16 had run in fp16: ln p off by 1e-2)."""
    ckpt = ckpt if ckpt is not None else safe_load(path)
    cfg = config_from_fairseq(stored_settings(ckpt), len(dictionary), overrides, state_keys=ckpt["model"].keys())
    sd = state_dict_from_fairseq(ckpt["model"], cfg)
    return _build(cfg, sd, str(path), dtype if dtype is not None else torch.float32, dictionary)


def _build(
    cfg: ModelConfig, sd: dict[str, torch.Tensor], source: str, dtype: torch.dtype | None, dictionary: Dictionary
) -> TransformerLM:
    with torch.device("meta"), _NoDrawsOnMeta():  # no random init, no second copy: the weights come from the file
        model = TransformerLM(cfg, dictionary.symbols)
    load_into(model, sd, source=source, dtype=dtype)
    model.materialize_buffers(symbols=dictionary.symbols)
    return model


class _NoDrawsOnMeta(TorchFunctionMode):
    """Building on the meta device, normal draws do nothing. Why: there is nothing to fill, and PyTorch runs a meta
    ``normal_`` through a Python reference that imports TorchDynamo: 0.7 s of every command that loads a model
    (a third of the fixture model's evaluation, start to end)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func in (torch.Tensor.normal_, torch.nn.init.normal_):
            t = args[0] if args else kwargs.get("tensor", kwargs.get("self"))
            if isinstance(t, torch.Tensor) and t.is_meta:
                return t
        return func(*args, **kwargs)


def _check_vocab(d: Dictionary, vocab: int | None, model: Path, given: Any) -> None:
    """A dictionary of another size than the model's output would give ids the model never learned."""
    if vocab is not None and len(d) != vocab:
        where = f"--dict {given}" if given else f"the dictionary found for {model}"
        raise UserError(
            f"{where} has {len(d)} symbols but the model was trained with {vocab}: use the model's own dict.txt"
        )


def _with_overrides(cfg: ModelConfig, overrides: dict[str, Any] | None) -> ModelConfig:
    """Our stored config with load-time overrides (the fields of ModelConfig, as fairseq's ``arg_overrides``)."""
    if not overrides:
        return cfg
    unknown = sorted(set(overrides) - set(ModelConfig.__dataclass_fields__))
    _refuse_knnlm_override(unknown)
    if unknown:
        raise UserError(f"unknown model override(s): {', '.join(unknown)} (use ModelConfig field names)")
    out = ModelConfig.from_dict({**cfg.to_dict(), **typed_overrides(overrides)})
    out.validate()
    return out


def _resolve(model_name_or_path: str | os.PathLike, checkpoint_file: str) -> Path:
    """The model file (or exported folder): a released name is downloaded, an archive extracted, a folder searched
    for ``checkpoint_file`` (by default also for our files: model.safetensors, checkpoint_best.pt, ...)."""
    from adaptive_lm.inference.download import RELEASED, fetch, is_archive, open_archive

    p = Path(model_name_or_path)
    if not p.exists() and str(model_name_or_path) in RELEASED:
        p = fetch(str(model_name_or_path))
    if not p.exists():
        raise UserError(f"{p}: no such file or folder (or a released model name: {', '.join(RELEASED)})")
    if p.is_file() and (p.name.endswith((".tar.bz2", ".tar.gz", ".tgz", ".tar")) or is_archive(p)):
        p = open_archive(p)
    if ":" in checkpoint_file:
        raise UserError(f"checkpoint_file {checkpoint_file!r}: ensembles of checkpoints are not supported; load one")
    if p.is_dir() and (p / checkpoint_file).is_file():
        return p / checkpoint_file
    if p.is_dir() and checkpoint_file != "model.pt":
        raise UserError(f"{p}: no {checkpoint_file} in this folder")
    return _pick_file(p) if p.is_dir() else p


def _split_kwargs(kwargs: dict[str, Any], overrides: dict[str, Any] | None) -> tuple[dict[str, Any], ...]:
    """fairseq's hub takes BPE files, Moses options, batching and model settings as keyword arguments (its
    ``arg_overrides``): (BPE files, Moses options, model overrides, batching overrides); any other keyword is refused
    by name."""
    bpe_args = {k: kwargs.pop(k) for k in BPE_ARGS if k in kwargs}
    tok_args = {k: kwargs.pop(k) for k in MOSES_ARGS if k in kwargs}
    batching = {k: kwargs.pop(k) for k in ("max_tokens", "batch_size") if k in kwargs}
    for k, v in batching.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral)):
            raise UserError(f"from_pretrained: {k} must be an integer (None, 0 or less: no limit), not {v!r}")
        batching[k] = int(v) if v is not None and v > 0 else None  # fairseq's batch_by_size: 0 or less is no limit
    tps = kwargs.pop("tokens_per_sample", None)  # fairseq's task setting: ours is evaluation's default block size
    if tps is not None:
        if isinstance(tps, bool) or not isinstance(tps, numbers.Integral) or tps < 1:
            raise UserError(f"from_pretrained: tokens_per_sample must be a positive integer, not {tps!r}")
        batching["tokens_per_sample"] = int(tps)
    if overrides is not None and not isinstance(overrides, dict):
        raise UserError(f"from_pretrained: overrides must be a dict of settings, not {type(overrides).__name__}")
    model = {k: kwargs.pop(k) for k in list(kwargs) if k in ModelConfig.__dataclass_fields__}
    _refuse_knnlm_override(list(kwargs))  # fairseq's hub takes its overrides as keywords too
    if kwargs:
        raise UserError(
            f"from_pretrained: unknown keyword(s) {', '.join(sorted(kwargs))} (accepted: dictionary, device, dtype, "
            f"tokenizer, bpe, {', '.join(BPE_ARGS)}, {', '.join(MOSES_ARGS)}, max_tokens, batch_size, "
            "tokens_per_sample, overrides, or a ModelConfig field)"
        )
    return bpe_args, tok_args, {**(overrides or {}), **model}, batching


def from_pretrained(
    model_name_or_path: str | os.PathLike,
    checkpoint_file: str = "model.pt",
    data_name_or_path: str = ".",
    *,
    dictionary: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    tokenizer: str | None = None,
    bpe: str | None = None,
    overrides: dict[str, Any] | None = None,
    **kwargs: Any,
) -> LanguageModel:
    """Load a model and its dictionary from any supported layout; returns it in eval mode.

    The positional arguments are fairseq's hub's (``TransformerLanguageModel.from_pretrained(dir, "model.pt",
    "data-bin")`` works as is): ``model_name_or_path`` is a folder, a model file, a fairseq ``.tar.bz2`` archive
    (extracted safely into the cache) or a released model's name (``wiki103``, ``gbw``: downloaded once, then
    cached); ``checkpoint_file`` the file in that folder (default ``model.pt``, else the model file found there);
    ``data_name_or_path`` the folder of ``dict.txt``, relative to the model's folder (default: beside the model, then
    ``data-bin/`` beside it). ``dictionary`` names a dict.txt directly.

    ``tokenizer="moses"`` and ``bpe="gpt2"`` / ``"sentencepiece"`` make ``encode``/``score``/``sample`` take raw
    text as fairseq's hub does (tokenizer, then BPE, then the dictionary); the BPE files come from the keyword
    arguments ``gpt2_encoder_json``/``gpt2_vocab_bpe``/``sentencepiece_model`` or, as in fairseq, from the model
    folder (``encoder.json``, ``vocab.bpe``, ``sentencepiece.bpe.model``). ``dtype`` loads straight into that dtype.
    ``overrides`` (or ModelConfig fields as keywords, as fairseq's ``arg_overrides``; also ``max_tokens`` /
    ``batch_size``, how ``generate`` batches prompts; ``tokens_per_sample``, the block size ``evaluate`` defaults to,
    which fairseq's hub accepts and ignores): model settings to change at load, e.g.
    ``{"decoder_layers_to_keep": "0,2"}`` to evaluate a LayerDrop-trained model with fewer layers.
    """
    bpe_args, tok_args, overrides, batch_overrides = _split_kwargs(dict(kwargs), overrides)
    dtype = _dtype(dtype)
    p = _resolve(model_name_or_path, checkpoint_file)
    folder = p if p.is_dir() else p.parent
    _check_data_path(folder, data_name_or_path, dictionary)
    for name, arg in BPE_FILES.items():
        if (folder / name).is_file():
            bpe_args.setdefault(arg, str(folder / name))
    stored_text: dict[str, Any] = {}
    if p.is_dir():
        model, d, tps, batching = _load_folder(p, dictionary, dtype, overrides)
    else:
        ckpt = safe_load(p)
        if not isinstance(ckpt, dict) or "model" not in ckpt:
            raise UserError(f"{p}: not a model checkpoint (no 'model' entry)")
        if ckpt.get("format") != FORMAT and not ckpt.get("cfg") and not ckpt.get("args"):
            raise UserError(f"{p}: no model settings in it (neither fairseq's 'cfg' nor 'args', nor ours)")
        if ckpt.get("format") == FORMAT:
            model, d, tps, batching = _load_ours(p, ckpt, dictionary, dtype, overrides)
        else:
            given = dictionary or _dictionary_in(folder, data_name_or_path)
            d = Dictionary.load(Path(given) if given else find_dictionary(p))
            _check_vocab(d, stored_vocab_size(ckpt["model"]), p, dictionary)
            settings = stored_settings(ckpt)
            _check_overrides(p, overrides, settings)
            model = load_fairseq(p, d, ckpt, dtype, overrides)
            tps = settings.get("tokens_per_sample")
            batching = _fairseq_batching(ckpt)
            stored_text = _stored_text_settings(ckpt)
    pipeline = _pipeline(tokenizer, bpe, tok_args, bpe_args, stored_text)
    if batch_overrides:  # as fairseq's arg_overrides of cfg.dataset: how the hub batches prompts
        batching = (batch_overrides.get("max_tokens", batching[0]), batch_overrides.get("batch_size", batching[1]))
        tps = batch_overrides.get("tokens_per_sample", tps)
    return LanguageModel(model, d, str(p), tps, pipeline, batching).to(device).eval()


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}  # fmt: skip


def _dtype(dtype: Any) -> torch.dtype | None:
    """``from_pretrained``'s ``dtype``: a floating torch dtype or its name."""
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise UserError(f"dtype {dtype!r}: give a floating torch dtype or one of {', '.join(DTYPES)}")


def _check_data_path(folder: Path, data_name_or_path: str, dictionary: Any) -> None:
    """A ``data_name_or_path`` given (not the default) must hold dict.txt: fairseq's hub fails there too."""
    if data_name_or_path in (".", "", None) or dictionary is not None:
        return
    if _dictionary_in(folder, data_name_or_path) is None:
        raise UserError(
            f"data_name_or_path {data_name_or_path!r}: no dict.txt there (as given, or relative to {folder})"
        )


def _refuse_knnlm_override(unknown: list[str]) -> None:
    """knnlm's scripts pass ``--model-overrides "{'knn_keytype': ...}"`` to fairseq (its fork reads it); here
    the datastore command takes the key type: say so rather than "unknown override"."""
    if "knn_keytype" in unknown:
        raise UserError(
            "model override knn_keytype is knnlm's (urvashik/knnlm), not a model setting: build the datastore with "
            "`adaptive-lm knn-store --keytype last_ffn_input` (the default; or final), or capture the keys with "
            "adaptive_lm.knn.KeyCapture(lm.model, 'last_ffn_input')"
        )


def _check_overrides(p: Path, overrides: dict[str, Any] | None, settings: dict[str, Any]) -> None:
    """fairseq's ``arg_overrides`` may name any stored setting; a key that is neither one of those nor a model
    setting is a typo that would change nothing."""
    unknown = sorted(set(overrides or {}) - set(ModelConfig.__dataclass_fields__) - set(settings))
    _refuse_knnlm_override(unknown)
    if unknown:
        raise UserError(f"{p}: unknown override(s) {', '.join(unknown)} (ModelConfig fields or the stored fairseq "
                        "settings)")  # fmt: skip


def _dictionary_in(folder: Path, data_name_or_path: str) -> Path | None:
    """The dict.txt in ``data_name_or_path``: fairseq's hub reads a path starting with "." relative to the model
    folder and any other as given (relative to the working directory); the model folder is tried second."""
    given = Path(data_name_or_path)
    first = folder / given if str(data_name_or_path).startswith(".") else given
    for base in (first, folder / given):
        if (base / "dict.txt").is_file():
            return base / "dict.txt"
    return None


def _load_folder(
    p: Path, dictionary: Any, dtype: Any, overrides: dict[str, Any]
) -> tuple[TransformerLM, Dictionary, int]:
    """An exported folder: config.json + model.safetensors + dict.txt."""
    if not (p / "config.json").is_file():
        raise UserError(
            f"{p}: an exported model folder needs config.json beside model.safetensors (written by "
            f"adaptive-lm convert); it is missing"
        )
    meta = _folder_config(p / "config.json")
    from safetensors.torch import load_file

    d = Dictionary.load(Path(dictionary) if dictionary else p / "dict.txt")
    _check_vocab(d, meta["model"]["vocab_size"], p, dictionary)
    cfg = _with_overrides(ModelConfig.from_dict(meta["model"]), overrides)
    try:
        weights = load_file(str(p / "model.safetensors"))
    except Exception as e:  # safetensors' own errors: a truncated or foreign file
        raise UserError(
            f"{p / 'model.safetensors'}: not a readable safetensors file ({str(e).splitlines()[0]}); write the "
            "folder again with adaptive-lm convert"
        ) from None
    sd = prune_layers(weights, cfg.decoder_layers_to_keep)
    batching = tuple(meta.get("batching") or (None, None))
    return _build(cfg, sd, str(p), dtype, d), d, meta.get("tokens_per_sample"), batching


def _folder_config(path: Path) -> dict[str, Any]:
    """An exported folder's config.json, checked: JSON of our format, model settings of the types their defaults
    have (a hand-edited file otherwise fails deep inside the model's construction)."""
    redo = "write the folder again with adaptive-lm convert"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); {redo}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise UserError(f'{path}: no "model" settings in it; {redo}')
    if meta.get("format", FORMAT) != FORMAT:
        raise UserError(f"{path}: format {meta['format']!r}, this version reads {FORMAT!r}; {redo}")
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    for key, value in meta["model"].items():
        want = defaults.get(key, dataclasses.MISSING)
        if want is dataclasses.MISSING or want is None or value is None:
            continue
        kind = bool if isinstance(want, bool) else (int, float) if isinstance(want, float) else type(want)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise UserError(f"{path}: model setting {key} = {value!r} is not of the type of {want!r}; {redo}")
    if not isinstance(meta["model"].get("vocab_size"), int):
        raise UserError(f"{path}: model setting vocab_size missing; {redo}")
    return meta


def _load_ours(p: Path, ckpt: dict[str, Any], dictionary: Any, dtype: Any, overrides: dict[str, Any]):
    """One of our training checkpoints: its config and dictionary travel inside."""
    d = Dictionary.load(dictionary) if dictionary else dictionary_from_payload(ckpt["dictionary"])
    _check_vocab(d, ckpt["config"]["model"]["vocab_size"], p, dictionary)
    if dictionary:  # the model's own words travel inside: another order of them would score other words silently
        how = d.diff(dictionary_from_payload(ckpt["dictionary"]))
        if how is not None:
            raise UserError(
                f"--dict {dictionary} differs from the dictionary stored in {p} ({how}; the --dict's first): "
                f"leave --dict out, the stored one is used"
            )
    cfg = _with_overrides(ModelConfig.from_dict(ckpt["config"]["model"]), overrides)
    model = _build(cfg, prune_layers(ckpt["model"], cfg.decoder_layers_to_keep), str(p), dtype, d)
    train = ckpt["config"].get("train") or {}
    return model, d, ckpt["config"].get("tokens_per_sample"), (train.get("max_tokens"), train.get("batch_size"))


def _fairseq_batching(ckpt: dict[str, Any]) -> tuple[int | None, int | None]:
    """The ``--max-tokens`` / ``--batch-size`` a fairseq checkpoint stores: its hub batches prompts with them."""
    cfg = ckpt.get("cfg")
    ds = cfg.get("dataset") if isinstance(cfg, dict) else None
    if not isinstance(ds, dict):  # an old ``args`` checkpoint: everything in one namespace
        ds = stored_settings(ckpt)
    return ds.get("max_tokens"), ds.get("batch_size", ds.get("max_sentences"))


def _pipeline(tokenizer: Any, bpe: Any, tok_args: dict[str, Any], bpe_args: dict[str, Any], stored: dict[str, Any]):
    """The text pipeline from the keywords, else the checkpoint's stored tokenizer and BPE. A stored Moses
    tokenizer is fairseq's step with its stored options (its text was tokenised so in training), not ours."""
    tokenizer = tokenizer or stored.get("tokenizer")
    if tokenizer == "moses" and stored.get("tokenizer") == "moses":
        tok_args = {**stored.get("tokenizer_args", {}), **tok_args, "wikitext": False}
    return make_pipeline(tokenizer, bpe or stored.get("bpe"), tok_args, **{**stored.get("bpe_args", {}), **bpe_args})


def _stored_text_settings(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The tokenizer and BPE a fairseq checkpoint was trained with (its ``cfg.tokenizer`` / ``cfg.bpe``), which
    fairseq's hub applies by default."""
    cfg = ckpt.get("cfg") or {}
    out: dict[str, Any] = {}
    tok = cfg.get("tokenizer") if isinstance(cfg, dict) else None
    if isinstance(tok, dict) and tok.get("_name"):
        out["tokenizer"] = tok["_name"]
        if tok["_name"] == "moses":
            out["tokenizer_args"] = {k: tok[k] for k in MOSES_ARGS if tok.get(k) is not None}
    bpe = cfg.get("bpe") if isinstance(cfg, dict) else None
    if isinstance(bpe, dict) and bpe.get("_name"):
        out["bpe"] = bpe["_name"]
        out["bpe_args"] = {k: v for k, v in bpe.items() if k in BPE_ARGS and v and Path(str(v)).is_file()}
    return out
