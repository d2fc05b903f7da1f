"""What a datastore and its index say about themselves: the JSON records (``manifest.json``, ``index.json``), the
digests and fingerprints that tie a store to its model, data and settings, and the words for a mismatch.

Why apart: the store writes these records, the index and the search read them back to refuse a store or an index
that does not belong; all three must agree on one format and one way of telling things apart.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adaptive_lm.core.errors import UserError
from adaptive_lm.inference.knn.rows import check_npy

STORE_FORMAT = "adaptive-lm-knn-datastore"
INDEX_FORMAT = "adaptive-lm-knn-index"
VERSION = 1
MANIFEST, KEYS, VALS, LM_LOGPROBS = "manifest.json", "keys.npy", "vals.npy", "lm_logprobs.npy"
INDEX, INDEX_META = "index.faiss", "index.json"

# how to name an identity field in a refusal: (what it is, the flag that sets it)
FIELD_NAMES = {
    "model_weights": ("model weights", "--path"),
    "dictionary": ("dictionary fingerprint", "--path/--dict"),
    "keytype": ("key type", "--keytype"),
    "dim": ("key dimension", "--path"),
    "count": ("token count", "DATA/--gen-subset"),
    "key_dtype": ("key dtype", "--fp16-keys"),
    "val_dtype": ("value dtype", "--path"),
    "gen_subset": ("split", "--gen-subset"),
    "data_digest": ("split contents", "DATA"),
    "tokens_per_sample": ("tokens per sample", "--tokens-per-sample"),
    "context_window": ("context window", "--context-window"),
    "sample_break_mode": ("sample break mode", "--sample-break-mode"),
    "full_blocks_only": ("full blocks only", "--full-blocks-only"),
    "max_blocks": ("max blocks", "--max-blocks"),
    "blocks_per_batch": ("blocks per batch", "--batch-size/--max-tokens"),
    "bf16": ("bf16", "--bf16"),
    "fp16": ("fp16", "--fp16"),
    "add_bos_token": ("add_bos_token", "--path"),
}


def file_digest(path: str | os.PathLike, span: int = 1 << 20) -> str:
    """sha256 of a file's size, first and last MiB: tells files apart in O(1) even for a 400 GB one."""
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(p, "rb") as f:
        h.update(f.read(span))
        if size > span:
            f.seek(max(span, size - span))
            h.update(f.read(span))
    return h.hexdigest()[:16]


def weights_digest(model: torch.nn.Module) -> str:
    """A hash of the weights themselves (every parameter's name, shape and a strided sample of 4,096 values):
    the same model loaded from a fairseq checkpoint or an exported folder hashes the same, another model (or the
    same one trained further) does not. Milliseconds even for the 247M-parameter WikiText-103 model."""
    h = hashlib.sha256()
    for name, t in model.named_parameters():  # tied tensors once
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)][:4096].float().cpu().numpy()
        h.update(f"{name}:{tuple(t.shape)}:".encode())
        h.update(np.ascontiguousarray(sample).tobytes())
    return h.hexdigest()[:16]


def model_file_digest(source: str) -> str | None:
    """``file_digest`` of the file the weights came from (an exported folder's safetensors), for the record."""
    if not source:
        return None
    p = Path(source)
    if p.is_dir():
        p = p / "model.safetensors"
    return file_digest(p) if p.is_file() else None


def fingerprint(identity: dict[str, Any]) -> str:
    """The store's identity in 16 hex digits: what an index records to be matched to its store."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def size_text(n: float) -> str:
    """A byte count for people: MB below a GB, GB above."""
    return f"{n / 1e6:,.1f} MB" if n < 1e9 else f"{n / 1e9:,.2f} GB"


def read_record(path: Path, fmt: str, what: str) -> dict[str, Any]:
    """A manifest or index record of format ``fmt``, or a refusal saying to rebuild the ``what``."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({e}); rebuild the {what}") from None
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        found = f"format {obj.get('format')!r}" if isinstance(obj, dict) else f"a JSON {type(obj).__name__}"
        raise UserError(f"{path}: not an adaptive-lm {what} record ({found}); rebuild the {what}")
    if obj.get("version", 0) > VERSION:
        raise UserError(f"{path}: written by a newer adaptive-lm (version {obj['version']}); upgrade adaptive-lm")
    return obj


def identity_diff(stored: dict[str, Any], now: dict[str, Any]) -> str | None:
    """The first field where two store identities differ, said in words with its flag."""
    flat_s = {**{k: v for k, v in stored.items() if k != "settings"}, **stored.get("settings", {})}
    flat_n = {**{k: v for k, v in now.items() if k != "settings"}, **now.get("settings", {})}
    # causes before consequences: a setting explains a different token count or dimension, not the other way round
    first = ("model_weights", "dictionary", "keytype", "key_dtype", *now.get("settings", {}))
    for key in [*first, *(k for k in flat_n if k not in first)]:
        if flat_s.get(key) != flat_n[key]:
            what, flag = FIELD_NAMES.get(key, (key, key))
            return f"{what} {flat_s.get(key)!r}, not {flat_n[key]!r} ({flag})"
    return None


def load_manifest(dstore: str | os.PathLike, for_what: str = "this") -> dict[str, Any]:
    """The manifest of a complete datastore, or a one-line refusal saying what to do."""
    d = Path(dstore)
    mpath = d / MANIFEST
    if not d.is_dir():
        raise UserError(f"{d}: no such folder (make a datastore with adaptive-lm knn-store)")
    if not mpath.is_file():
        raise UserError(f"{mpath}: missing: {d} is not a kNN datastore (make one with adaptive-lm knn-store)")
    m = read_record(mpath, STORE_FORMAT, "datastore")
    missing = [k for k in ("progress", "identity") if not isinstance(m.get(k), dict)]
    missing += [f"identity.{k}" for k in ("count", "dim", "key_dtype", "val_dtype") if k not in m.get("identity", {})]
    if missing:
        raise UserError(
            f"{mpath}: no {missing[0]} in it; the datastore is damaged: rebuild it with knn-store --overwrite"
        )
    prog = m["progress"]
    if not prog["complete"]:
        raise UserError(
            f"{mpath}: the datastore is incomplete ({prog['tokens_done']:,} of {m['identity']['count']:,} tokens, "
            f"{prog['blocks_done']:,} of {prog['blocks_total']:,} blocks): rerun the same adaptive-lm knn-store "
            f"command to finish it before {for_what}"
        )
    for f in (KEYS, VALS):
        if not (d / f).is_file():
            raise UserError(f"{d / f}: missing although {mpath} says complete; rebuild with knn-store --overwrite")
    ident = m["identity"]
    check_npy(d / KEYS, np.dtype(ident["key_dtype"]), (ident["count"], ident["dim"]))
    check_npy(d / VALS, np.dtype(ident["val_dtype"]), (ident["count"],))
    return m
