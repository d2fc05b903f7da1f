"""What every check shares: the verdicts (``Record``), the sizes of a mode (``Plan``), the device, the generated data
and the seed recipe's trainer (``Ctx``), and the guards that keep one check's process-wide state out of the next.

Why one context: the recipe model (V = 267,744 on a GPU) takes seconds to build and is used by six checks; the
generated corpus by ten. ``Ctx`` makes each once, on first use, so that ``--only`` runs pay only for what they use.
"""

from __future__ import annotations

import contextlib
import io
import logging
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adaptive_lm.check.config import CheckConfig
from adaptive_lm.core import hardware
from adaptive_lm.core.corpus import Corpus
from adaptive_lm.core.data import IndexedWriter, best_dtype
from adaptive_lm.core.dictionary import Dictionary
from adaptive_lm.core.kernels import plain_kernels
from adaptive_lm.core.logs import log_lines_to
from adaptive_lm.core.preprocess import PreprocessConfig, preprocess
from adaptive_lm.inference.loading import from_pretrained
from adaptive_lm.training.config import TrainConfig
from adaptive_lm.training.data import Prefetcher
from adaptive_lm.training.loop import train
from adaptive_lm.training.trainer import Trainer

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
NO_CUDA = "needs CUDA (dry run on the CPU)"
NO_DROPOUT = dict(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, adaptive_softmax_dropout=0.0)
TRAIN_LOG = logging.getLogger("adaptive_lm.train")


@dataclass
class Plan:
    """Sizes of one mode. The defaults are the full GPU run; the CPU dry runs shrink them (``PLANS``)."""

    corpus_vocab: int = 2000  # word types of the generated corpus (trainer and distributed checks)
    corpus_tokens: int = 60_000
    updates: int = 30  # per precision in the trainer checks
    compile_updates: int = 10  # 0: no --compile comparison
    recipe_vocab: int = 267_744
    recipe_T: int = 3072
    recipe_overrides: dict = field(default_factory=dict)  # model flags on top of transformer_lm_wiki103
    recipe_updates: int = 5  # timed updates per update-freq
    gen_tokens: int = 200
    eval_context: int = 2560
    attention_shape: tuple[int, int, int, int] = (2, 8, 256, 64)  # B, H, T, head dim
    ce_shape: tuple[int, int] = (2048, 20_002)  # rows, classes (the recipe's head)
    dropout_n: int = 1 << 22


def small_recipe(d: int, cutoff: tuple[int, int]) -> dict:
    """The recipe's architecture, 2 layers of width ``d``: what a CPU can train in seconds."""
    heads = 8 if d >= 128 else 4
    return dict(decoder_layers=2, decoder_embed_dim=d, decoder_ffn_embed_dim=4 * d, decoder_attention_heads=heads,
                adaptive_input_cutoff=cutoff, adaptive_softmax_cutoff=cutoff)  # fmt: skip


PLANS = {
    "gpu": Plan(),
    "dry": Plan(compile_updates=4, recipe_vocab=3000, recipe_T=128, recipe_overrides=small_recipe(128, (500, 1500)),
                recipe_updates=3, gen_tokens=32, eval_context=64, attention_shape=(2, 4, 128, 64),
                ce_shape=(1024, 2000), dropout_n=1 << 20),
    "quick": Plan(corpus_vocab=1000, corpus_tokens=20_000, updates=10, compile_updates=0, recipe_vocab=1000,
                  recipe_T=64, recipe_overrides=small_recipe(64, (200, 500)), recipe_updates=1, gen_tokens=16,
                  eval_context=32, attention_shape=(1, 2, 64, 32), ce_shape=(256, 500), dropout_n=1 << 18),
}  # fmt: skip


@dataclass
class Record:
    """One row of the table: a check's verdict, its key figures (also in the JSON) and why, if not PASS."""

    status: str
    summary: str = ""  # one line for the table
    figures: dict = field(default_factory=dict)
    note: str = ""
    details: list[str] = field(default_factory=list)  # extra lines printed below the table (e.g. top kernels)
    name: str = ""
    group: str = ""
    seconds: float = 0.0


def verdict(ok: bool) -> str:
    return PASS if ok else FAIL


def skip(why: str, **figures: Any) -> Record:
    return Record(SKIP, why, figures, why)


