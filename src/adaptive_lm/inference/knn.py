"""kNN-LM (Khandelwal et al., ICLR 2020) on our models: a datastore, a FAISS index over it, interpolated evaluation.

The released WikiText-103 model is mostly used today as the base of kNN-LM (valid 17.96 -> 16.06, test 18.65 ->
16.12), through ``urvashik/knnlm``, an unmaintained 2019 fairseq fork whose datastore is written in one
unresumable pass of ~400 GB with int16 values that overflow WikiText-103's ids (knnlm#6). Here:

* ``adaptive-lm knn-store DATA --path MODEL --dstore DIR`` walks a split with ``adaptive-lm eval``'s exact block and
  context-window semantics (``evaluate.plan`` / ``evaluate.scored_batches``) and writes, for every scored token, the
  key (``last_ffn_input``: the input of the last layer's ``fc1``, knnlm's default; or ``final``: the features before
  the softmax), the value (the target id, int32) and the LM's log-prob of the token, into ``.npy`` files
  preallocated from the plan's token count (memory bounded whatever the split's size). ``manifest.json`` holds what
  the store was made from (model weights, dictionary, settings, data) and how far it got: an interrupted run
  continues where it stopped, and a store of another model, dictionary or setting is refused, never overwritten.
* ``adaptive-lm knn-index DIR`` builds knnlm's IVF-PQ index (or an exact flat one) with FAISS, recorded against
  the store's fingerprint in ``index.json``.
* ``adaptive-lm eval ... --knn DIR`` (``knn_evaluate``) and the Python API (``KNN``, ``knn_score``) interpolate:
  ``log(lambda * p_kNN + (1 - lambda) * p_LM)``, where p_kNN is the softmax over the k neighbours of
  ``-(squared L2 distance) / temperature`` (or the inner product), recomputed in float64 from the stored keys
  (knnlm's ``--knn-sim-func`` recomputation) unless ``approximate`` asks for the index's own distances, summed per
  token id. Everything is done with logsumexp, so no probability underflows to 0 by accident.

No pickles: JSON and ``.npy`` only (the FAISS index is FAISS's own binary format).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adaptive_lm.core.errors import UserError
from adaptive_lm.core.metrics import perplexity
from adaptive_lm.core.options import opt
from adaptive_lm.core.progress import Progress
from adaptive_lm.inference.evaluate import EvalConfig, EvalPlan, check_dictionary, plan, scored_batches
from adaptive_lm.inference.hub import LanguageModel

STORE_FORMAT = "adaptive-lm-knn-datastore"
INDEX_FORMAT = "adaptive-lm-knn-index"
VERSION = 1
MANIFEST, KEYS, VALS, LM_LOGPROBS = "manifest.json", "keys.npy", "vals.npy", "lm_logprobs.npy"
INDEX, INDEX_META = "index.faiss", "index.json"
KEYTYPES = ("last_ffn_input", "final")
AUTO_FLAT_BELOW = 100_000  # ``--index auto``: an exact flat index below this many keys
POINTS_PER_CENTROID = 39  # faiss's k-means warns below 39 training points per centroid
PQ_CENTROIDS = 256  # 8-bit PQ codes: 256 centroids per sub-quantizer
LAMBDA_GRID = tuple(round(0.01 * i, 2) for i in range(100))  # the sweep's search grid for the best lambda
LAMBDA_SHOWN = (0.0, 0.1, 0.2, 0.25, 0.3, 0.4, 0.5)
GATHER_BYTES = 1 << 20  # float64 neighbour keys per chunk when recomputing distances (stays in cache)


# =====================================================================================================
# Small helpers: faiss, hashes, JSON
# =====================================================================================================
def import_faiss(what: str) -> Any:
    """faiss, imported only when an index is built or searched (it is an optional extra)."""
    try:
        import faiss
    except ImportError:
        raise UserError(f"{what} needs faiss: pip install 'adaptive-lm[knn]'") from None
    return faiss


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


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    """Atomically (temporary file, fsync, rename): a kill at any moment leaves the old or the new manifest."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: Path, fmt: str, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({e}); rebuild the {what}") from None
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        raise UserError(f"{path}: not an adaptive-lm {what} record (format {obj.get('format')!r}); rebuild the {what}")
    if obj.get("version", 0) > VERSION:
        raise UserError(f"{path}: written by a newer adaptive-lm (version {obj['version']}); upgrade adaptive-lm")
    return obj


