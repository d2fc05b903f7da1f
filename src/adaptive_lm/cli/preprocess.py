"""``adaptive-lm preprocess``: text -> ``dict.txt`` + binarised splits, byte for byte as fairseq-preprocess."""

from __future__ import annotations

import argparse

from adaptive_lm.cli.common import add_config_flags, config_from_args
from adaptive_lm.core.preprocess import PreprocessConfig


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--only-source", action="store_true", help="accepted (language modelling is always source-only)")
    p.add_argument("--task", default="language_modeling", choices=["language_modeling"], help="fairseq's task")
    add_config_flags(p, PreprocessConfig)


def run(ns: argparse.Namespace) -> int:
    from adaptive_lm.core.preprocess import preprocess

    # SIGTERM keeps its default (the process ends; a pool's workers could die holding its queue lock, and a parent
    # that survived to clean up would wait for them): the finished parts are on disk already, and a rerun resumes
    print("\n".join(preprocess(config_from_args(PreprocessConfig, ns))))
    return 0