# ---- the context shared by the checks: device, sizes, generated data, the recipe trainer ----------------------
class Ctx:
    """The device and sizes of this run, its work folder, and the data and models the checks share (made lazily)."""

    def __init__(self, cfg: CheckConfig) -> None:
        self.cfg = cfg
        self.cuda = torch.cuda.is_available() and not cfg.dry_run
        self.quick = cfg.quick
        self.mode = ("gpu" if self.cuda else "dry") + ("-quick" if cfg.quick else "")
        self.plan = PLANS["quick" if cfg.quick else ("gpu" if self.cuda else "dry")]
        self.device = torch.device("cuda:0" if self.cuda else "cpu")
        self.verbose = cfg.verbose
        self.work = Path(cfg.workdir) if cfg.workdir else Path(tempfile.mkdtemp(prefix="gpu_check-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.keep = cfg.keep or bool(cfg.workdir)
        self._recipe: dict[str, Any] | None = None

    @property
    def recipe_bf16(self) -> bool:
        """The recipe in bf16; on a CPU only where bf16 is native (emulated, even a small model crawls)."""
        return self.cuda or hardware.native_half(torch.bfloat16)

    @property
    def where(self) -> str:
        return str(self.device) if self.cuda else "cpu (plain kernels)"

    @property
    def kernels(self) -> str:
        """The trainer's ``kernels`` for this device: CUDA's own, or the plain ones on a CPU (what CUDA runs)."""
        return "auto" if self.cuda else "plain"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def corpus(self) -> tuple[Path, int, tuple[int, int]]:
        """(data-bin, vocabulary size, adaptive cutoffs) of a generated corpus, made once (also by the child)."""
        d = self.work / "corpus"
        if not (d / "bin" / "valid.idx").is_file():
            d.mkdir(parents=True, exist_ok=True)
            c = Corpus(vocab=self.plan.corpus_vocab, states=8, seed=1)
            c.write(d / "train.txt", self.plan.corpus_tokens)
            c.write(d / "valid.txt", self.plan.corpus_tokens // 8)
            text = dict(trainpref=str(d / "train.txt"), validpref=str(d / "valid.txt"))
            preprocess(PreprocessConfig(**text, destdir=str(d / "bin"), progress=False))
        V = len(Dictionary.load(d / "bin" / "dict.txt"))
        return d / "bin", V, (V // 10, V // 3)

    def small_cfg(self, save_dir: str | Path, **kw: Any) -> TrainConfig:
        """A 2-layer wiki103-shaped model on the generated corpus with the recipe's optimizer settings."""
        data, V, cut = self.corpus()
        overrides = dict(decoder_layers=2, decoder_embed_dim=64, decoder_ffn_embed_dim=256, decoder_attention_heads=4,
                         adaptive_input_cutoff=cut, adaptive_softmax_cutoff=cut)  # fmt: skip
        overrides.update(kw.pop("model", {}))
        values = dict(data=str(data), save_dir=str(save_dir), arch="transformer_lm_wiki103", model_overrides=overrides,
                      tokens_per_sample=64, max_tokens=512, lr=1.0, warmup_updates=5, warmup_init_lr=1e-7, min_lr=1e-4,
                      t_mult=2, lr_shrink=0.75, clip_norm=0.1, max_update=self.plan.updates, seed=1,
                      log_format="none", progress_bar=False, no_epoch_checkpoints=True, kernels=self.kernels,
                      cpu=not self.cuda)  # fmt: skip
        values.update(kw)
        return TrainConfig(**values)

    # ---- the seed recipe's model ----------------------------------------------------------------------------
    def recipe_cfg(self, data: Path) -> TrainConfig:
        """The seed recipe's settings (transformer_lm_wiki103, update-freq 3, the cosine schedule) at this plan's
        sizes: what the recipe checks time and profile."""
        p = self.plan
        return TrainConfig(data=str(data), save_dir=str(self.work / "recipe-ckpt"), arch="transformer_lm_wiki103",
                           model_overrides=dict(p.recipe_overrides), tokens_per_sample=p.recipe_T,
                           max_tokens=p.recipe_T, update_freq=3, bf16=self.recipe_bf16, lr=1.0, t_mult=2,
                           lr_period_updates=270_000, lr_shrink=0.75, warmup_updates=16_000, warmup_init_lr=1e-7,
                           stop_min_lr=1e-9, min_lr=1e-4, clip_norm=0.1, max_update=286_000, seed=1, no_save=True,
                           disable_validation=True, log_format="none", progress_bar=False, kernels=self.kernels,
                           cpu=not self.cuda)  # fmt: skip

    def recipe(self) -> dict[str, Any]:
        """The recipe's Trainer on a synthetic corpus with the recipe's vocabulary size (built once)."""
        if self._recipe is None:
            p = self.plan
            data = self.work / "recipe"
            write_zipf_data(data, p.recipe_vocab, train_tokens=p.recipe_T * 48, valid_tokens=p.recipe_T * 4)
            cfg = self.recipe_cfg(data)
            with quiet(self.verbose), plain_kernels(not self.cuda), tf32(None):
                t0 = time.perf_counter()
                trainer = Trainer(cfg)
                build_s = time.perf_counter() - t0
            self._recipe = dict(trainer=trainer, data=data, cfg=cfg, next=0, build_s=build_s, outs=[])
        return self._recipe

    def recipe_samples(self, n: int) -> list[dict[str, Any]]:
        """The next ``n`` micro-batches of the recipe run, collated, routed and on the device (the GPU loader)."""
        r = self.recipe()
        t: Trainer = r["trainer"]
        batches = t.batches.epoch_batches(1)
        groups = [[batches[(r["next"] + i) % len(batches)]] for i in range(n)]
        r["next"] += n
        loader = Prefetcher(t.train_data, groups, t.device, False, t.model_cfg)
        return [s for group in loader for s in group]

    def recipe_step(self, samples: list[dict[str, Any]]) -> dict[str, float]:
        r = self.recipe()
        with plain_kernels(not self.cuda), tf32(r["cfg"].tf32):  # as in training: TF32 for fp32 matmuls on CUDA
            out = r["trainer"].train_step(samples)
        r["outs"].append(out)
        return out


# ---- guards and helpers ------------------------------------------------------------------------------------------
def quiet(verbose: bool) -> contextlib.AbstractContextManager[io.StringIO]:
    """The trainer's log lines (``adaptive_lm.train``) go to a buffer that the checks read (fp16 overflows,
    ``--compile`` fallbacks, the world line); with ``verbose`` they also reach the caller's handlers."""
    return log_lines_to(io.StringIO(), TRAIN_LOG.name, propagate=verbose)


@contextlib.contextmanager
def tf32(on: bool | None) -> Iterator[None]:
    """Set (or with None only protect) CUDA's TF32 switches for a block; ``Trainer`` sets them process-wide."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if on is not None:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def run_training(ctx: Ctx, cfg: TrainConfig) -> tuple[dict[str, Any], str, float]:
    """``adaptive_lm.training.loop.train(cfg)`` with its log lines captured; (result, log text, seconds).

    ``train`` leaves process-wide state behind (SIGINT/SIGTERM handlers bound to the finished run, TF32 switches,
    the plain-kernel switch): restored here so that the checks stay independent and Ctrl-C keeps working."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    t0 = time.perf_counter()
    try:
        with quiet(ctx.verbose) as buf, tf32(None), plain_kernels(cfg.kernels == "plain"):
            result = train(cfg)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    return result, buf.getvalue(), time.perf_counter() - t0


def losses_of(result: dict[str, Any]) -> list[float]:
    """The training losses of a run's history, skipped (fp16 overflow) updates left out."""
    return [h["loss"] for h in result["history"] if not h.get("skipped")]


def final_weights(save: Path) -> dict[str, torch.Tensor]:
    return from_pretrained(save / "checkpoint_last.pt").model.state_dict()


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double().cpu() - b.detach().double().cpu()).abs().max().item() if a.numel() else 0.0


def maxabs(a: torch.Tensor) -> float:
    return a.detach().double().abs().max().item() if a.numel() else 0.0


def fmt(x: float, digits: int = 2) -> str:
    return f"{x:.{digits}e}" if x != 0 else "0"


def write_zipf_data(d: Path, V: int, train_tokens: int, valid_tokens: int, seed: int = 0) -> None:
    """A binarised corpus with exactly ``V`` symbols: ``dict.txt`` (w0, w1, ... by falling count) and Zipfian
    ``train``/``valid`` splits in lines of 5-40 words + ``</s>``, written directly (no 100M-token text)."""
    if (d / "valid.idx").is_file():
        return
    d.mkdir(parents=True, exist_ok=True)
    dictionary = Dictionary()
    n = V - len(dictionary)
    for i in range(n):
        dictionary.add_symbol(f"w{i}", n=n - i)
    dictionary.save(d / "dict.txt")
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, n + 1) ** 1.05
    p /= p.sum()
    for split, count in (("train", train_tokens), ("valid", valid_tokens)):
        lens = rng.integers(5, 40, size=count // 5 + 1)
        lens = lens[np.cumsum(lens + 1) <= count]
        words = rng.choice(n, size=int(lens.sum()), p=p) + len(Dictionary())
        tokens = np.insert(words, np.cumsum(lens), dictionary.eos())  # </s> after every line
        writer = IndexedWriter(d / split, best_dtype(V))
        writer.add_array(tokens, lens + 1)
        writer.finalize()
