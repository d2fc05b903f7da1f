"""A generated corpus with a known entropy rate, and the built-in end-to-end run (``adaptive-lm quickstart``).

The source is a Markov chain over K "topic" states plus an end-of-line state. Every word belongs to exactly
one state and each state draws its words from its own Zipfian distribution, so the state is visible in the
word and the word sequence is itself a Markov chain: its entropy rate is exact,
H = sum_s pi_s H(P[s, :]) + sum_s pi_s H(E_s) nats per token (end-of-line tokens included, as in fairseq's
perplexity). exp(H) is the best perplexity any model can reach on this text.
"""

from __future__ import annotations

import math
import shutil
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np


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
        out, n, s = [], 0, K
        line: list[str] = []
        while n < tokens:
            s = rng.choice(K + 1, p=self.P[s])
            n += 1
            if s == K:
                out.append(" ".join(line))
                line = []
            else:
                line.append(self.words[s][rng.choice(len(self.emit[s]), p=self.emit[s])])
        Path(path).write_text("\n".join(out) + "\n", encoding="utf-8")
        return n


def quickstart(run_dir: str = "quickstart-run", updates: int = 300) -> dict:
    """Corpus -> preprocess -> train (the recipe's NAG + cosine, scaled down) -> validation perplexity."""
    from .preprocess import PreprocessConfig, preprocess
    from .train import train

    t0 = time.time()
    d = Path(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(d / "checkpoints", ignore_errors=True)  # a fresh run each time
    corpus = Corpus()
    h = corpus.entropy_rate()
    print(
        f"[1/3] generating a corpus: {corpus.vocab} Zipfian word types, exact entropy rate {h:.3f} nats/token "
        f"(best possible perplexity {math.exp(h):.1f})"
    )
    corpus.write(d / "train.txt", 200_000)
    corpus.write(d / "valid.txt", 20_000)
    print("[2/3] preprocessing")
    pc = PreprocessConfig(trainpref=str(d / "train.txt"), validpref=str(d / "valid.txt"), destdir=str(d / "data-bin"))
    print("      " + "\n      ".join(preprocess(pc)))
    print(f"[3/3] training a small adaptive-input model for {updates} updates (NAG, cosine, clip 0.1)")
    result = train(small_recipe(d, updates))
    val = result["valid_loss"]
    ppl = 2**val if val is not None else float("nan")
    from .hub import from_pretrained

    lm = from_pretrained(d / "checkpoints" / "checkpoint_last.pt")
    sample = lm.sample(corpus.words[0][0], sampling=True, sampling_topk=20, seed=0, max_len_b=25)
    _report(d, time.time() - t0, ppl, h, sample, corpus.words[0][0])
    return {"valid_ppl": ppl, "best_ppl": math.exp(h), "sample": sample}


def small_recipe(d: Path, updates: int):
    """The seed recipe's optimisation (NAG, lr 1.0, warmup, one cosine period, clip 0.1) on a 2-layer d=128 model."""
    from .train_config import TrainConfig

    warmup = max(1, updates // 10)
    model = dict(decoder_layers=2, decoder_embed_dim=128, decoder_ffn_embed_dim=512, decoder_attention_heads=4,
                 adaptive_input_cutoff=(2000, 6000), adaptive_softmax_cutoff=(2000, 6000), dropout=0.1)  # fmt: skip
    return TrainConfig(
        data=str(d / "data-bin"), save_dir=str(d / "checkpoints"), arch="transformer_lm_wiki103",
        model_overrides=model, max_update=updates, lr=1.0, warmup_updates=warmup, warmup_init_lr=1e-7,
        min_lr=1e-4, lr_period_updates=updates - warmup, t_mult=2, lr_shrink=0.75, clip_norm=0.1, max_tokens=2048,
        tokens_per_sample=256, log_interval=max(1, updates // 6), no_epoch_checkpoints=True, cpu=True,
    )  # fmt: skip


def _report(d: Path, seconds: float, ppl: float, h: float, sample: str, word: str) -> None:
    plot_note = ""
    try:
        from .plots import plot_run

        plot_run(d / "checkpoints", d / "curves.png")
        plot_note = f"\n  curves:      {d / 'curves.png'}"
    except Exception:  # matplotlib is optional
        plot_note = "\n  (pip install 'adaptive-lm[plot]' for a PNG of the curves)"
    ckpt = d / "checkpoints" / "checkpoint_last.pt"
    print(f"\nquickstart done in {seconds:.0f}s")
    print(f"  data:        {d / 'data-bin'}")
    print(f"  checkpoints: {d / 'checkpoints'}{plot_note}")
    print(f"  validation perplexity {ppl:.1f}; best possible on this corpus {math.exp(h):.1f} (exact entropy rate)")
    print(f"  a sample:    {sample}")
    print("next:")
    print(f"  adaptive-lm eval {d / 'data-bin'} --path {ckpt} --gen-subset valid --context-window 128")
    print(f"  adaptive-lm generate --path {ckpt} --prompt '{word}' --sampling --sampling-topk 20")
    print(f"  adaptive-lm plot {d / 'checkpoints'}")


def make_corpus(out: str, tokens: int, vocab: int, seed: int) -> float:
    """``adaptive-lm make-corpus``: train/valid/test text from the generator; returns the entropy rate (nats)."""
    c = Corpus(vocab=vocab, seed=seed)
    h = c.entropy_rate()
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    c.write(d / "train.txt", tokens)
    c.write(d / "valid.txt", max(1000, tokens // 10))
    c.write(d / "test.txt", max(1000, tokens // 10))
    (d / "ENTROPY.txt").write_text(f"entropy rate {h:.6f} nats/token; best possible perplexity {math.exp(h):.4f}\n")
    return h
