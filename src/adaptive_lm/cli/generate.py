"""``adaptive-lm generate``: continue prompts (``--prompt`` or stdin) as fairseq's hub ``sample``/``generate``."""

from __future__ import annotations

import argparse
import sys

from adaptive_lm.cli.common import (
    add_model_flags,
    add_tokenizer_flag,
    finite,
    half_notice,
    integer,
    load_model,
    nonneg,
    positive,
    topk,
    topp,
)
from adaptive_lm.core.errors import UserError


def add_args(p: argparse.ArgumentParser) -> None:
    add_model_flags(p)
    p.add_argument("--prompt", action="append", help="repeatable; without it prompts are read from stdin")
    p.add_argument("--beam", type=positive, default=1, help="beam size (default: 1)")
    p.add_argument("--sampling", action="store_true", help="sample instead of searching")
    p.add_argument("--sampling-topk", type=topk, default=-1, help="sample from the k most likely words")
    p.add_argument("--sampling-topp", type=topp, default=-1.0, help="sample from the smallest set with mass p")
    p.add_argument("--temperature", type=positive, default=1.0, help="divides the logits (default: 1)")
    p.add_argument("--max-len-a", type=nonneg, default=0.0, help="length limit a * prompt length + b (default: 0)")
    p.add_argument("--max-len-b", type=positive, default=200, help="length limit, prompt included (default: 200)")
    p.add_argument("--min-len", type=nonneg, default=1, help="no </s> before this length (default: 1)")
    p.add_argument("--unkpen", type=finite, default=0.0, help="subtracted from <unk>'s score (default: 0)")
    p.add_argument("--lenpen", type=finite, default=1.0, help="length penalty exponent of beam scores (default: 1)")
    p.add_argument("--no-repeat-ngram-size", type=nonneg, default=0, help="forbid repeating n-grams of this size")
    p.add_argument("--nbest", type=positive, default=1, help="hypotheses per prompt (default: 1)")
    p.add_argument("--seed", type=integer, default=None, help="sampling seed")
    p.add_argument("--batch-size", type=positive, default=8, help="prompts per batch (default: 8)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 weights")
    p.add_argument("--show-scores", action="store_true", help="prefix each line with its mean ln p")
    add_tokenizer_flag(p, "prompts")


def run(ns: argparse.Namespace) -> int:
    import torch

    if ns.nbest > ns.beam and not ns.sampling:
        raise UserError(f"--nbest {ns.nbest} exceeds --beam {ns.beam}: a beam holds at most that many hypotheses")
    lm = load_model(ns, torch.bfloat16 if ns.bf16 else None)
    half_notice(ns, lm.device.type)
    kw = dict(sampling=ns.sampling, sampling_topk=ns.sampling_topk, sampling_topp=ns.sampling_topp,
              temperature=ns.temperature, max_len_a=ns.max_len_a, max_len_b=ns.max_len_b, min_len=ns.min_len,
              unkpen=ns.unkpen, nbest=ns.nbest, seed=ns.seed, no_repeat_ngram_size=ns.no_repeat_ngram_size,
              lenpen=ns.lenpen)  # fmt: skip
    prompts = ns.prompt or []
    if not prompts and sys.stdin.isatty():
        print("type a prompt per line (Ctrl-D to quit)", file=sys.stderr)
    source = prompts if prompts else (line.rstrip("\n") for line in sys.stdin)
    batch: list[str] = []

    def flush() -> None:
        for hyps in lm.generate([lm.encode(p) for p in batch], beam=ns.beam, **kw):
            for h in hyps:
                text = lm.decode(h["tokens"])
                print(f"{h['score']:.4f}\t{text}" if ns.show_scores else text, flush=True)
        batch.clear()

    for prompt in source:
        batch.append(prompt)
        if len(batch) >= ns.batch_size:
            flush()
    if batch:
        flush()
    return 0
