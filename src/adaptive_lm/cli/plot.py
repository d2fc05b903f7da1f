"""``adaptive-lm plot``: a run's training and validation curves as a PNG (the [plot] extra)."""

from __future__ import annotations

import argparse

from adaptive_lm.cli.common import existing_dir


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=existing_dir, help="a --save-dir (with metrics.jsonl)")
    p.add_argument("--output", default=None, help="PNG path (default: RUN_DIR/curves.png)")


def run(ns: argparse.Namespace) -> int:
    from adaptive_lm.core.plots import plot_run

    out = ns.output or f"{ns.run_dir.rstrip('/')}/curves.png"
    plot_run(ns.run_dir, out)
    print(f"wrote {out}")
    return 0
