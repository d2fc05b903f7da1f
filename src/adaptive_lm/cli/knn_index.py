"""``adaptive-lm knn-index``: a FAISS index over a datastore's keys (the [knn] extra)."""

from __future__ import annotations

import argparse

from adaptive_lm.cli.common import add_config_flags, config_from_args, console_log, existing_dir
from adaptive_lm.inference.knn import IndexConfig


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dstore", type=existing_dir, help="datastore folder written by adaptive-lm knn-store")
    add_config_flags(p, IndexConfig)


def run(ns: argparse.Namespace) -> int:
    from adaptive_lm.inference.knn import build_index

    with console_log():
        _, lines = build_index(ns.dstore, config_from_args(IndexConfig, ns))
    print("\n".join(lines))
    return 0
