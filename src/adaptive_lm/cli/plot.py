"""``adaptive-lm plot``: a run's training and validation curves as a PNG (the [plot] extra)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from adaptive_lm.cli.common import existing_dir
from adaptive_lm.core.errors import UserError


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=existing_dir, help="a --save-dir (with metrics.jsonl)")
    p.add_argument("--output", default=None, help="figure path, .png, .pdf or .svg (default: RUN_DIR/curves.png)")


FORMATS = (".png", ".pdf", ".svg")


def output_path(run_dir: str, output: str | None) -> Path:
    """Where the figure goes: RUN_DIR/curves.png by default, else as ``figure_path`` says."""
    return figure_path(output or str(Path(run_dir) / "curves.png"), "curves.png", "--output")


def figure_path(output: str, default_name: str, flag: str) -> Path:
    """``default_name`` inside a folder, NAME.png for a name without a suffix; another suffix than ``FORMATS`` is
    refused (matplotlib failed with a traceback), and so is a folder that does not exist (before any work)."""
    out = Path(output)
    if out.is_dir():
        out = out / default_name
    if not out.suffix:
        out = out.with_name(out.name + ".png")
    if out.suffix.lower() not in FORMATS:
        raise UserError(f"{flag} {output}: give a {', '.join(FORMATS)} file name (the figure's format)")
    parent = out.absolute().parent
    if not parent.is_dir():
        raise UserError(f"{flag} {output}: folder {parent} does not exist; create it or name another")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {output}: cannot write in {parent}; name a writable folder")
    return out


def run(ns: argparse.Namespace) -> int:
    from adaptive_lm.core.plots import plot_run

    out = output_path(ns.run_dir, ns.output)
    plot_run(ns.run_dir, out)
    print(f"wrote {out}")
    return 0
