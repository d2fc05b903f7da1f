"""``adaptive-lm generate``: continue prompts as fairseq's hub ``sample`` does (the best hypothesis of each; more with
``--nbest``), with fairseq's generation flags."""

from __future__ import annotations

import argparse
import sys

from adaptive_lm.cli.common import (
    add_config_flags,
    add_model_flags,
    add_text_flags,
    config_from_args,
    half_notice,
    integer,
    load_model,
    read_lines,
)
from adaptive_lm.core.errors import UserError
from adaptive_lm.inference.generate import GenerationConfig


def add_args(p: argparse.ArgumentParser) -> None:
    add_model_flags(p)
    p.add_argument(
        "--prompt",
        action="append",
        help="repeatable (one list given to the hub's generate); without it, prompts are read from stdin: a line at "
        "a time on a terminal, else all at once",
    )
    special = {"nbest": dict(help="hypotheses printed per prompt, best first (default: 1, as the hub's sample)")}
    add_config_flags(p.add_argument_group("generation (fairseq's flags)"), GenerationConfig, special=special)
    p.set_defaults(beam=1, nbest=1)  # the hub's sample(): beam 1, the best hypothesis
    p.add_argument("--seed", type=integer, default=None, help="torch.manual_seed(SEED) first (sampling)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 weights")
    p.add_argument("--show-scores", action="store_true", help="prefix each line with its score (fairseq's)")
    add_text_flags(p, "prompts")


def run(ns: argparse.Namespace) -> int:
    import torch

    cfg = config_from_args(GenerationConfig, ns)
    if cfg.nbest is not None and cfg.nbest > cfg.beam:  # fairseq prints up to beam silently; say so instead
        raise UserError(f"--nbest {cfg.nbest} exceeds --beam {cfg.beam}: a beam finishes at most beam hypotheses")
    lm = load_model(ns, torch.bfloat16 if ns.bf16 else None)
    half_notice(ns, lm.device.type)
    options = {k: v for k, v in cfg.__dict__.items() if k != "beam"}

    def emit(prompts: list[str]) -> None:
        for hyps in lm.generate([lm.encode(p) for p in prompts], beam=cfg.beam, seed=ns.seed, **options):
            for h in hyps:
                text = lm.decode(h["tokens"])
                print(f"{float(h['score']):.4f}\t{text}" if ns.show_scores else text, flush=True)

    if ns.prompt:
        emit(ns.prompt)
    elif sys.stdin.isatty():
        print("type a prompt per line (Ctrl-D to quit)", file=sys.stderr)
        for line in sys.stdin:
            emit([line.rstrip("\r\n")])
    else:  # a prompt file: UTF-8 bytes, its CRLF line ends not part of the prompts (as adaptive-lm score reads)
        emit(read_lines("-"))
    return 0
