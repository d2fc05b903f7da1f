"""The index (``adaptive-lm knn-index``): knnlm's IVF-PQ (trained on a random sample of the keys) or an exact flat
index, built with FAISS over a complete datastore and recorded against the store's fingerprint in ``index.json``,
so that the search refuses an index of another store."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adaptive_lm.core.errors import UserError
from adaptive_lm.core.files import atomic_path, atomic_write_json
from adaptive_lm.core.options import opt
from adaptive_lm.core.progress import Progress
from adaptive_lm.inference.knn.backend import describe_index, import_faiss, to_gpu
from adaptive_lm.inference.knn.records import (
    INDEX,
    INDEX_FORMAT,
    INDEX_META,
    KEYS,
    MANIFEST,
    VERSION,
    file_digest,
    load_manifest,
    read_record,
    size_text,
)

AUTO_FLAT_BELOW = 100_000  # ``--index auto``: an exact flat index below this many keys
log = logging.getLogger("adaptive_lm.knn")
POINTS_PER_CENTROID = 39  # faiss's k-means warns below 39 training points per centroid
PQ_CENTROIDS = 256  # 8-bit PQ codes: 256 centroids per sub-quantizer


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


def _ivfpq_shape(N: int, dim: int, icfg: IndexConfig, notes: list[str], d: Path) -> tuple[int, int, int]:
    """(training keys, IVF lists, PQ code bytes) this store allows: centroids and code size are lowered, with a note,
    when the sample or the dimension needs it; too few keys for PQ's own k-means is a refusal."""
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
    return n_train, nlist, code


def _trained_ivfpq(
    faiss: Any, keys: np.ndarray, icfg: IndexConfig, notes: list[str], d: Path
) -> tuple[Any, dict[str, Any], float]:
    """An IVF-PQ index trained on a random sample of ``keys`` (on the GPU when faiss-gpu sees one), the settings it
    really used (``_ivfpq_shape``), and the training seconds."""
    N, dim = keys.shape
    n_train, nlist, code = _ivfpq_shape(N, dim, icfg, notes, d)
    quantizer = faiss.IndexFlatL2(dim) if icfg.metric == "l2" else faiss.IndexFlatIP(dim)
    metric = faiss.METRIC_L2 if icfg.metric == "l2" else faiss.METRIC_INNER_PRODUCT
    index = faiss.IndexIVFPQ(quantizer, dim, nlist, code, 8, metric)
    index.nprobe = icfg.nprobe
    if icfg.opq:
        index = faiss.IndexPreTransform(faiss.OPQMatrix(dim, code), index)
    rng = np.random.default_rng(icfg.seed)
    sample = np.sort(rng.choice(N, size=n_train, replace=False))
    train = np.ascontiguousarray(keys[sample], dtype=np.float32)  # (n_train, dim)
    if icfg.progress:  # faiss's training reports nothing itself: say what is running and why it is quiet
        log.info(f"knn-index: training IVF-PQ ({nlist} lists, {code} bytes per key{', OPQ' if icfg.opq else ''}) "
                 f"on {n_train:,} keys; faiss shows no progress for this step")  # fmt: skip
    t1 = time.time()
    if icfg.opq:
        index.train(train)  # faiss cannot move an OPQ pre-transform to the GPU
    else:
        g = to_gpu(faiss, index)
        g.train(train)
        index = faiss.index_gpu_to_cpu(g) if g is not index else index
    train_s = time.time() - t1
    del train
    return index, dict(ncentroids=nlist, code_size=code, probe=icfg.nprobe, opq=icfg.opq, train_sample=n_train), train_s


def _refuse_existing(d: Path, icfg: IndexConfig) -> None:
    """An index already there is rebuilt only with ``--overwrite``; the refusal says what it is."""
    ipath = d / INDEX
    if ipath.exists() and not icfg.overwrite:
        try:
            old = describe_index(read_record(d / INDEX_META, INDEX_FORMAT, "index"))
        except UserError:
            old = "unrecorded"
        raise UserError(f"{ipath}: exists ({old}); pass --overwrite to rebuild it")


def _add_keys(index: Any, keys: np.ndarray, icfg: IndexConfig) -> float:
    """Every key into ``index``, ``icfg.chunk`` at a time (memory bounded); returns the seconds it took."""
    t1 = time.time()
    N = len(keys)
    with Progress(N, "knn-index add", icfg.progress, unit="keys") as bar:
        for i in range(0, N, icfg.chunk):
            part = np.ascontiguousarray(keys[i : i + icfg.chunk], dtype=np.float32)  # (chunk, dim)
            index.add(part)
            bar.update(len(part))
    return time.time() - t1


def _index_lines(meta: dict[str, Any], d: Path, N: int, seconds: tuple[float, float, float]) -> list[str]:
    """What ``knn-index`` reports: the notes on lowered settings, the index, its times (total, train, add) and size."""
    total_s, train_s, add_s = seconds
    size = meta["bytes"]
    return [
        *meta["notes"],
        f"{d / INDEX}: {describe_index(meta)}, {N:,} keys of {meta['dim']} dims",
        f"built in {total_s:.1f}s (train {train_s:.1f}s, add {add_s:.1f}s); {size_text(size)} "
        f"({size / max(N, 1):,.1f} B/key)",
        f"next: adaptive-lm eval DATA --path MODEL --knn {d} --lmbda 0.25 --k 1024",
    ]


def build_index(dstore: str | os.PathLike, icfg: IndexConfig) -> tuple[dict[str, Any], list[str]]:
    """knnlm's recipe: IVF-PQ trained on a random sample of the keys, keys added in chunks; or an exact flat index.
    Returns the index record (also written to ``index.json`` and the store's manifest) and the lines to print."""
    d = Path(dstore)
    m = load_manifest(d, "indexing it")
    faiss = import_faiss("adaptive-lm knn-index")
    _refuse_existing(d, icfg)
    ipath = d / INDEX
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
    add_s = _add_keys(index, keys, icfg)
    with atomic_path(ipath) as tmp:
        faiss.write_index(index, str(tmp))
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
    atomic_write_json(d / INDEX_META, meta)
    m["index"] = {k: meta[k] for k in ("type", "metric", "bytes", "bytes_per_key", "seconds", "ntotal")}
    atomic_write_json(d / MANIFEST, m)
    return meta, _index_lines(meta, d, N, (seconds, train_s, add_s))
