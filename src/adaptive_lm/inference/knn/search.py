"""The search: a loaded datastore and its index (``KNN``), the k nearest stored keys of each query, p_kNN of each
target, and its interpolation with the LM: ``log(lambda * p_kNN + (1 - lambda) * p_LM)``.

p_kNN is the softmax over the k neighbours of ``-(squared L2 distance) / temperature`` (or the inner product),
recomputed in float64 from the stored keys (knnlm's ``--knn-sim-func`` recomputation) unless ``approximate`` asks
for the index's own distances, summed per token id. Everything is done with logsumexp, so no probability
underflows to 0 by accident.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adaptive_lm.core.errors import UserError
from adaptive_lm.inference.hub import LanguageModel
from adaptive_lm.inference.knn.backend import describe_index, import_faiss, to_gpu
from adaptive_lm.inference.knn.keys import KeyCapture, key_dim
from adaptive_lm.inference.knn.records import (
    INDEX,
    INDEX_FORMAT,
    INDEX_META,
    KEYS,
    MANIFEST,
    VALS,
    file_digest,
    load_manifest,
    read_record,
    weights_digest,
)

GATHER_BYTES = 1 << 20  # float64 neighbour keys per chunk when recomputing distances (stays in cache)


def interpolate(lm_lp: np.ndarray, knn_lp: np.ndarray, lmbda: float) -> np.ndarray:
    """log(lambda * p_kNN + (1 - lambda) * p_LM) from the two natural-log probabilities, in logsumexp form."""
    lm_lp, knn_lp = np.asarray(lm_lp, dtype=np.float64), np.asarray(knn_lp, dtype=np.float64)
    if lmbda <= 0:
        return lm_lp.copy()
    if lmbda >= 1:
        return knn_lp.copy()
    return np.logaddexp(math.log(lmbda) + knn_lp, math.log1p(-lmbda) + lm_lp)


def _index_record(d: Path, m: dict[str, Any], sim: str, approximate: bool) -> dict[str, Any]:
    """The record of ``d``'s index, refusing by name a missing index, one built on another store or since replaced,
    and approximate distances of another similarity than ``sim``."""
    ipath, jpath = d / INDEX, d / INDEX_META
    if not ipath.is_file():
        raise UserError(f"{ipath}: missing: build the index first with adaptive-lm knn-index {d}")
    if not jpath.is_file():
        raise UserError(f"{jpath}: missing, so {ipath} cannot be matched to this store: rerun knn-index --overwrite")
    meta = read_record(jpath, INDEX_FORMAT, "index")
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
    return meta


def recompute_scores(keys_t: torch.Tensor, q: np.ndarray, idx: np.ndarray, sim: str) -> np.ndarray:
    """-(squared L2 distance) or the inner product, in float64, of each query (n, dim) against its neighbours' stored
    keys (``keys_t`` rows ``idx``, (n, k)).

    The keys are gathered a few queries at a time (about 1 MiB of float64) and the differences are formed,
    squared and summed in place while they sit in cache: exact (no |k|^2 - 2qk + |q|^2 cancellation) and, on
    this machine, 3x faster than the expanded form with large chunks."""
    n, k = idx.shape
    dim = keys_t.shape[1]
    out = torch.empty(n, k, dtype=torch.float64)
    qt = torch.from_numpy(q)  # (n, dim)
    it = torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64))  # (n, k)
    step = max(1, GATHER_BYTES // max(1, k * dim * 8))
    for i in range(0, n, step):
        kk = keys_t.index_select(0, it[i : i + step].reshape(-1)).view(-1, k, dim).double()  # (b, k, d)
        qq = qt[i : i + step, None, :].double()  # (b, 1, d)
        if sim == "ip":
            out[i : i + step] = kk.mul_(qq).sum(-1)
        else:
            out[i : i + step] = kk.sub_(qq).square_().sum(-1).neg_()
    return out.numpy()


def _as_queries(queries: np.ndarray | torch.Tensor, dim: int) -> np.ndarray:
    """Queries as a contiguous float32 (N, dim) array, as FAISS wants them."""
    q = queries.detach().float().cpu().numpy() if torch.is_tensor(queries) else np.asarray(queries, np.float32)
    q = np.ascontiguousarray(q, dtype=np.float32)  # (N, dim)
    if q.ndim != 2 or q.shape[1] != dim:
        raise UserError(f"kNN queries must be (N, {dim}), got {tuple(q.shape)}")
    return q


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
        meta = _index_record(d, m, sim, approximate)
        faiss = import_faiss("kNN-LM search")
        index = faiss.read_index(str(d / INDEX))
        nprobe = int(nprobe if nprobe is not None else meta.get("probe", 32))
        if meta["type"] != "flat":
            faiss.extract_index_ivf(index).nprobe = nprobe
        index = to_gpu(faiss, index)
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
        index = describe_index({**self.index_meta, "probe": self.nprobe})
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
        self,
        keys: torch.Tensor,
        target: torch.Tensor,
        rows: list[dict[str, torch.Tensor]],
        lmbda: float,
        skip: list[int] | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """``LanguageModel.score(knn=...)``'s step: each sentence's LM scores (``rows[i]["positional_scores"]``, its
        n positions after the first ``skip[i]``, a context not scored) interpolated with the kNN distribution of the
        keys captured at those positions (no search for the context's)."""
        n = torch.tensor([len(r["positional_scores"]) for r in rows])
        s = torch.tensor(skip if skip is not None else [0] * len(rows), dtype=torch.long)
        at = torch.arange(target.shape[1])[None, :]
        mask = (at >= s[:, None]) & (at < (s + n)[:, None])  # (B, W): the scored positions
        knn_lp = torch.from_numpy(self.knn_log_probs(keys.cpu()[mask], target.cpu()[mask]))  # (N,)
        out, off = [], 0
        for r, m in zip(rows, n.tolist()):
            lm_r, kn_r = r["positional_scores"], knn_lp[off : off + m]
            off += m
            inter = torch.from_numpy(interpolate(lm_r.double().numpy(), kn_r.numpy(), lmbda)).float()
            out.append({"positional_scores": inter, "lm_positional_scores": lm_r, "knn_positional_scores": kn_r})
        return out

    # ---- search ---------------------------------------------------------------------------------------------
    def _exact_neighbours(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The exact k nearest stored keys (N, k) of each query by the flat index's own metric, ranked in float64
        (ties: the earlier stored token first), and their float64 similarity by that metric (N, k).

        FAISS ranks in float32 (|q|^2 + |k|^2 - 2qk), so it can swap near-ties, and it breaks exact ties (identical
        keys: the same context, such as every line's first token in ``--sample-break-mode eos``) in its own order:
        the candidates are re-ranked in float64, and a query whose last candidate is still within float32's
        rounding of its k-th is searched again with twice the candidates (a flat search costs the same for any k),
        until no key left out can rank among the k."""
        metric = self.index_meta["metric"]
        n, N, dim = len(q), self.count, self.dim
        out, sims = np.empty((n, k), dtype=np.int64), np.empty((n, k), dtype=np.float64)
        rows = np.arange(n)
        kk = min(k + max(16, k // 8), N)
        while len(rows):
            t0 = time.time()
            _, idx = self.index.search(q[rows], kk)  # (n', kk) int64
            self.search_seconds += time.time() - t0
            t0 = time.time()
            rank = recompute_scores(self.keys_t, q[rows], idx, metric)  # (n', kk) float64, higher is nearer
            order = np.lexsort((idx, -rank), axis=1)
            idx, rank = np.take_along_axis(idx, order, 1), np.take_along_axis(rank, order, 1)
            more = np.zeros(len(rows), dtype=bool)
            if kk < N:  # a key FAISS left out scores (in float32) no better than the last candidate
                qn = np.square(q[rows].astype(np.float64)).sum(1)  # (n',) |q|^2
                if metric == "l2":  # a key that could rank has |k| <= |q| + |q - k|
                    scale = qn + np.square(np.sqrt(qn) + np.sqrt(np.maximum(-rank[:, -1], 0)))
                else:
                    ends = self.keys_t[torch.from_numpy(idx[:, [k - 1, -1]].reshape(-1))].double()
                    kn = ends.square().sum(-1).sqrt().view(-1, 2).amax(1).numpy()  # (n',)
                    scale = 2 * np.sqrt(qn) * kn
                margin = 2 * (dim + 2) * float(np.finfo(np.float32).eps) * scale  # float32 sums of dim terms
                more = rank[:, -1] >= rank[:, k - 1] - margin
            out[rows[~more]], sims[rows[~more]] = idx[~more, :k], rank[~more, :k]
            self.distance_seconds += time.time() - t0
            rows, kk = rows[more], min(2 * kk, N)
        return out, sims

    def search(self, queries: np.ndarray | torch.Tensor, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest stored keys of every query: ``scores`` (N, k) float64, the softmax's logits (-d^2/T or
        q.k/T), sorted best first (ties: the earlier stored token first), ``-inf`` where the index found fewer than
        k, and their ``values`` (N, k) int64 (-1 there). The neighbours are those of the index's metric; ``sim``
        only weights them (an L2 index with ``sim="ip"``: the k nearest by L2, weighted by inner product)."""
        q = _as_queries(queries, self.dim)  # (N, dim)
        k = min(k or self.k, self.count)
        if self.index_meta["type"] == "flat" and not self.approximate:
            idx, rank = self._exact_neighbours(q, k)  # (N, k): exact, whatever FAISS's float32 ranking and ties
            dist = None
        else:  # IVF-PQ keeps knnlm's semantics: the k neighbours it found (their distances recomputed)
            t0 = time.time()
            dist, idx = self.index.search(q, k)  # (N, k) float32, (N, k) int64
            self.search_seconds += time.time() - t0
        found = idx >= 0
        safe = np.where(found, idx, 0)
        vals = np.where(found, np.asarray(self.vals[safe.ravel()], dtype=np.int64).reshape(idx.shape), -1)
        t0 = time.time()
        if self.approximate:
            raw = dist.astype(np.float64)
            scores = -raw if self.sim == "l2" else raw
        elif dist is None and self.sim == self.index_meta["metric"]:
            scores = rank  # the exact search's own float64 similarity
        else:
            scores = recompute_scores(self.keys_t, q, safe, self.sim)
        scores = np.where(found, scores / self.temperature, -np.inf)
        # best first; on equal scores (identical keys: the same context) the earlier stored token wins, so that the
        # order does not depend on the index's tie order
        order = np.lexsort((np.where(found, idx, np.iinfo(np.int64).max), -scores), axis=1)
        self.distance_seconds += time.time() - t0
        return np.take_along_axis(scores, order, 1), np.take_along_axis(vals, order, 1)

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
