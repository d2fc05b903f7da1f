"""``adaptive-lm knn-store``: a kNN-LM datastore (keys, next tokens) for a split, walked as ``eval`` walks it."""

from __future__ import annotations

import argparse

from adaptive_lm.cli.common import (
    add_config_flags,
    add_model_flags,
    config_from_args,
    console_log,
    half_notice,
    load_model,
    sigterm_as_interrupt,
)
from adaptive_lm.core.errors import UserError
from adaptive_lm.inference.evaluate import EvalConfig
from adaptive_lm.inference.knn import StoreConfig


def add_args(p: argparse.ArgumentParser) -> None:
    add_config_flags(p, EvalConfig, skip=("progress",))
    p.set_defaults(gen_subset="train")
    add_model_flags(p)
    add_config_flags(p.add_argument_group("datastore"), StoreConfig)
    p.set_defaults(dstore=None)
    for a in p._actions:  # --dstore is required (a field default of "" keeps StoreConfig() buildable in code)
        if a.dest == "dstore":
            a.required = True


def run(ns: argparse.Namespace) -> int:
    from adaptive_lm.inference.knn import build_store

    if ns.bf16 and ns.fp16:  # before the notes either flag prints
        raise UserError("--bf16 and --fp16 together: choose one autocast type")
    lm = load_model(ns)
    half_notice(ns, lm.device.type)
    with console_log(), sigterm_as_interrupt():  # a scheduler's stop saves the progress as Ctrl-C does
        _, lines = build_store(lm, config_from_args(EvalConfig, ns), config_from_args(StoreConfig, ns))
    print("\n".join(lines))
    return 0
