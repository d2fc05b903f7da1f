"""Plots (optional extra: ``pip install adaptive-lm[plot]``); matplotlib is imported only when asked for."""

from __future__ import annotations

from .errors import UserError


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install 'adaptive-lm[plot]'") from None
    return plt


def plot_bins(bins: list[tuple[str, int, float]], path: str) -> None:
    """Bar chart of loss (base 2) per word-frequency band, the paper's per-frequency comparison."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(range(len(bins)), [b[2] for b in bins])
    ax.set_xticks(range(len(bins)), [f"{b[0]}\n{b[1]:,} tok" for b in bins], fontsize=7)
    ax.set_ylabel("loss (bits/token)")
    ax.set_title("loss by word-frequency band")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
