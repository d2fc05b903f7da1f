"""``adaptive-lm make-corpus``: train/valid/test text from a Markov source whose entropy rate is known exactly."""

from __future__ import annotations

import argparse

from adaptive_lm.cli.common import creatable_dir, integer, positive


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="corpus", type=creatable_dir, help="output folder (default: corpus)")
    p.add_argument("--tokens", type=positive, default=1_000_000, help="training tokens (default: 1,000,000)")
    p.add_argument("--vocab", type=positive, default=12000, help="word types (default: 12,000)")
    p.add_argument("--seed", type=integer, default=0, help="random seed (default: 0)")


def run(ns: argparse.Namespace) -> int:
    from adaptive_lm.core.corpus import make_corpus
    from adaptive_lm.core.metrics import perplexity_nats

    h = make_corpus(ns.out, ns.tokens, ns.vocab, ns.seed)
    print(f"wrote {ns.out}/{{train,valid,test}}.txt; entropy rate {h:.4f} nats/token, "
          f"best possible perplexity {perplexity_nats(h):.2f}")  # fmt: skip
    return 0
