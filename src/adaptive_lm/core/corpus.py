"""A generated corpus with a known entropy rate (``adaptive-lm make-corpus``; ``adaptive-lm quickstart`` trains
on it).

The source is a Markov chain over K "topic" states plus an end-of-line state. Every word belongs to exactly
one state and each state draws its words from its own Zipfian distribution, so the state is visible in the
word and the word sequence is itself a Markov chain: its entropy rate is exact,
H = sum_s pi_s H(P[s, :]) + sum_s pi_s H(E_s) nats per token (end-of-line tokens included, as in fairseq's
perplexity). exp(H) is the best perplexity any model can reach on this text.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adaptive_lm.core.files import atomic_path, atomic_write_text
from adaptive_lm.core.metrics import perplexity_nats
from adaptive_lm.core.progress import Progress


@dataclass
class Corpus:
    vocab: int = 12000
    states: int = 24
    stay: float = 0.6
    p_end: float = 0.05
    zipf: float = 1.1
    seed: int = 0

    def build(self) -> None:
        rng = np.random.default_rng(self.seed)
        K = self.states
        sizes = rng.dirichlet(np.ones(K) * 2.0) * (self.vocab - K) + 1
        sizes = np.maximum(1, np.floor(sizes)).astype(int)
        sizes[0] += self.vocab - sizes.sum()
        self.sizes = sizes
        self.emit = []
        for n in sizes:
            w = 1.0 / np.arange(1, n + 1) ** self.zipf
            self.emit.append(w / w.sum())
        words = [f"w{i}" for i in rng.permutation(self.vocab)]
        starts = np.concatenate([[0], np.cumsum(sizes)])
        self.words = [words[starts[s] : starts[s + 1]] for s in range(K)]
        P = np.zeros((K + 1, K + 1))
        for s in range(K):
            P[s, :K] = (1 - self.p_end) * (1 - self.stay) / (K - 1)
            P[s, s] = (1 - self.p_end) * self.stay
            P[s, K] = self.p_end
        P[K, :K] = 1.0 / K
        self.P = P

    def entropy_rate(self) -> float:
        """Exact entropy rate in nats per token (words and end-of-line tokens)."""
        self.build()
        vals, vecs = np.linalg.eig(self.P.T)
        pi = np.real(vecs[:, np.argmin(np.abs(vals - 1))])
        pi = pi / pi.sum()
        h_trans = -np.sum(pi[:, None] * np.where(self.P > 0, self.P * np.log(np.where(self.P > 0, self.P, 1)), 0))
        h_emit = sum(pi[s] * -(e * np.log(e)).sum() for s, e in enumerate(self.emit))
        return float(h_trans + h_emit)

    def write(self, path: str | Path, tokens: int) -> int:
        """Write about ``tokens`` tokens (end-of-line included), one line per sentence."""
        self.build()
        rng = np.random.default_rng([self.seed, zlib.crc32(Path(path).name.encode())])
        K = self.states
        n, s, lines = 0, K, 0
        line: list[str] = []
        # streamed to the file (a large --tokens needs no memory for the text), with progress
        bar = Progress(tokens, f"writing {Path(path).name}", unit="tokens")
        # written under a temporary name and renamed when complete: an interrupted run never leaves a cut train.txt
        # that looks whole (nor half-overwrites the one an earlier run wrote)
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f, bar:
            while n < tokens:
                s = rng.choice(K + 1, p=self.P[s])
                n += 1
                if s == K:
                    f.write(" ".join(line) + "\n")
                    line, lines = [], lines + 1
                else:
                    line.append(self.words[s][rng.choice(len(self.emit[s]), p=self.emit[s])])
                if n % 65536 == 0:
                    bar.update(65536)
            if lines == 0:  # no sentence ended: one empty line, as before
                f.write("\n")
        return n


def make_corpus(out: str, tokens: int, vocab: int, seed: int) -> float:
    """``adaptive-lm make-corpus``: train/valid/test text from the generator; returns the entropy rate (nats)."""
    c = Corpus(vocab=vocab, seed=seed)
    h = c.entropy_rate()
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    c.write(d / "train.txt", tokens)
    c.write(d / "valid.txt", max(1000, tokens // 10))
    c.write(d / "test.txt", max(1000, tokens // 10))
    best = perplexity_nats(h)
    atomic_write_text(d / "ENTROPY.txt", f"entropy rate {h:.6f} nats/token; best possible perplexity {best:.4f}\n")
    return h
