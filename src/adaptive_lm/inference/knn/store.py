"""The datastore (``adaptive-lm knn-store``): for every scored token of a split, its key, its value (the target id)
and the LM's log-prob, written into ``.npy`` files preallocated from the plan's token count.

Three parts: the manifest (what the store is made from, checked before anything is written: another model,
dictionary or setting is refused, never overwritten), the resume (an interrupted run continues from the last saved
progress point) and the fill (one pass of ``evaluate.scored_batches`` with the keys captured by hooks).
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adaptive_lm.core.errors import UserError
from adaptive_lm.core.files import atomic_write_json
from adaptive_lm.core.metrics import perplexity
from adaptive_lm.core.options import opt
from adaptive_lm.core.progress import Progress
from adaptive_lm.inference.evaluate import (
    EvalConfig,
    EvalPlan,
    ScoredBatch,
    check_dictionary,
    nonempty,
    plan,
    scored_batches,
)
from adaptive_lm.inference.hub import LanguageModel
from adaptive_lm.inference.knn.keys import KEYTYPES, KeyCapture, key_dim
from adaptive_lm.inference.knn.records import (
    INDEX,
    INDEX_META,
    KEYS,
    LM_LOGPROBS,
    MANIFEST,
    STORE_FORMAT,
    VALS,
    VERSION,
    file_digest,
    fingerprint,
    identity_diff,
    model_file_digest,
    read_record,
    size_text,
    weights_digest,
)
from adaptive_lm.inference.knn.rows import RowWriter


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


# ---- the manifest -------------------------------------------------------------------------------------------------
def _settings(lm: LanguageModel, cfg: EvalConfig, p: EvalPlan, scfg: StoreConfig) -> dict[str, Any]:
    """What the stored keys depend on besides the model: a resume must use the same."""
    data = Path(cfg.data)
    split = data / f"{cfg.gen_subset}.bin"
    if cfg.dataset_impl == "raw" or not split.is_file():  # raw text (given or inferred): the text file itself
        split = data / cfg.gen_subset
    return {
        "gen_subset": cfg.gen_subset,
        "data_digest": file_digest(split),
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


def _identity(lm: LanguageModel, cfg: EvalConfig, p: EvalPlan, scfg: StoreConfig) -> dict[str, Any]:
    """Everything the stored rows depend on: a store with another identity is refused, never resumed."""
    key_dtype = np.dtype(np.float16 if scfg.fp16_keys else np.float32)
    val_dtype = np.dtype(np.int32 if len(lm.dictionary) < 2**31 else np.int64)  # knnlm's int16 overflowed (#6)
    return {
        "model_weights": weights_digest(lm.model),
        "dictionary": lm.dictionary.fingerprint(),
        "keytype": scfg.keytype,
        "dim": key_dim(lm.model, scfg.keytype),
        "count": p.n_tokens,
        "key_dtype": key_dtype.name,
        "val_dtype": val_dtype.name,
        "settings": _settings(lm, cfg, p, scfg),
    }


def _new_manifest(lm: LanguageModel, cfg: EvalConfig, p: EvalPlan, identity: dict[str, Any], out: Path) -> dict:
    """A fresh store's manifest (nothing done yet), after checking the disk has room for all of it."""
    N, dim = identity["count"], identity["dim"]
    key_dtype, val_dtype = np.dtype(identity["key_dtype"]), np.dtype(identity["val_dtype"])
    need = N * (dim * key_dtype.itemsize + val_dtype.itemsize + 4)
    free = shutil.disk_usage(out).free
    if need > free:
        raise UserError(
            f"{out}: the datastore needs {size_text(need)} ({N:,} keys of {dim} x {key_dtype.name}) but only "
            f"{size_text(free)} is free there; choose another --dstore (or --fp16-keys to halve the keys)"
        )
    return {
        "format": STORE_FORMAT,
        "version": VERSION,
        "fingerprint": fingerprint(identity),
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


def _store_lines(out: Path, m: dict[str, Any]) -> list[str]:
    """What a finished (or already complete) store reports: its plan, sizes and the LM's loss on its tokens."""
    ident = m["identity"]
    sizes = {f: (out / f).stat().st_size for f in (KEYS, VALS, LM_LOGPROBS) if (out / f).exists()}
    total = sum(sizes.values())
    lines = [
        m["plan"],
        f"datastore: {ident['count']:,} keys ({ident['keytype']}, {ident['dim']} dims, {ident['key_dtype']}), "
        f"values {ident['val_dtype']}, LM log-probs float32; "
        + ", ".join(f"{f} {size_text(s)}" for f, s in sizes.items())
        + f" ({total / max(ident['count'], 1):,.0f} B/key)",
    ]
    if "lm" in m:
        lines.append(
            f"LM on these tokens: Loss (base 2): {m['lm']['loss_base2']:.4f}, Perplexity: {m['lm']['ppl']:.2f}"
        )
    lines.append(f"next: adaptive-lm knn-index {out}")
    return lines


# ---- the resume ---------------------------------------------------------------------------------------------------
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
        manifest = read_record(mpath, STORE_FORMAT, "datastore")
        how = identity_diff(manifest["identity"], identity)
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


def _open_writers(out: Path, identity: dict[str, Any], create: bool) -> list[RowWriter]:
    """Keys, values and LM log-probs: created (sparse) for a fresh store, checked against the manifest to resume."""
    N, dim = identity["count"], identity["dim"]
    return [
        RowWriter(out / KEYS, np.dtype(identity["key_dtype"]), (N, dim), create),
        RowWriter(out / VALS, np.dtype(identity["val_dtype"]), (N,), create),
        RowWriter(out / LM_LOGPROBS, np.dtype(np.float32), (N,), create),
    ]


# ---- the fill -----------------------------------------------------------------------------------------------------
class _Fill:
    """One pass of ``knn-store``: where it resumed, how far it got, and the manifest that records it (saved only after
    the rows it counts are on disk, so it never claims more than what is there)."""

    def __init__(self, manifest: dict[str, Any], writers: list[RowWriter], out: Path) -> None:
        self.manifest, self.writers, self.out = manifest, writers, out
        prog = manifest["progress"]
        self.start_block, self.start_pos = int(prog["blocks_done"]), int(prog["tokens_done"])
        self.blocks_done, self.pos, self.batches = self.start_block, self.start_pos, 0
        self.t0, self.elapsed0 = time.time(), float(manifest.get("seconds", 0.0))

    def add(self, b: ScoredBatch) -> None:
        """One scored batch's keys, targets and log-probs at the next rows."""
        keys_w, vals_w, lp_w = self.writers
        assert b.features is not None
        k32 = b.features.float().cpu().numpy()  # (n, dim)
        k = k32.astype(keys_w.dtype, copy=False)
        if keys_w.dtype == np.float16 and not np.isfinite(k).all() and np.isfinite(k32).all():
            raise UserError(
                f"{self.out / KEYS}: keys exceed float16's range (largest |key| {np.abs(k32).max():.4g}); rerun "
                f"with --overwrite and without --fp16-keys"
            )
        keys_w.write(self.pos, k)
        vals_w.write(self.pos, b.targets)
        lp_w.write(self.pos, b.logprobs)
        self.pos += len(b.targets)
        self.blocks_done += len(b.block_lengths)
        self.batches += 1

    def save(self, complete: bool = False) -> None:
        for w in self.writers:
            w.sync()  # the data first: the manifest never claims more than what is on disk
        self.manifest["progress"].update(blocks_done=self.blocks_done, tokens_done=self.pos, complete=complete)
        self.manifest["seconds"] = round(self.elapsed0 + time.time() - self.t0, 3)
        atomic_write_json(self.out / MANIFEST, self.manifest)

    def finish(self, n_tokens: int) -> list[str]:
        """Mark the store complete (with the LM's loss on its tokens) and say what was done."""
        out, m = self.out, self.manifest
        if self.pos != n_tokens:
            raise UserError(f"{out}: wrote {self.pos:,} keys, the plan has {n_tokens:,}; rebuild with --overwrite")
        seconds = time.time() - self.t0
        loss = _stored_lm_loss(out / LM_LOGPROBS)
        m["lm"] = {"loss_base2": loss, "ppl": perplexity(loss)}
        m["rate_tokens_per_s"] = round((self.pos - self.start_pos) / max(seconds, 1e-9), 1)
        self.save(complete=True)
        head = f"{out}: resumed at block {self.start_block:,}, " if self.start_block > 0 else f"{out}: "
        done = f"stored {self.pos - self.start_pos:,} tokens in {seconds:.1f}s ({m['rate_tokens_per_s']:,.0f} tokens/s)"
        return [head + done, *_store_lines(out, m)]


def _fill(lm: LanguageModel, cfg: EvalConfig, p: EvalPlan, scfg: StoreConfig, fill: _Fill) -> None:
    """Score the plan's blocks from where ``fill`` resumes, storing every batch and saving progress every
    ``flush_every`` batches and on an interruption (KeyboardInterrupt, any error)."""
    interrupted = True
    try:
        with (
            KeyCapture(lm.model, scfg.keytype) as capture,
            Progress(len(p.dataset), f"knn-store {cfg.gen_subset}", scfg.progress, fill.start_block, "blocks") as bar,
        ):
            for b in scored_batches(lm, cfg, p, feature_fn=capture, start_block=fill.start_block):
                fill.add(b)
                bar.update(len(b.block_lengths))
                if fill.batches % scfg.flush_every == 0:
                    fill.save()
        interrupted = False
    finally:
        if interrupted:  # KeyboardInterrupt or an error: keep what the finished batches wrote
            fill.save()


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


def build_store(lm: LanguageModel, cfg: EvalConfig, scfg: StoreConfig) -> tuple[dict[str, Any], list[str]]:
    """Write (or resume, or find complete) the datastore of ``cfg``'s split in ``scfg.dstore``; returns the manifest
    and the lines to print. Memory stays at one batch; progress is saved every ``flush_every`` batches and on an
    interruption (KeyboardInterrupt, any error), so rerunning the same command continues from there."""
    if scfg.keytype not in KEYTYPES:
        raise UserError(f"unknown --keytype {scfg.keytype!r}: use one of {', '.join(KEYTYPES)}")
    data = Path(cfg.data)
    check_dictionary(lm, data)
    p = first_blocks(nonempty(plan(lm, cfg)), scfg.max_blocks)  # nonempty names why (blocks skipped, empty split)
    if p.n_tokens == 0:
        raise UserError(f"{data / cfg.gen_subset}: no blocks to store with these settings (--max-blocks?)")
    lm.model.eval()
    identity = _identity(lm, cfg, p, scfg)
    out = Path(scfg.dstore)
    out.mkdir(parents=True, exist_ok=True)
    manifest = _existing_manifest(out, identity, scfg.overwrite)
    if manifest is not None and manifest["progress"]["complete"]:
        return manifest, [f"{out}: datastore already complete ({p.n_tokens:,} keys); nothing to do"] + _store_lines(
            out, manifest
        )
    fresh = manifest is None
    if manifest is None:
        manifest = _new_manifest(lm, cfg, p, identity, out)
    writers = _open_writers(out, identity, fresh)
    if fresh:
        atomic_write_json(out / MANIFEST, manifest)
    try:
        fill = _Fill(manifest, writers, out)
        _fill(lm, cfg, p, scfg, fill)
        return manifest, fill.finish(p.n_tokens)
    finally:
        for w in writers:
            w.close()
