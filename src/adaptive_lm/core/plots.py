"""Plots (optional extra: ``pip install adaptive-lm[plot]``); matplotlib is imported only when asked for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adaptive_lm.core.errors import UserError
from adaptive_lm.core.files import atomic_path


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install 'adaptive-lm[plot]'") from None
    return plt


def _save(fig: Any, path: str | Path) -> None:
    """The figure, in the format its suffix names, put in place whole (an interrupted save leaves no cut file, nor
    half-overwrites an earlier figure)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format=Path(path).suffix[1:].lower() or "png")


def plot_bins(bins: list[tuple[str, int, float]], path: str) -> None:
    """Bar chart of loss (base 2) per word-frequency band, the paper's per-frequency comparison."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(range(len(bins)), [b[2] for b in bins])
    ax.set_xticks(range(len(bins)), [f"{b[0]}\n{b[1]:,} tok" for b in bins], fontsize=7)
    ax.set_ylabel("loss (bits/token)")
    ax.set_title("loss by word-frequency band")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_run(run_dir, path) -> None:
    """Training (per log interval) and validation curves from a run's ``metrics.jsonl``, loss in bits."""
    import json

    f = Path(run_dir) / "metrics.jsonl"
    if not f.is_file():
        raise UserError(f"{f}: not found; point at a --save-dir of adaptive-lm train")
    try:
        lines = [x for x in f.read_text(encoding="utf-8").splitlines() if x.strip()]
    except UnicodeDecodeError:
        raise UserError(f"{f}: not text (not UTF-8); point at a --save-dir of adaptive-lm train") from None
    rows = []
    for i, x in enumerate(lines):
        try:
            rows.append(json.loads(x))
        except json.JSONDecodeError:
            if i < len(lines) - 1:  # a last line cut short by an interrupted run is left out
                raise UserError(
                    f"{f}: record {i + 1} is not JSON; is this a metrics.jsonl of adaptive-lm train?"
                ) from None

    def curve(split: str, x: str) -> list[tuple[float, float]]:
        keep = [r for r in rows if isinstance(r, dict) and r.get("split") == split and {x, "loss"} <= r.keys()]
        return [(r[x], r["loss"]) for r in keep]

    train, valid = curve("train_inner", "update"), curve("valid", "num_updates")
    if not train and not valid:
        raise UserError(f"{f}: no train_inner or valid records yet")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train (per log interval)")
    if valid:
        ax.plot(*zip(*valid), "o-", label="valid")
    ax.set_xlabel("update")
    ax.set_ylabel("loss (bits/token)")
    import numpy as np

    sec = ax.secondary_yaxis("right", functions=(lambda b: 2**b, lambda p: np.log2(np.maximum(p, 1e-12))))
    sec.set_ylabel("perplexity")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(str(run_dir))
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
