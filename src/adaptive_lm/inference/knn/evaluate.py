"""Interpolated evaluation (``adaptive-lm eval --knn``) and scoring (``knn_score``): the split or the sentences scored
as without kNN-LM, each token's LM probability interpolated with the kNN distribution of its key."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adaptive_lm.core.errors import UserError
from adaptive_lm.core.metrics import perplexity
from adaptive_lm.core.progress import Progress
from adaptive_lm.inference.evaluate import EvalConfig, EvalPlan, check_dictionary, nonempty, plan, scored_batches
from adaptive_lm.inference.hub import LanguageModel
from adaptive_lm.inference.knn.search import KNN, interpolate
from adaptive_lm.inference.knn.store import first_blocks

LAMBDA_GRID = tuple(round(0.01 * i, 2) for i in range(100))  # the sweep's search grid for the best lambda
LAMBDA_SHOWN = (0.0, 0.1, 0.2, 0.25, 0.3, 0.4, 0.5)


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


def _loss_base2(lp: np.ndarray) -> float:
    return float(-lp.mean() / math.log(2)) if len(lp) else 0.0


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
    p = nonempty(first_blocks(plan(lm, cfg), max_blocks))
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
    ``positional_scores`` are exactly ``lm_positional_scores``: ``lm.score``'s up to the rounding of other batch
    shapes (these batches are in input order)."""
    return lm.score(sentences, replace_newline_with_eos, batch_size, knn=knn, lmbda=lmbda)