def _fingerprint(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB" if n < 1e9 else f"{n / 1e9:,.2f} GB"


# =====================================================================================================
# Keys: what is captured from the model
# =====================================================================================================
def key_dim(model: torch.nn.Module, keytype: str) -> int:
    """Width of the keys of ``keytype`` for this model."""
    if keytype == "last_ffn_input":
        return int(model.layers[-1].fc1.in_features)  # type: ignore[index,union-attr]
    if keytype == "final":
        out = model.project_out_dim  # type: ignore[union-attr]
        return int(out.out_features) if out is not None else int(model.cfg.decoder_embed_dim)  # type: ignore[union-attr]
    raise UserError(f"unknown key type {keytype!r}: use one of {', '.join(KEYTYPES)}")


class KeyCapture:
    """Holds the keys of the last forward pass, captured by hooks, so that taking them costs no second forward.

    ``last_ffn_input``: a forward pre-hook on the last layer's ``fc1`` sees exactly its input (after the layer's
    LayerNorm in pre-LN models): knnlm's default key. ``final``: a forward hook on the model sees its output, the
    features before the softmax. Called as ``feature_fn(src) -> (B, W, k)`` by ``evaluate.scored_batches``.
    """

    def __init__(self, model: torch.nn.Module, keytype: str) -> None:
        key_dim(model, keytype)  # validates the name
        self.value: torch.Tensor | None = None
        if keytype == "last_ffn_input":
            self.handle = model.layers[-1].fc1.register_forward_pre_hook(self._pre)  # type: ignore[index,union-attr]
        else:
            self.handle = model.register_forward_hook(self._post)

    def _pre(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        self.value = args[0]  # (B, W, d)

    def _post(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self.value = output if torch.is_tensor(output) else output[0]  # (B, W, d_out)

    def __call__(self, src: torch.Tensor) -> torch.Tensor:
        v, self.value = self.value, None
        if v is None or tuple(v.shape[:2]) != tuple(src.shape):
            raise RuntimeError("KeyCapture: no keys from the last forward pass of this batch")
        return v

    def close(self) -> None:
        self.handle.remove()

    def __enter__(self) -> KeyCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# =====================================================================================================
# The datastore
# =====================================================================================================
@dataclass
class StoreConfig:
    """What ``adaptive-lm knn-store`` writes besides the split's blocks (those are an ``EvalConfig``)."""

    dstore: str = opt("", "datastore folder (created, or resumed)", kind="creatable_dir")
    keytype: str = opt("last_ffn_input", "last_ffn_input: input of the last layer's feed-forward block (knnlm's "
                       "default); final: features before the softmax", choices=list(KEYTYPES))  # fmt: skip
    fp16_keys: bool = opt(False, "store keys as float16 (half the disk; knnlm's choice)")
    max_blocks: int | None = opt(None, "only the first N blocks of the split (trials, tests)", kind="positive")
    flush_every: int = opt(100, "batches between saved progress points (what an interruption can lose)",
                           kind="positive")  # fmt: skip
    overwrite: bool = opt(False, "replace a datastore made with other settings")
    progress: bool = opt(True, "no progress output (a bar on a terminal, a line per 10% in logs)",
                         flags=("--no-progress-bar",))  # fmt: skip


def first_blocks(p: EvalPlan, n: int | None) -> EvalPlan:
    """The plan limited to its first ``n`` blocks (context windows still come from the blocks before)."""
    if not n or n >= len(p.dataset):
        return p
    keep = np.arange(len(p.dataset)) < n
    ds = p.dataset.subset(keep)
    return EvalPlan(ds, p.split, p.block, p.tokens_per_sample, p.context, p.rows, int(ds.sizes.sum()))


class RowWriter:
    """Writes rows into a preallocated ``.npy`` at their offsets with ``pwrite``.

    Why not a writable memmap: its dirty pages count in the process's memory until written back, and on a full
    disk a write into a sparse mapping kills the process with SIGBUS; ``pwrite`` keeps memory at one batch and turns
    a full disk into an error with a message. The file is created sparse by ``numpy.lib.format.open_memmap``.
    """

    def __init__(self, path: Path, dtype: np.dtype, shape: tuple[int, ...], create: bool) -> None:
        self.path, self.dtype, self.shape = path, np.dtype(dtype), shape
        if create:
            mm = np.lib.format.open_memmap(path, mode="w+", dtype=self.dtype, shape=shape)
            del mm
        self.f = open(path, "r+b")
        try:
            version = np.lib.format.read_magic(self.f)
            header = (
                np.lib.format.read_array_header_1_0(self.f)
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0(self.f)
            )
        except ValueError as e:
            self.f.close()
            raise UserError(f"{path}: not a .npy file ({e}); rebuild the datastore with --overwrite") from None
        self.offset = self.f.tell()
        if tuple(header[0]) != tuple(shape) or np.dtype(header[2]) != self.dtype or header[1]:
            self.f.close()
            raise UserError(
                f"{path}: holds {header[2]} {tuple(header[0])}, the manifest says {self.dtype} {tuple(shape)}; the "
                f"datastore is damaged: rebuild it with --overwrite"
            )
        self.row_bytes = self.dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))

    def write(self, row: int, values: np.ndarray) -> None:
        data = np.ascontiguousarray(values, dtype=self.dtype)
        buf, pos = memoryview(data).cast("B"), self.offset + row * self.row_bytes
        while len(buf):
            n = os.pwrite(self.f.fileno(), buf, pos)
            buf, pos = buf[n:], pos + n

    def sync(self) -> None:
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


def _settings(lm: LanguageModel, cfg: EvalConfig, p: EvalPlan, scfg: StoreConfig) -> dict[str, Any]:
    """What the stored keys depend on besides the model: a resume must use the same."""
    data = Path(cfg.data)
    return {
        "gen_subset": cfg.gen_subset,
        "data_digest": file_digest(data / f"{cfg.gen_subset}.bin"),
        "tokens_per_sample": p.tokens_per_sample,
        "context_window": p.context,
        "sample_break_mode": cfg.sample_break_mode,
        "full_blocks_only": bool(cfg.full_blocks_only),
        "max_blocks": scfg.max_blocks or None,
        "blocks_per_batch": p.rows,
        "bf16": bool(cfg.bf16),
        "fp16": bool(cfg.fp16),
        "add_bos_token": bool(lm.cfg.add_bos_token),
    }


# how to name an identity field in a refusal: (what it is, the flag that sets it)
_FIELD_NAMES = {
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


def _identity_diff(stored: dict[str, Any], now: dict[str, Any]) -> str | None:
    """The first field where two store identities differ, said in words with its flag."""
    flat_s = {**{k: v for k, v in stored.items() if k != "settings"}, **stored.get("settings", {})}
    flat_n = {**{k: v for k, v in now.items() if k != "settings"}, **now.get("settings", {})}
    # causes before consequences: a setting explains a different token count or dimension, not the other way round
    first = ("model_weights", "dictionary", "keytype", "key_dtype", *now.get("settings", {}))
    for key in [*first, *(k for k in flat_n if k not in first)]:
        if flat_s.get(key) != flat_n[key]:
            what, flag = _FIELD_NAMES.get(key, (key, key))
            return f"{what} {flat_s.get(key)!r}, not {flat_n[key]!r} ({flag})"
    return None


def _existing_manifest(out: Path, identity: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """The manifest of the store to resume in ``out``, None to start afresh (``--overwrite`` removes ours first), or a
    refusal when the folder holds a store made differently or files we did not write."""
    mpath = out / MANIFEST
    ours = [out / f for f in (KEYS, VALS, LM_LOGPROBS, INDEX, INDEX_META)]
    if overwrite:
        for f in [mpath, *ours]:
            f.unlink(missing_ok=True)
        return None
    if mpath.exists():
        manifest = _read_json(mpath, STORE_FORMAT, "datastore")
        how = _identity_diff(manifest["identity"], identity)
        if how is not None:
            raise UserError(
                f"{mpath}: this datastore was made with {how}; rerun with the settings it was made with to resume "
                f"it, choose another --dstore, or pass --overwrite to replace it"
            )
        return manifest
    if any(f.exists() for f in ours):
        raise UserError(
            f"{out}: holds datastore files but no {MANIFEST} (not ours, or its first write was cut short); choose an "
            f"empty folder or pass --overwrite"
        )
    return None


def _new_manifest(lm: LanguageModel, cfg: EvalConfig, p: EvalPlan, identity: dict[str, Any], out: Path) -> dict:
    """A fresh store's manifest (nothing done yet), after checking the disk has room for all of it."""
    N, dim = identity["count"], identity["dim"]
    key_dtype, val_dtype = np.dtype(identity["key_dtype"]), np.dtype(identity["val_dtype"])
    need = N * (dim * key_dtype.itemsize + val_dtype.itemsize + 4)
    free = shutil.disk_usage(out).free
    if need > free:
        raise UserError(
            f"{out}: the datastore needs {_mb(need)} ({N:,} keys of {dim} x {key_dtype.name}) but only {_mb(free)} "
            f"is free there; choose another --dstore (or --fp16-keys to halve the keys)"
        )
    return {
        "format": STORE_FORMAT,
        "version": VERSION,
        "fingerprint": _fingerprint(identity),
        "identity": identity,
        "model": {
            "source": lm.source,
            "file_digest": model_file_digest(lm.source),
            "parameters": lm.model.num_parameters(),
        },
        "dictionary_size": len(lm.dictionary),
        "data": str(Path(cfg.data).resolve()),
        "plan": p.describe(),
        "files": {
            "keys": {"name": KEYS, "dtype": key_dtype.name, "shape": [N, dim]},
            "vals": {"name": VALS, "dtype": val_dtype.name, "shape": [N]},
            "lm_logprobs": {"name": LM_LOGPROBS, "dtype": "float32", "shape": [N]},
        },
        "progress": {"blocks_total": len(p.dataset), "blocks_done": 0, "tokens_done": 0, "complete": False},
        "seconds": 0.0,
    }


def build_store(lm: LanguageModel, cfg: EvalConfig, scfg: StoreConfig) -> tuple[dict[str, Any], list[str]]:
    """Write (or resume, or find complete) the datastore of ``cfg``'s split in ``scfg.dstore``; returns the manifest
    and the lines to print. Memory stays at one batch; progress is saved every ``flush_every`` batches and on an
    interruption (KeyboardInterrupt, any error), so rerunning the same command continues from there."""
    if scfg.keytype not in KEYTYPES:
        raise UserError(f"unknown --keytype {scfg.keytype!r}: use one of {', '.join(KEYTYPES)}")
    data = Path(cfg.data)
    check_dictionary(lm, data)
    p = first_blocks(plan(lm, cfg), scfg.max_blocks)
    if p.n_tokens == 0:
        raise UserError(f"{data / cfg.gen_subset}: no blocks to store with these settings (empty split?)")
    model = lm.model.eval()
    dim = key_dim(model, scfg.keytype)
    key_dtype = np.dtype(np.float16 if scfg.fp16_keys else np.float32)
    val_dtype = np.dtype(np.int32 if len(lm.dictionary) < 2**31 else np.int64)  # knnlm's int16 overflowed (#6)
    N = p.n_tokens
    identity = {
        "model_weights": weights_digest(model),
        "dictionary": lm.dictionary.fingerprint(),
        "keytype": scfg.keytype,
        "dim": dim,
        "count": N,
        "key_dtype": key_dtype.name,
        "val_dtype": val_dtype.name,
        "settings": _settings(lm, cfg, p, scfg),
    }
    out = Path(scfg.dstore)
    out.mkdir(parents=True, exist_ok=True)
    manifest = _existing_manifest(out, identity, scfg.overwrite)
    if manifest is not None and manifest["progress"]["complete"]:
        return manifest, [f"{out}: datastore already complete ({N:,} keys); nothing to do"] + _store_lines(
            out, manifest
        )
    fresh = manifest is None
    if fresh:
        manifest = _new_manifest(lm, cfg, p, identity, out)
    assert manifest is not None
    writers = [
        RowWriter(out / KEYS, key_dtype, (N, dim), fresh),
        RowWriter(out / VALS, val_dtype, (N,), fresh),
        RowWriter(out / LM_LOGPROBS, np.dtype(np.float32), (N,), fresh),
    ]
    if fresh:
        _write_json(out / MANIFEST, manifest)
    try:
        return _fill(lm, cfg, p, scfg, manifest, writers, out)
    finally:
        for w in writers:
            w.close()


def _fill(
    lm: LanguageModel,
    cfg: EvalConfig,
    p: EvalPlan,
    scfg: StoreConfig,
    manifest: dict[str, Any],
    writers: list[RowWriter],
    out: Path,
) -> tuple[dict[str, Any], list[str]]:
    keys_w, vals_w, lp_w = writers
    prog = manifest["progress"]
    start_block, pos = int(prog["blocks_done"]), int(prog["tokens_done"])
    start_pos, resumed = pos, start_block > 0
    key_dtype = keys_w.dtype
    t0, last_saved = time.time(), time.time()
    elapsed0 = float(manifest.get("seconds", 0.0))

    def save(complete: bool = False) -> None:
        nonlocal last_saved
        for w in writers:
            w.sync()  # the data first: the manifest never claims more than what is on disk
        now = time.time()
        prog.update(blocks_done=blocks_done, tokens_done=pos, complete=complete)
        manifest["seconds"] = round(elapsed0 + now - t0, 3)
        _write_json(out / MANIFEST, manifest)
        last_saved = now

    blocks_done, batches = start_block, 0
    interrupted = True
    try:
        with (
            KeyCapture(lm.model, scfg.keytype) as capture,
            Progress(len(p.dataset), f"knn-store {cfg.gen_subset}", scfg.progress, start_block, "blocks") as bar,
        ):
            for b in scored_batches(lm, cfg, p, feature_fn=capture, start_block=start_block):
                n = len(b.targets)
                assert b.features is not None
                k32 = b.features.float().cpu().numpy()  # (n, dim)
                k = k32.astype(key_dtype, copy=False)
                if key_dtype == np.float16 and not np.isfinite(k).all() and np.isfinite(k32).all():
                    raise UserError(
                        f"{out / KEYS}: keys exceed float16's range (largest |key| {np.abs(k32).max():.4g}); rerun "
                        f"with --overwrite and without --fp16-keys"
                    )
                keys_w.write(pos, k)
                vals_w.write(pos, b.targets)
                lp_w.write(pos, b.logprobs)
                pos += n
                blocks_done += len(b.block_lengths)
                batches += 1
                bar.update(len(b.block_lengths))
                if batches % scfg.flush_every == 0:
                    save()
        interrupted = False
    finally:
        if interrupted:  # KeyboardInterrupt or an error: keep what the finished batches wrote
            save()
    if pos != p.n_tokens:
        raise UserError(f"{out}: wrote {pos:,} keys, the plan has {p.n_tokens:,}; rebuild with --overwrite")
    seconds = time.time() - t0
    loss = _stored_lm_loss(out / LM_LOGPROBS)
    manifest["lm"] = {"loss_base2": loss, "ppl": perplexity(loss)}
    manifest["rate_tokens_per_s"] = round((pos - start_pos) / max(seconds, 1e-9), 1)
    save(complete=True)
    head = f"{out}: resumed at block {start_block:,}, " if resumed else f"{out}: "
    rate = manifest["rate_tokens_per_s"]
    lines = [head + f"stored {pos - start_pos:,} tokens in {seconds:.1f}s ({rate:,.0f} tokens/s)"]
    return manifest, lines + _store_lines(out, manifest)


def _stored_lm_loss(path: Path) -> float:
    """The LM's loss (bits per token) over the stored log-probs, read in slices so a WikiText-103 store (103M
    tokens) never sits in memory; non-finite entries (none in a complete store) are left out."""
    lp = np.load(path, mmap_mode="r")
    total, count = 0.0, 0
    for i in range(0, len(lp), 1 << 22):
        part = lp[i : i + (1 << 22)].astype(np.float64)
        fin = np.isfinite(part)
        total, count = total + float(part[fin].sum()), count + int(fin.sum())
    return -total / max(count, 1) / math.log(2)


def _store_lines(out: Path, m: dict[str, Any]) -> list[str]:
    ident = m["identity"]
    sizes = {f: (out / f).stat().st_size for f in (KEYS, VALS, LM_LOGPROBS) if (out / f).exists()}
    total = sum(sizes.values())
    lines = [
        m["plan"],
        f"datastore: {ident['count']:,} keys ({ident['keytype']}, {ident['dim']} dims, {ident['key_dtype']}), "
        f"values {ident['val_dtype']}, LM log-probs float32; "
        + ", ".join(f"{f} {_mb(s)}" for f, s in sizes.items())
        + f" ({total / max(ident['count'], 1):,.0f} B/key)",
    ]
    if "lm" in m:
        lines.append(
            f"LM on these tokens: Loss (base 2): {m['lm']['loss_base2']:.4f}, Perplexity: {m['lm']['ppl']:.2f}"
        )
    lines.append(f"next: adaptive-lm knn-index {out}")
    return lines


def load_manifest(dstore: str | os.PathLike, for_what: str = "this") -> dict[str, Any]:
    """The manifest of a complete datastore, or a one-line refusal saying what to do."""
    d = Path(dstore)
    mpath = d / MANIFEST
    if not d.is_dir():
        raise UserError(f"{d}: no such folder (make a datastore with adaptive-lm knn-store)")
    if not mpath.is_file():
        raise UserError(f"{mpath}: missing: {d} is not a kNN datastore (make one with adaptive-lm knn-store)")
    m = _read_json(mpath, STORE_FORMAT, "datastore")
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
    return m


# =====================================================================================================
# The index
# =====================================================================================================
@dataclass
class IndexConfig:
    """``adaptive-lm knn-index``'s settings: which FAISS index, and how it is trained."""

    index: str = opt("auto", f"flat: exact; ivfpq: knnlm's compressed index; auto: flat below {AUTO_FLAT_BELOW:,} keys",
                     choices=["auto", "flat", "ivfpq"])  # fmt: skip
    ncentroids: int = opt(4096, "IVF lists (clamped for small stores)", kind="positive")
    code_size: int = opt(64, "PQ bytes per key (8-bit sub-quantizers)", kind="positive")
    nprobe: int = opt(
        32, "IVF lists searched: recorded as the default of eval --nprobe", flags=("--probe",), kind="positive"
    )
    train_sample: int = opt(1_000_000, "keys sampled to train IVF-PQ", kind="positive")
    chunk: int = opt(1_000_000, "keys added per call", kind="positive")
    opq: bool = opt(False, "OPQ rotation before PQ")
    metric: str = opt("l2", "what the index measures", choices=["l2", "ip"])
    seed: int = opt(1, "seed of the training sample", kind=int)
    overwrite: bool = opt(False, "replace an existing index")
    progress: bool = opt(True, "no progress output (a bar on a terminal, a line per 10% in logs)",
                         flags=("--no-progress-bar",))  # fmt: skip


def _describe_index(meta: dict[str, Any]) -> str:
    if meta["type"] == "flat":
        return f"flat ({meta['metric']}, exact)"
    opq = ", OPQ" if meta.get("opq") else ""
    return (
        f"ivfpq ({meta['metric']}, {meta['ncentroids']} lists, {meta['code_size']}-byte codes{opq}, "
        f"nprobe {meta['probe']})"
    )


def _gpu(faiss: Any, index: Any) -> Any:
    """The index on the GPU when faiss-gpu sees one (float16 lookup tables: 64-byte codes need them); else itself."""
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        return index
    res = faiss.StandardGpuResources()
    co = faiss.GpuClonerOptions()
    co.useFloat16 = True
    g = faiss.index_cpu_to_gpu(res, 0, index, co)
    g.referenced_resources = res  # keep the resources alive as long as the index
    return g


def _trained_ivfpq(
    faiss: Any, keys: np.ndarray, icfg: IndexConfig, notes: list[str], d: Path
) -> tuple[Any, dict[str, Any], float]:
    """An IVF-PQ index trained on a random sample of ``keys`` (on the GPU when faiss-gpu sees one), the settings it
    really used (centroids and code size are lowered, with a note, when the sample or the dimension needs it), and
    the training seconds."""
    N, dim = keys.shape
    n_train = min(icfg.train_sample, N)
    if n_train < POINTS_PER_CENTROID * PQ_CENTROIDS:
        raise UserError(
            f"{d}: IVF-PQ needs at least {POINTS_PER_CENTROID * PQ_CENTROIDS:,} training keys (39 per PQ "
            f"centroid x 256), this store has {N:,} (--train-sample {icfg.train_sample:,}): use --index flat"
        )
    nlist = icfg.ncentroids
    if n_train < POINTS_PER_CENTROID * nlist:
        nlist = max(1, n_train // POINTS_PER_CENTROID)
        notes.append(
            f"--ncentroids {icfg.ncentroids} needs {POINTS_PER_CENTROID * icfg.ncentroids:,} training keys "
            f"(faiss: {POINTS_PER_CENTROID} per centroid); {n_train:,} available: using {nlist} centroids"
        )
    code = icfg.code_size
    if dim % code:
        code = max(c for c in range(1, min(code, dim) + 1) if dim % c == 0)
        notes.append(
            f"--code-size {icfg.code_size} does not divide the key dimension {dim}: using {code} bytes (one per "
            f"sub-quantizer)"
        )
    quantizer = faiss.IndexFlatL2(dim) if icfg.metric == "l2" else faiss.IndexFlatIP(dim)
    metric = faiss.METRIC_L2 if icfg.metric == "l2" else faiss.METRIC_INNER_PRODUCT
    index = faiss.IndexIVFPQ(quantizer, dim, nlist, code, 8, metric)
    index.nprobe = icfg.nprobe
    if icfg.opq:
        index = faiss.IndexPreTransform(faiss.OPQMatrix(dim, code), index)
    rng = np.random.default_rng(icfg.seed)
    sample = np.sort(rng.choice(N, size=n_train, replace=False))
    train = np.ascontiguousarray(keys[sample], dtype=np.float32)  # (n_train, dim)
    t1 = time.time()
    if icfg.opq:
        index.train(train)  # faiss cannot move an OPQ pre-transform to the GPU
    else:
        g = _gpu(faiss, index)
        g.train(train)
        index = faiss.index_gpu_to_cpu(g) if g is not index else index
    train_s = time.time() - t1
    del train
    return index, dict(ncentroids=nlist, code_size=code, probe=icfg.nprobe, opq=icfg.opq, train_sample=n_train), train_s


def build_index(dstore: str | os.PathLike, icfg: IndexConfig) -> tuple[dict[str, Any], list[str]]:
    """knnlm's recipe: IVF-PQ trained on a random sample of the keys, keys added in chunks; or an exact flat index.
    Returns the index record (also written to ``index.json`` and the store's manifest) and the lines to print."""
    d = Path(dstore)
    m = load_manifest(d, "indexing it")
    faiss = import_faiss("adaptive-lm knn-index")
    ipath, jpath = d / INDEX, d / INDEX_META
    if ipath.exists() and not icfg.overwrite:
        try:
            old = _describe_index(_read_json(jpath, INDEX_FORMAT, "index"))
        except UserError:
            old = "unrecorded"
        raise UserError(f"{ipath}: exists ({old}); pass --overwrite to rebuild it")
    keys = np.load(d / KEYS, mmap_mode="r")  # (N, dim)
    N, dim = keys.shape
    notes: list[str] = []
    kind = icfg.index
    if kind == "auto":
        kind = "flat" if N < AUTO_FLAT_BELOW else "ivfpq"
        notes.append(f"--index auto: {kind} ({N:,} keys {'<' if kind == 'flat' else '>='} {AUTO_FLAT_BELOW:,})")
    meta: dict[str, Any] = {"format": INDEX_FORMAT, "version": VERSION, "type": kind, "metric": icfg.metric}
    t0 = time.time()
    train_s = 0.0
    if kind == "flat":
        index = faiss.IndexFlatL2(dim) if icfg.metric == "l2" else faiss.IndexFlatIP(dim)
    else:
        index, ivf, train_s = _trained_ivfpq(faiss, keys, icfg, notes, d)
        meta.update(ivf)
    t1 = time.time()
    with Progress(N, "knn-index add", icfg.progress, unit="keys") as bar:
        for i in range(0, N, icfg.chunk):
            part = np.ascontiguousarray(keys[i : i + icfg.chunk], dtype=np.float32)  # (chunk, dim)
            index.add(part)
            bar.update(len(part))
    add_s = time.time() - t1
    tmp = d / (INDEX + ".tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, ipath)
    seconds = time.time() - t0
    size = ipath.stat().st_size
    meta.update(
        store_fingerprint=m["fingerprint"],
        store=str(d.resolve()),
        index_digest=file_digest(ipath),
        ntotal=int(index.ntotal),
        dim=int(dim),
        bytes=size,
        bytes_per_key=round(size / max(N, 1), 2),
        seconds=round(seconds, 3),
        train_seconds=round(train_s, 3),
        add_seconds=round(add_s, 3),
        faiss=getattr(faiss, "__version__", "?"),
        notes=notes,
    )
    _write_json(jpath, meta)
    m["index"] = {k: meta[k] for k in ("type", "metric", "bytes", "bytes_per_key", "seconds", "ntotal")}
    _write_json(d / MANIFEST, m)
    lines = [*notes, f"{ipath}: {_describe_index(meta)}, {N:,} keys of {dim} dims"]
    lines.append(
        f"built in {seconds:.1f}s (train {train_s:.1f}s, add {add_s:.1f}s); {_mb(size)} ({size / max(N, 1):,.1f} B/key)"
    )
    lines.append(f"next: adaptive-lm eval DATA --path MODEL --knn {d} --lmbda 0.25 --k 1024")
    return meta, lines


# =====================================================================================================
# Search and interpolation
# =====================================================================================================
def interpolate(lm_lp: np.ndarray, knn_lp: np.ndarray, lmbda: float) -> np.ndarray:
    """log(lambda * p_kNN + (1 - lambda) * p_LM) from the two natural-log probabilities, in logsumexp form."""
    lm_lp, knn_lp = np.asarray(lm_lp, dtype=np.float64), np.asarray(knn_lp, dtype=np.float64)
    if lmbda <= 0:
        return lm_lp.copy()
    if lmbda >= 1:
        return knn_lp.copy()
    return np.logaddexp(math.log(lmbda) + knn_lp, math.log1p(-lmbda) + lm_lp)


def _loss_base2(lp: np.ndarray) -> float:
    return float(-lp.mean() / math.log(2)) if len(lp) else 0.0


class KNN:
    """A loaded datastore with its index: ``KNN.load(dir, k=1024)`` then ``knn.log_probs(queries, lm_lp, targets,
    lmbda)``. ``queries`` are the keys of the positions being scored, taken from the same model in the same way as
    the store's keys (``knn.capture(model)``, or ``knn_score`` which does it all)."""

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        index: Any,
        index_meta: dict[str, Any],
        k: int,
        temperature: float,
        sim: str,
        approximate: bool,
        nprobe: int,
    ) -> None:
        self.path, self.manifest, self.index, self.index_meta = path, manifest, index, index_meta
        self.keys = np.load(path / KEYS, mmap_mode="r")  # (N, dim)
        # the same file mapped copy-on-write: torch wants a writable array and nothing here writes to it
        self.keys_t = torch.from_numpy(np.load(path / KEYS, mmap_mode="c"))  # (N, dim)
        self.vals = np.load(path / VALS, mmap_mode="r")  # (N,)
        self.k, self.temperature, self.sim, self.approximate, self.nprobe = k, temperature, sim, approximate, nprobe
        self.search_seconds = 0.0
        self.distance_seconds = 0.0
        self._checked_weights: tuple[int, str] | None = None

    @classmethod
    def load(
        cls,
        dstore: str | os.PathLike,
        k: int = 1024,
        temperature: float = 1.0,
        sim: str = "l2",
        approximate: bool = False,
        nprobe: int | None = None,
    ) -> KNN:
        """Open a complete datastore and its index (refusing, by name, an incomplete store or an index built on
        another store). ``sim`` is the similarity of the softmax (``l2``: minus the squared distance, ``ip``: the
        inner product); ``approximate`` uses the index's distances instead of recomputing them from the keys;
        ``nprobe`` (IVF lists searched) defaults to the value ``knn-index`` recorded."""
        if k < 1:
            raise UserError(f"k must be positive, not {k}")
        if not temperature > 0:
            raise UserError(f"the kNN temperature must be positive, not {temperature}")
        if sim not in ("l2", "ip"):
            raise UserError(f"unknown kNN similarity {sim!r}: use l2 or ip")
        d = Path(dstore)
        m = load_manifest(d, "using it")
        ipath, jpath = d / INDEX, d / INDEX_META
        if not ipath.is_file():
            raise UserError(f"{ipath}: missing: build the index first with adaptive-lm knn-index {d}")
        if not jpath.is_file():
            raise UserError(
                f"{jpath}: missing, so {ipath} cannot be matched to this store: rerun knn-index --overwrite"
            )
        meta = _read_json(jpath, INDEX_FORMAT, "index")
        if meta.get("store_fingerprint") != m["fingerprint"]:
            raise UserError(
                f"{ipath}: built on another datastore ({meta.get('store')}, fingerprint "
                f"{meta.get('store_fingerprint')}), not {d} ({m['fingerprint']}): rebuild it with adaptive-lm "
                f"knn-index {d} --overwrite"
            )
        if file_digest(ipath) != meta.get("index_digest"):
            raise UserError(
                f"{ipath}: not the index recorded in {jpath} (its contents differ: copied from another store?); "
                f"rebuild it with adaptive-lm knn-index {d} --overwrite"
            )
        if approximate and meta["metric"] != sim:
            raise UserError(
                f"{jpath}: the index measures {meta['metric']}, so its approximate distances cannot give --knn-sim "
                f"{sim}: drop --knn-approx-dists (recompute from the keys) or rebuild with --metric {sim}"
            )
        faiss = import_faiss("kNN-LM search")
        index = faiss.read_index(str(ipath))
        nprobe = int(nprobe if nprobe is not None else meta.get("probe", 32))
        if meta["type"] != "flat":
            faiss.extract_index_ivf(index).nprobe = nprobe
        index = _gpu(faiss, index)
        return cls(d, m, index, meta, k, temperature, sim, approximate, nprobe)

    # ---- what the store holds -----------------------------------------------------------------------------
    @property
    def count(self) -> int:
        return int(self.manifest["identity"]["count"])

    @property
    def dim(self) -> int:
        return int(self.manifest["identity"]["dim"])

    @property
    def keytype(self) -> str:
        return str(self.manifest["identity"]["keytype"])

    @property
    def k_used(self) -> int:
        return min(self.k, self.count)

    def describe(self) -> str:
        how = "index distances" if self.approximate else f"recomputed in float64 from {KEYS}"
        if self.index_meta["metric"] != self.sim:
            how += f"; neighbours found by {self.index_meta['metric']}"
        index = _describe_index({**self.index_meta, "probe": self.nprobe})
        return (
            f"datastore {self.path} ({self.count:,} keys, {self.keytype}, {self.dim} dims, "
            f"{self.manifest['identity']['key_dtype']}), index {index}; "
            f"k {self.k} (used {self.k_used}), temperature {self.temperature:g}, similarity {self.sim} ({how})"
        )

    def check_model(self, lm: LanguageModel) -> None:
        """Refuse, by name, a model or dictionary other than the store's: its queries would not match the keys."""
        ident = self.manifest["identity"]
        mpath = self.path / MANIFEST
        if lm.dictionary.fingerprint() != ident["dictionary"]:
            raise UserError(
                f"{mpath}: the datastore was made with dictionary {ident['dictionary']}, this model's dictionary is "
                f"{lm.dictionary.fingerprint()} ({len(lm.dictionary)} symbols): use the model and dict.txt it was "
                f"made with, or make a datastore with this one"
            )
        dim = key_dim(lm.model, self.keytype)
        if dim != self.dim:
            raise UserError(
                f"{mpath}: the datastore's keys have {self.dim} dimensions, this model's {self.keytype} has {dim}: it "
                f"was made with another model ({self.manifest['model']['source']}); use that model or make a "
                f"datastore with this one"
            )
        if self._checked_weights is None or self._checked_weights[0] != id(lm.model):  # once per model object
            digest = weights_digest(lm.model)
            if digest != ident["model_weights"]:
                raise UserError(
                    f"{mpath}: the datastore was made with another model (weights {ident['model_weights']}, from "
                    f"{self.manifest['model']['source']}), not this one (weights {digest}, "
                    f"{lm.source or 'in memory'}): "
                    f"use that model or make a datastore with this one"
                )
            self._checked_weights = (id(lm.model), digest)

    def capture(self, model: torch.nn.Module) -> KeyCapture:
        """Hooks that take this store's kind of key from every forward pass of ``model``."""
        return KeyCapture(model, self.keytype)

    def interpolate_rows(
        self, keys: torch.Tensor, target: torch.Tensor, rows: list[dict[str, torch.Tensor]], lmbda: float
    ) -> list[dict[str, torch.Tensor]]:
        """``LanguageModel.score(knn=...)``'s step: each sentence's LM scores (``rows[i]["positional_scores"]``, its
        first n positions) interpolated with the kNN distribution of the keys captured at those positions."""
        n = torch.tensor([len(r["positional_scores"]) for r in rows])
        mask = torch.arange(target.shape[1])[None, :] < n[:, None]  # (B, W): the scored positions
        knn_lp = torch.from_numpy(self.knn_log_probs(keys.cpu()[mask], target.cpu()[mask]))  # (N,)
        out, off = [], 0
        for r, m in zip(rows, n.tolist()):
            lm_r, kn_r = r["positional_scores"], knn_lp[off : off + m]
            off += m
            inter = torch.from_numpy(interpolate(lm_r.double().numpy(), kn_r.numpy(), lmbda)).float()
            out.append({"positional_scores": inter, "lm_positional_scores": lm_r, "knn_positional_scores": kn_r})
        return out

    # ---- search ---------------------------------------------------------------------------------------------
    def search(self, queries: np.ndarray | torch.Tensor, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest stored keys of every query: ``scores`` (N, k) float64, the softmax's logits (-d^2/T or
        q.k/T), sorted best first (ties: the earlier stored token first), ``-inf`` where the index found fewer than
        k, and their ``values`` (N, k) int64 (-1 there)."""
        q = queries.detach().float().cpu().numpy() if torch.is_tensor(queries) else np.asarray(queries, np.float32)
        q = np.ascontiguousarray(q, dtype=np.float32)  # (N, dim)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise UserError(f"kNN queries must be (N, {self.dim}), got {tuple(q.shape)}")
        k = min(k or self.k, self.count)
        # A flat index ranks in float32 (|q|^2 + |k|^2 - 2qk), which can swap near-ties at the k-th neighbour; a few
        # extra candidates re-ranked in float64 make the exact search exact. IVF-PQ keeps knnlm's semantics: the k
        # neighbours it found, their distances recomputed.
        extra = max(16, k // 8) if self.index_meta["type"] == "flat" and not self.approximate else 0
        t0 = time.time()
        dist, idx = self.index.search(q, min(k + extra, self.count))  # (N, k') float32, (N, k') int64
        self.search_seconds += time.time() - t0
        found = idx >= 0
        safe = np.where(found, idx, 0)
        vals = np.where(found, np.asarray(self.vals[safe.ravel()], dtype=np.int64).reshape(idx.shape), -1)
        t0 = time.time()
        if self.approximate:
            raw = dist.astype(np.float64)
            scores = -raw if self.sim == "l2" else raw
        else:
            scores = self._recompute(q, safe)
        scores = np.where(found, scores / self.temperature, -np.inf)
        # best first; on equal scores (identical keys: the same context) the earlier stored token wins, so that the
        # neighbour set does not depend on the index's tie order
        order = np.lexsort((np.where(found, idx, np.iinfo(np.int64).max), -scores), axis=1)[:, :k]
        self.distance_seconds += time.time() - t0
        return np.take_along_axis(scores, order, 1), np.take_along_axis(vals, order, 1)

    def _recompute(self, q: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """-(squared L2 distance) or the inner product, in float64, against the neighbours' stored keys.

        The keys are gathered a few queries at a time (about 1 MiB of float64) and the differences are formed,
        squared and summed in place while they sit in cache: exact (no |k|^2 - 2qk + |q|^2 cancellation) and, on
        this machine, 3x faster than the expanded form with large chunks."""
        n, k = idx.shape
        out = torch.empty(n, k, dtype=torch.float64)
        qt = torch.from_numpy(q)  # (n, dim)
        it = torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64))  # (n, k)
        step = max(1, GATHER_BYTES // max(1, k * self.dim * 8))
        for i in range(0, n, step):
            kk = self.keys_t.index_select(0, it[i : i + step].reshape(-1)).view(-1, k, self.dim).double()  # (b, k, d)
            qq = qt[i : i + step, None, :].double()  # (b, 1, d)
            if self.sim == "ip":
                out[i : i + step] = kk.mul_(qq).sum(-1)
            else:
                out[i : i + step] = kk.sub_(qq).square_().sum(-1).neg_()
        return out.numpy()

    @staticmethod
    def log_prob_of(scores: np.ndarray, values: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """ln p_kNN(target) from ``search``'s output: softmax over the neighbours, summed over those whose value is
        the target (-inf where none is)."""
        s = torch.from_numpy(np.asarray(scores, dtype=np.float64))  # (N, k)
        hit = torch.from_numpy(np.asarray(values) == np.asarray(targets, dtype=np.int64)[:, None])  # (N, k)
        num = torch.logsumexp(s.masked_fill(~hit, -math.inf), dim=1)  # (N,)
        return (num - torch.logsumexp(s, dim=1)).numpy()

    def knn_log_probs(self, queries: np.ndarray | torch.Tensor, targets: Any) -> np.ndarray:
        """ln p_kNN(target) per query, float64 (N,)."""
        t = targets.cpu().numpy() if torch.is_tensor(targets) else np.asarray(targets)
        if len(t) != len(queries):
            raise UserError(f"kNN-LM: {len(queries)} queries but {len(t)} targets; give one query per scored token")
        scores, values = self.search(queries)
        return self.log_prob_of(scores, values, t)

    def log_probs(
        self, queries: np.ndarray | torch.Tensor, lm_logprobs_of_targets: Any, targets: Any, lmbda: float
    ) -> Any:
        """Interpolated ln p per query: log(lambda p_kNN + (1 - lambda) p_LM), float64; a torch tensor if
        ``lm_logprobs_of_targets`` is one, else a numpy array."""
        if not 0 <= lmbda <= 1:
            raise UserError(f"lambda must be in [0, 1], not {lmbda}")
        is_t = torch.is_tensor(lm_logprobs_of_targets)
        lm_lp = lm_logprobs_of_targets.detach().double().cpu().numpy() if is_t else np.asarray(lm_logprobs_of_targets)
        out = interpolate(lm_lp, self.knn_log_probs(queries, targets), lmbda)
        return torch.from_numpy(out) if is_t else out


# =====================================================================================================
# Interpolated evaluation (``adaptive-lm eval --knn``) and scoring (``knn_score``)
# =====================================================================================================
@dataclass
class KNNResult:
    n_tokens: int
    lmbda: float
    lm_loss_base2: float
    lm_ppl: float
    loss_base2: float
    ppl: float
    sweep: list[tuple[float, float, float]]  # (lambda, loss base 2, ppl)
    best: tuple[float, float, float]
    k: int
    k_used: int
    seconds: float
    search_seconds: float
    distance_seconds: float
    hit_rate: float  # share of tokens whose neighbours hold the target
    store: str = ""
    plan: str = ""
    lm_scores: np.ndarray | None = None  # ln p_LM per token, stream order
    knn_scores: np.ndarray | None = None  # ln p_kNN
    scores: np.ndarray | None = None  # interpolated
    targets: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def lambda_sweep(lm_lp: np.ndarray, knn_lp: np.ndarray, grid: Sequence[float] = LAMBDA_GRID) -> list[tuple]:
    """(lambda, loss base 2, perplexity) for every lambda of ``grid``: p_kNN is computed once, so this is free."""
    out = []
    for lam in grid:
        loss = _loss_base2(interpolate(lm_lp, knn_lp, lam))
        out.append((float(lam), loss, perplexity(loss)))
    return out


def _knn_pass(lm: LanguageModel, cfg: EvalConfig, p: EvalPlan, knn: KNN) -> tuple[np.ndarray, ...]:
    """One pass over the plan: (N,) ln p_LM, (N,) ln p_kNN of each target from its captured key, (N,) targets."""
    lm_parts, knn_parts, tgt_parts = [], [], []
    with (
        knn.capture(lm.model) as capture,
        Progress(len(p.dataset), f"eval {cfg.gen_subset} + kNN", cfg.progress, unit="blocks") as bar,
    ):
        for b in scored_batches(lm, cfg, p, feature_fn=capture):
            assert b.features is not None
            lm_parts.append(b.logprobs)
            knn_parts.append(knn.knn_log_probs(b.features, b.targets))
            tgt_parts.append(b.targets)
            bar.update(len(b.block_lengths))
    lm_lp = np.concatenate(lm_parts) if lm_parts else np.zeros(0)
    knn_lp = np.concatenate(knn_parts) if knn_parts else np.zeros(0)
    targets = np.concatenate(tgt_parts) if tgt_parts else np.zeros(0, dtype=np.int64)
    return lm_lp, knn_lp, targets


def knn_evaluate(
    lm: LanguageModel,
    cfg: EvalConfig,
    dstore: str | os.PathLike,
    *,
    k: int = 1024,
    lmbda: float = 0.25,
    temperature: float = 1.0,
    sim: str = "l2",
    approximate: bool = False,
    nprobe: int | None = None,
    max_blocks: int | None = None,
    keep_scores: bool = False,
) -> KNNResult:
    """``adaptive-lm eval --knn``: the split scored as ``evaluate`` scores it, each token's LM probability
    interpolated with the kNN distribution of its key. Returns LM-only and interpolated loss (base 2) and
    perplexity, a lambda sweep (0..0.99) with its best value, k used, times; with ``keep_scores`` the per-token
    ln p_LM, ln p_kNN and interpolated scores."""
    if not 0 <= lmbda <= 1:
        raise UserError(f"--lmbda must be in [0, 1], not {lmbda}")
    knn = KNN.load(dstore, k=k, temperature=temperature, sim=sim, approximate=approximate, nprobe=nprobe)
    knn.check_model(lm)
    check_dictionary(lm, Path(cfg.data))
    p = first_blocks(plan(lm, cfg), max_blocks)
    t0 = time.time()
    lm_lp, knn_lp, targets = _knn_pass(lm, cfg, p, knn)
    seconds = time.time() - t0
    finite = np.isfinite(lm_lp)  # as eval-lm: tokens the LM gives +-inf are skipped
    lm_f, knn_f = lm_lp[finite], knn_lp[finite]
    lm_loss = _loss_base2(lm_f)
    inter = interpolate(lm_lp, knn_lp, lmbda)
    loss = _loss_base2(inter[finite])
    sweep = lambda_sweep(lm_f, knn_f)
    best = min(sweep, key=lambda r: r[1])
    res = KNNResult(
        n_tokens=int(finite.sum()),
        lmbda=lmbda,
        lm_loss_base2=lm_loss,
        lm_ppl=perplexity(lm_loss),
        loss_base2=loss,
        ppl=perplexity(loss),
        sweep=sweep,
        best=best,
        k=k,
        k_used=knn.k_used,
        seconds=seconds,
        search_seconds=knn.search_seconds,
        distance_seconds=knn.distance_seconds,
        hit_rate=float(np.isfinite(knn_f).mean()) if len(knn_f) else 0.0,
        store=knn.describe(),
        plan=p.describe(),
    )
    if keep_scores:
        res.lm_scores, res.knn_scores, res.scores, res.targets = lm_lp, knn_lp, inter, targets
    return res


def knn_summary_lines(res: KNNResult) -> list[str]:
    """What ``adaptive-lm eval --knn`` prints; the last two lines are eval's own (for --quiet and scripts)."""
    shown = [r for r in res.sweep if any(abs(r[0] - s) < 1e-9 for s in LAMBDA_SHOWN)]
    rate = res.n_tokens / res.seconds if res.seconds > 0 else 0.0
    model_s = max(0.0, res.seconds - res.search_seconds - res.distance_seconds)
    return [
        f"kNN-LM: {res.store}",
        res.plan,
        f"target among the {res.k_used} neighbours for {100 * res.hit_rate:.1f}% of the tokens",
        f"LM only: Loss (base 2): {res.lm_loss_base2:.4f}, Perplexity: {res.lm_ppl:.2f}",
        "lambda sweep (ppl): " + ", ".join(f"{lam:g}: {ppl:.2f}" for lam, _, ppl in shown),
        f"best lambda {res.best[0]:g}: Loss (base 2): {res.best[1]:.4f}, Perplexity: {res.best[2]:.2f}",
        f"Evaluated {res.n_tokens:,} tokens in {res.seconds:.1f}s ({rate:.2f} tokens/s; model {model_s:.1f}s, "
        f"neighbour search {res.search_seconds:.1f}s, distances {res.distance_seconds:.1f}s)",
        f"Loss (base 2): {res.loss_base2:.4f}, Perplexity: {res.ppl:.2f} (kNN-LM, lambda {res.lmbda:g}, "
        f"k {res.k_used})",
    ]


def knn_score(
    lm: LanguageModel,
    sentences: str | list[str],
    knn: KNN,
    lmbda: float = 0.25,
    batch_size: int = 16,
    replace_newline_with_eos: bool = False,
) -> dict | list[dict]:
    """``lm.score`` with kNN-LM (``lm.score(sentences, knn=knn, lmbda=lmbda)``): the same dicts, the scores being the
    interpolated ln p, plus ``lm_positional_scores`` and ``knn_positional_scores``. With ``lmbda=0`` the
    ``positional_scores`` are exactly ``lm.score``'s."""
    return lm.score(sentences, replace_newline_with_eos, batch_size, knn=knn, lmbda=lmbda)
