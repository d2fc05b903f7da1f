"""``adaptive-lm download``: a released fairseq model (WikiText-103, Billion Word) into the cache."""

from __future__ import annotations

import argparse
from pathlib import Path

from adaptive_lm.cli.common import creatable_dir

EPILOG = ("environment: ADAPTIVE_LM_CACHE sets the cache folder (default ~/.cache/adaptive-lm); ADAPTIVE_LM_BASE_URL "
          "a mirror of fairseq's download server (as --url)")  # fmt: skip


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", choices=["wiki103", "gbw"], help="which released model")
    p.add_argument("--dir", default=None, type=creatable_dir,
                   help="where to keep the archive (default: $ADAPTIVE_LM_CACHE or ~/.cache/adaptive-lm)")  # fmt: skip
    p.add_argument("--url", default=None, help="base URL of a mirror (default: $ADAPTIVE_LM_BASE_URL or fairseq's)")
    p.epilog = EPILOG


def run(ns: argparse.Namespace) -> int:
    from adaptive_lm.inference.download import fetch

    folder = fetch(ns.model, Path(ns.dir) if ns.dir else None, ns.url)
    print(f"{ns.model}: {folder}")
    print(f"next: adaptive-lm eval {folder}/data-bin --path {folder}/model.pt --gen-subset test --context-window 2560")
    return 0
