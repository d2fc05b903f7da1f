"""``adaptive-lm make-corpus``: train/valid/test text from a Markov source whose entropy rate is known exactly."""

from __future__ import annotations

import argparse

from adaptive_lm.cli.common import creatable_dir, integer


def _at_least(low: int, why: str):
    def parse(s: str) -> int:
        v = integer(s)
        if v < low:
            raise argparse.ArgumentTypeError(f"{s!r} must be an integer of at least {low}{why}")
        return v

    return parse


MAX_VOCAB = 10_000_000


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="corpus", type=creatable_dir, help="output folder (default: corpus)")
    p.add_argument("--tokens", type=_at_least(1, ""), default=1_000_000, help="training tokens (default: 1,000,000)")
    p.add_argument(
        "--vocab", type=_at_least(1, ""), default=12000, help="word types (default: 12,000; at most 10,000,000)"
    )
    p.add_argument("--seed", type=_at_least(0, ""), default=0, help="random seed (default: 0)")


def run(ns: argparse.Namespace) -> int:
    from adaptive_lm.core.corpus import Corpus, make_corpus
    from adaptive_lm.core.errors import UserError
    from adaptive_lm.core.metrics import perplexity_nats

    if ns.vocab < Corpus.states:
        raise UserError(f"--vocab {ns.vocab}: at least {Corpus.states}, one word per state of the Markov source")
    if ns.vocab > MAX_VOCAB:  # the generator holds every word and its probability in memory (OverflowError above)
        raise UserError(f"--vocab {ns.vocab}: at most {MAX_VOCAB:,} word types (each is held in memory)")

    h = make_corpus(ns.out, ns.tokens, ns.vocab, ns.seed)
    print(f"wrote {ns.out}/{{train,valid,test}}.txt; entropy rate {h:.4f} nats/token, "
          f"best possible perplexity {perplexity_nats(h):.2f}")  # fmt: skip
    return 0
