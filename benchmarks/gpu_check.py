"""One-command GPU self-check: does adaptive-lm work, and work well, on this NVIDIA GPU?

    python benchmarks/gpu_check.py                    # on a CUDA machine: every check, < 8 min on one H100/H200
    python benchmarks/gpu_check.py --dry-run          # CPU: the GPU code path (plain kernels), reduced sizes
    python benchmarks/gpu_check.py --dry-run --quick  # the smallest settings (what tests/test_gpu_check.py runs)
    python benchmarks/gpu_check.py --only kernels,model --out /tmp/check.json

Needs nothing but the repository and torch: it generates its own data in a temporary folder. If the shared
fairseq fixture (``../shared/fixtures/fairseq-tiny``) is present it also checks that model's known perplexity.
Prints a table (PASS / FAIL / SKIP per check), writes JSON (``--out``; default
``benchmarks/results/gpu_check.json``, or ``gpu_check_dry.json`` for a dry run so that it never overwrites a GPU
result) and exits 1 if anything FAILed. An exception inside a check is that check's FAIL; the others still run.

What "works on GPU" means, check by check (each is a small function below returning one ``Record``):

1. env       torch / CUDA / cuDNN / NCCL versions, the GPU, flash / memory-efficient attention, bf16, the CPU.
2. kernels   ``causal_attention`` fp32 on CUDA = on CPU (max |diff| <= 1e-5, forward and gradients);
             ``cross_entropy_sum`` value and gradient (also loss-scaled) = CPU within fp32 rounding (rel 1e-5);
             dropout: the same ``torch.manual_seed`` gives the same mask, another seed another one, the kept
             fraction is 1 - p (element-wise, residual and attention dropout).
3. model     a 2-layer wiki103-shaped model in fp64, CUDA vs CPU: loss, target log-probs, every gradient (1e-10).
4. trainer   ``train(TrainConfig(...))`` on the GPU in fp32 / bf16 / fp16 on a generated corpus: losses fall,
             fp16's skipped updates and final loss scale; 8 updates == 4 + resume (weights bitwise, or as close
             as two identical CUDA runs are); ``compile=True`` vs eager losses (dropout 0).
5. distrib.  a world-1 NCCL group through the gradient all-reduce and validation (subprocess); with >= 2 GPUs a
             real ``torchrun --nproc_per_node=2`` run against one process with ``--update-freq 2``.
6. recipe    the seed recipe's model (``transformer_lm_wiki103``, V = 267,744, T = 3,072, bf16): tokens/s, MFU,
             peak memory at update-freq 1 and 3; host syncs per micro-batch and per update
             (``torch.cuda.set_sync_debug_mode``); the top CUDA kernels of one profiled step.
7. eval      evaluation tokens/s with a context window, generation tokens/s with and without the key/value cache
             (cached scores checked against a full forward), n-best rescoring tokens/s
             (``adaptive_lm.inference.rescore``
             against ``lm.score``); the fixture's fairseq-eval-lm perplexity (within 1e-3 bits).

Without CUDA (or with ``--dry-run``) the same functions run on the CPU with ``adaptive_lm.core.kernels`` switched to
the plain kernels (what CUDA runs: ``F.scaled_dot_product_attention``, PyTorch dropout, no row padding, the
sync-free cross-entropy branch; the trainer then finds adaptive band rows on the loader side), at reduced sizes;
whatever only a GPU can show (flash kernels, NCCL, host syncs, GPU memory, peak TFLOP/s) is SKIP, with the reason.
Comparisons are "device" (CUDA, or the CPU with plain kernels) against the CPU with our own kernels or fp64.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import adaptive_lm
from adaptive_lm.core import hardware
from adaptive_lm.core.corpus import Corpus
from adaptive_lm.core.data import IndexedWriter, best_dtype
from adaptive_lm.core.dictionary import Dictionary
from adaptive_lm.core.kernels import add_dropout, causal_attention, cross_entropy_sum, dropout, plain_kernels
from adaptive_lm.core.model import Routes
from adaptive_lm.core.preprocess import PreprocessConfig, preprocess
from adaptive_lm.inference.evaluate import EvalConfig, evaluate
from adaptive_lm.inference.hub import LanguageModel
from adaptive_lm.training.config import TrainConfig
from adaptive_lm.training.data import Prefetcher
from adaptive_lm.training.loop import train
from adaptive_lm.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO.parent / "shared" / "fixtures" / "fairseq-tiny"
PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
NO_CUDA = "needs CUDA (dry run on the CPU)"

# dense bf16 tensor-core peaks (TFLOP/s, no sparsity), by a substring of torch.cuda.get_device_name(); first match
BF16_PEAK_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0)]
# fairseq-eval-lm on the fixture (valid split, --tokens-per-sample 256): context window -> (tokens, loss base 2, ppl)
FIXTURE_EVAL = {0: (217_646, 8.3184, 319.22), 128: (217_646, 8.3131, 318.04)}
NO_DROPOUT = dict(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, adaptive_softmax_dropout=0.0)


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
    def __init__(self, args: argparse.Namespace) -> None:
        self.cuda = torch.cuda.is_available() and not args.dry_run
        self.quick = args.quick
        self.mode = ("gpu" if self.cuda else "dry") + ("-quick" if args.quick else "")
        self.plan = PLANS["quick" if args.quick else ("gpu" if self.cuda else "dry")]
        self.device = torch.device("cuda:0" if self.cuda else "cpu")
        self.verbose = args.verbose
        self.work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gpu_check-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.keep = args.keep or bool(args.workdir)
        self._recipe: dict[str, Any] | None = None

    @property
    def recipe_bf16(self) -> bool:
        """The recipe in bf16; on a CPU only where bf16 is native (emulated, even a small model crawls)."""
        return self.cuda or hardware.native_half(torch.bfloat16)

    @property
    def where(self) -> str:
        return str(self.device) if self.cuda else "cpu (plain kernels)"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    # ---- the generated corpus (Corpus + preprocess) -------------------------------------------------------
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
        overrides = dict(
            decoder_layers=2,
            decoder_embed_dim=64,
            decoder_ffn_embed_dim=256,
            decoder_attention_heads=4,
            adaptive_input_cutoff=cut,
            adaptive_softmax_cutoff=cut,
        )
        overrides.update(kw.pop("model", {}))
        values = dict(
            data=str(data),
            save_dir=str(save_dir),
            arch="transformer_lm_wiki103",
            model_overrides=overrides,
            tokens_per_sample=64,
            max_tokens=512,
            lr=1.0,
            warmup_updates=5,
            warmup_init_lr=1e-7,
            min_lr=1e-4,
            t_mult=2,
            lr_shrink=0.75,
            clip_norm=0.1,
            max_update=self.plan.updates,
            seed=1,
            log_format="none",
            progress_bar=False,
            no_epoch_checkpoints=True,
            kernels="auto" if self.cuda else "plain",
            cpu=not self.cuda,
        )
        values.update(kw)
        return TrainConfig(**values)

    # ---- the seed recipe's model ----------------------------------------------------------------------------
    def recipe(self) -> dict[str, Any]:
        """The recipe's Trainer on a synthetic corpus with the recipe's vocabulary size (built once)."""
        if self._recipe is None:
            p = self.plan
            data = self.work / "recipe"
            write_zipf_data(data, p.recipe_vocab, train_tokens=p.recipe_T * 48, valid_tokens=p.recipe_T * 4)
            cfg = TrainConfig(
                data=str(data),
                save_dir=str(self.work / "recipe-ckpt"),
                arch="transformer_lm_wiki103",
                model_overrides=dict(p.recipe_overrides),
                tokens_per_sample=p.recipe_T,
                max_tokens=p.recipe_T,
                update_freq=3,
                bf16=self.recipe_bf16,
                lr=1.0,
                t_mult=2,
                lr_period_updates=270_000,
                lr_shrink=0.75,
                warmup_updates=16_000,
                warmup_init_lr=1e-7,
                stop_min_lr=1e-9,
                min_lr=1e-4,
                clip_norm=0.1,
                max_update=286_000,
                seed=1,
                no_save=True,
                disable_validation=True,
                log_format="none",
                progress_bar=False,
                kernels="auto" if self.cuda else "plain",
                cpu=not self.cuda,
            )
            with quiet(self), plain_kernels(not self.cuda), tf32(None):
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


@contextlib.contextmanager
def quiet(ctx: Ctx) -> Iterator[io.StringIO]:
    """The trainer's console lines go to a buffer (shown with --verbose)."""
    buf = io.StringIO()
    if ctx.verbose:
        yield buf
        return
    with contextlib.redirect_stdout(buf):
        yield buf


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
    """``adaptive_lm.training.trainer.train(cfg)`` with its console output captured; (result, output, seconds).

    ``train`` leaves process-wide state behind (SIGINT/SIGTERM handlers bound to the finished run, TF32 switches,
    the plain-kernel switch): restored here so that the checks stay independent and Ctrl-C keeps working."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    t0 = time.perf_counter()
    try:
        with quiet(ctx) as buf, tf32(None), plain_kernels(cfg.kernels == "plain"):
            result = train(cfg)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    return result, buf.getvalue(), time.perf_counter() - t0


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


# =====================================================================================================
# 1. environment
# =====================================================================================================
def check_machine(ctx: Ctx) -> Record:
    m = hardware.describe()
    figs = {**m, "python": platform.python_version(), "cuda_available": torch.cuda.is_available(), "mode": ctx.mode}
    gpu = f", {m['gpu']} (CUDA {m['cuda']})" if "gpu" in m else ", no CUDA device"
    return Record(PASS, f"torch {torch.__version__}, {m['cpu']} [{m['isa']}], {m['threads']} threads{gpu}", figs)


def gpu_peak_tflops(name: str) -> float | None:
    for key, tflops in BF16_PEAK_TFLOPS:
        if key.lower() in name.lower():
            return tflops
    return None


def check_gpu_features(ctx: Ctx) -> Record:
    if not ctx.cuda:
        return skip(NO_CUDA, sdpa_flags=sdpa_flags())
    props = torch.cuda.get_device_properties(0)
    try:
        nccl = torch.cuda.nccl.version()
        nccl = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
    except Exception as e:  # noqa: BLE001 - informational
        nccl = f"unavailable ({type(e).__name__})"
    figs = dict(
        gpu=props.name,
        gpus=torch.cuda.device_count(),
        memory_gib=round(props.total_memory / 2**30, 1),
        capability=f"{props.major}.{props.minor}",
        cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version(),
        nccl=nccl,
        bf16_supported=torch.cuda.is_bf16_supported(),
        bf16_peak_tflops_table=gpu_peak_tflops(props.name),
        **sdpa_flags(),
    )
    fused = figs.get("flash_attention_available", True) or figs["mem_efficient_sdp_enabled"]
    ok = figs["bf16_supported"] and fused
    why = "" if ok else "no bf16 support" if not figs["bf16_supported"] else "no fused attention kernel"
    summary = (
        f"{props.name} {figs['memory_gib']} GiB sm{props.major}{props.minor} x{figs['gpus']}, CUDA {figs['cuda']}, "
        f"flash {figs.get('flash_attention_available', '?')}, bf16 {figs['bf16_supported']}"
    )
    return Record(verdict(ok), summary, figs, why)


def sdpa_flags() -> dict[str, Any]:
    flags = dict(
        flash_sdp_enabled=torch.backends.cuda.flash_sdp_enabled(),
        mem_efficient_sdp_enabled=torch.backends.cuda.mem_efficient_sdp_enabled(),
        cudnn_sdp_enabled=torch.backends.cuda.cudnn_sdp_enabled(),
        math_sdp_enabled=torch.backends.cuda.math_sdp_enabled(),
    )
    if hasattr(torch.backends.cuda, "is_flash_attention_available"):
        flags["flash_attention_available"] = torch.backends.cuda.is_flash_attention_available()
    return flags


# =====================================================================================================
# 2. kernels: the device's (PyTorch's) against the CPU's (ours) and fp64
# =====================================================================================================
def attention_fp64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor) -> list[torch.Tensor]:
    """Causal softmax(q k^T / sqrt(hd)) v written out in fp64, with its gradients: the exact reference."""
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    T = q.shape[-2]
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    out = torch.softmax(s, -1) @ v
    out.backward(dout.double())
    return [out.detach(), q.grad, k.grad, v.grad]


def run_attention(q, k, v, dout, device, plain: bool, dtype=torch.float32, backend=None) -> list[torch.Tensor]:
    """``causal_attention`` (dropout 0) forward and backward on ``device``; outputs and gradients on the CPU."""
    from torch.nn.attention import sdpa_kernel

    with plain_kernels(plain), sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
        ts = [t.to(device, dtype, copy=True).requires_grad_() for t in (q, k, v)]  # fresh leaves on any device
        out = causal_attention(*ts, 0.0, True)
        out.backward(dout.to(device, dtype))
    return [out.detach().double().cpu()] + [t.grad.double().cpu() for t in ts]


def check_attention(ctx: Ctx) -> Record:
    B, H, T, hd = ctx.plan.attention_shape
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(B, H, T, hd, generator=g) for _ in range(4))
    exact = attention_fp64(q, k, v, dout)
    with tf32(False):  # fp32 means fp32 here (the trainer turns TF32 on for training)
        cpu = run_attention(q, k, v, dout, "cpu", plain=False)
        dev = run_attention(q, k, v, dout, ctx.device, plain=True)
    fwd = maxdiff(dev[0], cpu[0])
    grad = max(maxdiff(a, b) / max(maxabs(b), 1e-30) for a, b in zip(dev[1:], cpu[1:]))
    fwd64 = maxdiff(dev[0], exact[0])
    grad64 = max(maxdiff(a, b) / max(maxabs(b), 1e-30) for a, b in zip(dev[1:], exact[1:]))
    figs = dict(
        shape=[B, H, T, hd],
        device=ctx.where,
        fwd_max_abs_diff_vs_cpu=fwd,
        grad_max_rel_diff_vs_cpu=grad,
        fwd_max_abs_diff_vs_fp64=fwd64,
        grad_max_rel_diff_vs_fp64=grad64,
    )
    if ctx.cuda:  # each SDPA backend alone, fp32 and bf16, against fp64 (figures only: which ones run, how close)
        from torch.nn.attention import SDPBackend

        per = {}
        for dt, names in (
            (torch.float32, ("EFFICIENT_ATTENTION", "MATH")),
            (torch.bfloat16, ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")),
        ):
            for name in names:
                key = f"{str(dt).split('.')[-1]}_{name.lower()}"
                try:
                    with tf32(False):
                        r = run_attention(q, k, v, dout, ctx.device, True, dt, getattr(SDPBackend, name))
                    per[key] = dict(
                        fwd_vs_fp64=maxdiff(r[0], exact[0]), dq_rel_vs_fp64=maxdiff(r[1], exact[1]) / maxabs(exact[1])
                    )
                except Exception as e:  # noqa: BLE001 - a backend that does not support the shape/dtype
                    per[key] = f"n/a ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})"
        figs["backends"] = per
    ok = fwd <= 1e-5 and grad <= 1e-5 and fwd64 <= 1e-5 and grad64 <= 1e-5
    summary = f"{ctx.where}: fwd |d| {fmt(fwd)} (vs fp64 {fmt(fwd64)}), grads rel {fmt(grad)} (vs fp64 {fmt(grad64)})"
    return Record(verdict(ok), summary, figs, "" if ok else "above 1e-5")


def check_cross_entropy(ctx: Ctx) -> Record:
    N, V = ctx.plan.ce_shape
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(N, V, generator=g) * 4
    target = torch.randint(0, V, (N,), generator=g)
    target[::13] = 1  # ignored rows (the padding index)
    figs: dict[str, Any] = dict(shape=[N, V], device=ctx.where)
    worst = 0.0
    for scale in (1.0, 256.0):  # 256: a loss-scaled backward (fp16), the g != 1 branch

        def run(device, plain: bool, scale: float = scale) -> tuple[float, torch.Tensor]:
            with plain_kernels(plain):
                x = logits.to(device, copy=True).requires_grad_()
                loss = cross_entropy_sum(x, target.to(device), 1)
                (loss * scale).backward()
            return loss.item(), x.grad.cpu()

        (lc, gc), (ld, gd) = run("cpu", False), run(ctx.device, True)
        x64 = logits.double().requires_grad_()
        l64 = F.cross_entropy(x64, target, ignore_index=1, reduction="sum")
        (l64 * scale).backward()
        rel = abs(ld - lc) / abs(lc)
        grel = maxdiff(gd, gc) / maxabs(gc)
        rel64, grel64 = abs(ld - l64.item()) / abs(l64.item()), maxdiff(gd, x64.grad) / maxabs(x64.grad)
        figs[f"scale_{scale:g}"] = dict(
            value_rel_vs_cpu=rel, grad_rel_vs_cpu=grel, value_rel_vs_fp64=rel64, grad_rel_vs_fp64=grel64
        )
        worst = max(worst, rel, grel, rel64, grel64)
    ok = worst <= 1e-5
    return Record(verdict(ok), f"{ctx.where}: worst relative diff {fmt(worst)} (value, grads; x1 and x256)", figs)


def check_dropout(ctx: Ctx) -> Record:
    n, p = ctx.plan.dropout_n, 0.3
    dev = ctx.device

    def seeded(seed: int, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        torch.manual_seed(seed)
        return fn()

    with plain_kernels(True):
        x = torch.ones(n, device=dev)
        a, b, c = (seeded(s, lambda: dropout(x, p, True)) for s in (1, 1, 2))
        r = seeded(1, lambda: add_dropout(torch.zeros_like(x), x, p, True))  # residual: the same mask as dropout()
        kept = (a != 0).float().mean().item()
        values_ok = torch.allclose(a[a != 0], torch.full((), 1 / (1 - p), device=dev))
        # attention dropout (inside SDPA; bf16 on CUDA, where the flash kernel draws it)
        g = torch.Generator().manual_seed(2)
        dt = torch.bfloat16 if ctx.cuda else torch.float32
        q, k, v = (torch.randn(2, 4, 64, 32, generator=g).to(dev, dt) for _ in range(3))
        o1, o2, o3 = (seeded(s, lambda: causal_attention(q, k, v, 0.1, True)) for s in (1, 1, 2))
    tol = 6 * math.sqrt(p * (1 - p) / n)
    checks = dict(
        same_seed_same_mask=torch.equal(a, b),
        other_seed_other_mask=not torch.equal(a, c),
        kept_fraction_ok=abs(kept - (1 - p)) <= tol,
        kept_scaled_by_1_over_keep=bool(values_ok),
        residual_same_mask=torch.equal(r, a),
        attention_same_seed_same=torch.equal(o1, o2),
        attention_other_seed_differs=not torch.equal(o1, o3),
    )
    failed = [k for k, ok in checks.items() if not ok]
    figs = dict(device=ctx.where, n=n, p=p, kept_fraction=kept, tolerance=tol, **checks)
    return Record(
        verdict(not failed),
        f"{ctx.where}: kept {kept:.4f} (expect {1 - p}), reseeding ok: {len(checks) - len(failed)}/{len(checks)}",
        figs,
        ", ".join(failed),
    )


# =====================================================================================================
# 3. a 2-layer model in fp64, device vs CPU
# =====================================================================================================
def check_model_fp64(ctx: Ctx) -> Record:
    V, B, T = 400, 4, 48
    torch.manual_seed(0)
    cpu = adaptive_lm.build_model(
        "transformer_lm_wiki103",
        V,
        decoder_layers=2,
        decoder_embed_dim=64,
        decoder_ffn_embed_dim=128,
        decoder_attention_heads=4,
        adaptive_input_cutoff=(50, 150),
        adaptive_softmax_cutoff=(50, 150),
        **NO_DROPOUT,
    ).double()
    dev = copy.deepcopy(cpu).to(ctx.device)
    g = torch.Generator().manual_seed(3)
    tgt = torch.randint(4, V, (B, T), generator=g)
    tgt[1, -5:] = tgt[3, -9:] = 1  # right padding, as the collater makes it
    src = torch.cat([torch.full((B, 1), 2), tgt[:, :-1]], 1).masked_fill(tgt.eq(1), 1)
    src_d, tgt_d = src.to(ctx.device), tgt.to(ctx.device)

    def grads(m: torch.nn.Module) -> dict[str, torch.Tensor | None]:
        return {n: (p.grad.detach().cpu() if p.grad is not None else None) for n, p in m.named_parameters()}

    with plain_kernels(False):  # CPU, our kernels, bands found with nonzero
        cpu.train()
        loss_c = cpu.loss_from_features(cpu(src), tgt)
        loss_c.backward()
        cpu.eval()
        with torch.no_grad():
            lp_c = cpu.target_log_probs(src, tgt)
    with plain_kernels(True):  # the device, bands precomputed on the CPU (model.Routes), as the trainer does
        dev.train()
        routes = Routes(src, tgt, dev.cfg).to(ctx.device)
        loss_d = dev.loss_from_features(dev(src_d, routes=routes), tgt_d, True, routes)
        loss_d.backward()
        loss_plain = dev.loss(src_d, tgt_d).item()  # the same without routes
        dev.eval()
        with torch.no_grad():
            lp_d = dev.target_log_probs(src_d, tgt_d)
    gc, gd = grads(cpu), grads(dev)
    missing = [n for n in gc if (gc[n] is None) != (gd[n] is None)]
    rel = {n: maxdiff(gd[n], gc[n]) / max(maxabs(gc[n]), 1e-300) for n in gc if gc[n] is not None and gd[n] is not None}
    worst_name = max(rel, key=rel.get)
    keep = tgt.ne(1)
    figs = dict(
        device=ctx.where,
        loss_cpu=loss_c.item(),
        loss_rel_diff=abs(loss_d.item() - loss_c.item()) / abs(loss_c.item()),
        loss_without_routes_rel_diff=abs(loss_plain - loss_c.item()) / abs(loss_c.item()),
        target_logprob_max_abs_diff=maxdiff(lp_d.cpu()[keep], lp_c[keep]),
        grad_worst_rel_diff=rel[worst_name],
        grad_worst_param=worst_name,
        params_compared=len(rel),
        grad_presence_mismatch=missing,
    )
    tight = ["loss_rel_diff", "loss_without_routes_rel_diff", "target_logprob_max_abs_diff", "grad_worst_rel_diff"]
    bad = [k for k in tight if figs[k] > 1e-10] + (["gradient presence"] if missing else [])
    summary = (
        f"{ctx.where}: loss {fmt(figs['loss_rel_diff'])}, log-probs {fmt(figs['target_logprob_max_abs_diff'])}, "
        f"{len(rel)} grads worst {fmt(rel[worst_name])} ({worst_name})"
    )
    return Record(verdict(not bad), summary, figs, ("above 1e-10: " + ", ".join(bad)) if bad else "")


# =====================================================================================================
# 4. the trainer on the device
# =====================================================================================================
def losses_of(result: dict[str, Any]) -> list[float]:
    return [h["loss"] for h in result["history"] if not h.get("skipped")]


def training_record(ctx: Ctx, precision: str) -> Record:
    flag = {"fp32": {}, "bf16": {"bf16": True}, "fp16": {"fp16": True}}[precision]
    save = ctx.work / f"train-{precision}"
    shutil.rmtree(save, ignore_errors=True)
    result, out, secs = run_training(ctx, ctx.small_cfg(save, **flag))
    losses = losses_of(result)
    hist = result["history"]
    k = max(1, min(5, len(losses) // 4))
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    finite = all(math.isfinite(x) for x in losses) and len(losses) > 0
    figs = dict(
        device=ctx.where,
        updates=len(hist),
        first_losses=[round(x, 4) for x in losses[:k]],
        last_losses=[round(x, 4) for x in losses[-k:]],
        valid_losses=result["valid_losses"],
        seconds=round(secs, 1),
        s_per_update=round(secs / max(1, len(hist)), 3),
    )
    summary = f"{ctx.where}: {len(hist)} updates, loss {first:.3f} -> {last:.3f} bits"
    if result["valid_losses"]:
        summary += f", valid {result['valid_losses'][-1]:.3f}"
    if precision == "fp16":
        skipped = sum(1 for h in hist if h.get("skipped"))
        ck = torch.load(save / "checkpoint_last.pt", weights_only=True, map_location="cpu")
        figs.update(
            skipped_updates=skipped,
            final_loss_scale=ck["train_state"]["loss_scale"],
            overflow_lines=[x for x in out.splitlines() if "fp16 overflow" in x][:5],
        )
        summary += f", {skipped} skipped, loss scale {figs['final_loss_scale']:g}"
    ok = finite and last < first - 0.5 and result["signal"] == 0
    note = (
        ""
        if ok
        else ("non-finite loss" if not finite else f"loss did not fall by 0.5 bits ({first:.3f} -> {last:.3f})")
    )
    return Record(verdict(ok), summary, figs, note)


def check_train_fp32(ctx: Ctx) -> Record:
    return training_record(ctx, "fp32")


def check_train_bf16(ctx: Ctx) -> Record:
    return training_record(ctx, "bf16")


def check_train_fp16(ctx: Ctx) -> Record:
    return training_record(ctx, "fp16")


def final_weights(save: Path) -> dict[str, torch.Tensor]:
    return adaptive_lm.from_pretrained(save / "checkpoint_last.pt").model.state_dict()


def check_resume(ctx: Ctx) -> Record:
    """8 updates straight == 4 updates, stop, the same config again (it resumes from checkpoint_last.pt)."""
    n = 8 if not ctx.quick else 4
    runs = {}
    for name in ("straight", "split", "straight2") if ctx.cuda else ("straight", "split"):
        save = ctx.work / f"resume-{name}"
        shutil.rmtree(save, ignore_errors=True)
        cfg = ctx.small_cfg(save, max_update=n, disable_validation=True)
        if name == "split":
            first, _, _ = run_training(
                ctx, ctx.small_cfg(save, max_update=n, disable_validation=True, stop_after_updates=n // 2)
            )
            assert first["num_updates"] == n // 2, first["num_updates"]
        runs[name] = (run_training(ctx, cfg)[0], final_weights(save))
    (ra, wa), (rb, wb) = runs["straight"], runs["split"]
    diff = max(maxdiff(wa[k], wb[k]) for k in wa)
    bitwise = all(torch.equal(wa[k], wb[k]) for k in wa)
    la, lb = losses_of(ra)[n // 2 :], losses_of(rb)
    figs = dict(
        device=ctx.where,
        updates=n,
        max_abs_weight_diff=diff,
        bitwise=bitwise,
        loss_diff_after_resume=max(abs(x - y) for x, y in zip(la, lb)) if la and lb else None,
    )
    note = ""
    ok = bitwise and rb["num_updates"] == n
    if ctx.cuda and not bitwise:  # CUDA's atomics (flash backward, embedding/index_add) vary run to run
        base = max(maxdiff(wa[k], runs["straight2"][1][k]) for k in wa)
        figs["straight_vs_straight_max_abs_diff"] = base
        ok = base > 0 and diff <= max(20 * base, 1e-6)
        note = (
            f"not bitwise; two straight runs also differ by {fmt(base)} (non-deterministic CUDA kernels)"
            if ok
            else f"resume differs by {fmt(diff)} while two straight runs differ by {fmt(base)}"
        )
    summary = f"{ctx.where}: {n} == {n // 2} + resume, max |dw| {fmt(diff)}, bitwise {bitwise}"
    return Record(verdict(ok), summary, figs, note)


def check_compile(ctx: Ctx) -> Record:
    k = ctx.plan.compile_updates
    if not k:
        return skip("--quick: no compilation (a minute on a GPU, more on a CPU)")
    res = {}
    texts = {}
    for name, extra in (("eager", {}), ("compiled", {"compile": True})):
        save = ctx.work / f"compile-{name}"
        shutil.rmtree(save, ignore_errors=True)
        cfg = ctx.small_cfg(
            save, model=NO_DROPOUT, stop_after_updates=k, no_save=True, disable_validation=True, **extra
        )
        r, texts[name], secs = run_training(ctx, cfg)
        res[name] = (losses_of(r), secs)
    out = texts["compiled"]
    fell_back = [x for x in out.splitlines() if "--compile failed" in x or "--compile unavailable" in x]
    (le, se), (lc, sc) = res["eager"], res["compiled"]
    diff = max(abs(a - b) for a, b in zip(le, lc)) if len(le) == len(lc) else float("inf")
    tol = 1e-3 if ctx.cuda else 1e-4
    figs = dict(
        device=ctx.where,
        updates=k,
        dropout=0,
        max_loss_diff=diff,
        tolerance=tol,
        eager_s=round(se, 1),
        compiled_s=round(sc, 1),
        fallback=fell_back[:2],
    )
    summary = f"{ctx.where}: {k} updates, max |loss diff| {fmt(diff)} bits, {sc:.1f} s compiled vs {se:.1f} s eager"
    if diff > tol:
        return Record(FAIL, summary, figs, f"compiled losses differ from eager by {fmt(diff)} (> {tol:g})")
    if fell_back:
        return Record(SKIP, summary, figs, "torch.compile fell back to eager: " + fell_back[0][:160])
    return Record(PASS, summary, figs, "dropout 0: compiled code draws its own dropout masks (inductor RNG)")


# =====================================================================================================
# 5. distributed
# =====================================================================================================
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_world1_group(ctx: Ctx) -> Record:
    """A child process with torchrun's environment for one process; see ``dist_child``."""
    backend = "nccl" if ctx.cuda else "gloo"
    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE="1",
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
    )
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "dist", "--workdir", str(ctx.work)]
    cmd += ["--dry-run"] if not ctx.cuda else []
    cmd += ["--quick"] if ctx.quick else []
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stdout[-1500:] + proc.stderr[-2500:]).strip().splitlines()
        return Record(
            FAIL, f"child exited {proc.returncode}", {"tail": tail[-30:]}, tail[-1] if tail else "", details=tail[-15:]
        )
    r = json.loads(lines[-1][len("RESULT ") :])
    r["backend"] = backend
    loss_diff = max(abs(a - b) for a, b in zip(r["losses_group"], r["losses_alone"]))
    r["loss_diff_group_vs_alone"] = loss_diff
    ok = r["reducer_exact"] and r["reducer_zero_filled"] and bool(r["valid_losses"])
    ok = ok and len(r["losses_group"]) == len(r["losses_alone"]) and loss_diff <= (1e-5 if ctx.cuda else 0.0)
    summary = (
        f"{backend} world 1: all-reduce of grads exact {r['reducer_exact']}, {len(r['losses_group'])} updates + "
        f"{len(r['valid_losses'])} validations, losses vs no group {fmt(loss_diff)}"
    )
    note = "" if ok else "see figures"
    if not r["group_initialised_by_setup_distributed"]:
        note = (note + "; " if note else "") + (
            "setup_distributed() makes no group when WORLD_SIZE=1: the check calls init_process_group itself"
        )
    if not ctx.cuda:
        note = (note + "; " if note else "") + "gloo on the CPU (NCCL needs CUDA)"
    return Record(verdict(ok), summary, r, note)


def dist_child(args: argparse.Namespace) -> int:
    """Runs in the child of ``check_world1_group`` with RANK=0 WORLD_SIZE=1 set: the trainer alone, then a process
    group (NCCL on CUDA) through ``GradReducer`` and through the trainer (all-reduce of statistics, rank agreement,
    validation). Prints ``RESULT {json}``."""
    import torch.distributed as dist

    from adaptive_lm.training.distributed import GradReducer, setup_distributed

    ctx = Ctx(args)

    def cfg_of(name: str) -> TrainConfig:
        n = 2 if ctx.quick else 4
        return ctx.small_cfg(ctx.work / f"world1-{name}", max_update=n, validate_interval_updates=n // 2, no_save=True)

    alone, _, _ = run_training(ctx, cfg_of("alone"))
    _, _, device = setup_distributed(cpu=not ctx.cuda)
    made = dist.is_initialized()
    if not made:
        dist.init_process_group(backend="nccl" if ctx.cuda else "gloo")
    # GradReducer: small buckets so that several are sent during the backward; one parameter gets no gradient
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).to(device)
    unused = torch.nn.Parameter(torch.ones(3, device=device))
    params = [*net.parameters(), unused]
    x = torch.randn(8, 16, device=device)
    net(x).square().sum().backward()
    expected = [p.grad.clone() for p in net.parameters()]
    for p in params:
        p.grad = None
    reducer = GradReducer(params, bucket_bytes=256)
    reducer.arm()
    net(x).square().sum().backward()
    reducer.finish()
    reducer.remove()
    exact = all(torch.equal(p.grad, e) for p, e in zip(net.parameters(), expected))
    zero = unused.grad is not None and bool((unused.grad == 0).all())
    grouped, out, _ = run_training(ctx, cfg_of("group"))  # destroys the group at the end
    result = dict(
        group_initialised_by_setup_distributed=made,
        reducer_buckets=len(reducer.buckets),
        reducer_exact=exact,
        reducer_zero_filled=zero,
        losses_alone=losses_of(alone),
        losses_group=losses_of(grouped),
        valid_losses=grouped["valid_losses"],
        world_line=[x for x in out.splitlines() if "world " in x][:1],
    )
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def check_two_processes(ctx: Ctx) -> Record:
    n_gpu = torch.cuda.device_count() if ctx.cuda else 0
    if n_gpu < 2:
        why = NO_CUDA if not ctx.cuda else f"needs >= 2 GPUs ({n_gpu} here)"
        return skip(
            why + "; tests/test_train.py::test_two_processes_follow_one_process_with_update_freq_2 runs it "
            "with gloo on the CPU"
        )
    data, V, cut = ctx.corpus()
    c = f"{cut[0]},{cut[1]}"
    flags = f"""--arch transformer_lm_wiki103 --decoder-layers 2 --decoder-embed-dim 64 --decoder-ffn-embed-dim 256
        --decoder-attention-heads 4 --adaptive-input-cutoff {c} --adaptive-softmax-cutoff {c}
        --dropout 0 --attention-dropout 0 --activation-dropout 0 --adaptive-softmax-dropout 0 --tokens-per-sample 64
        --max-tokens 256 --lr 0.5 --warmup-updates 3 --warmup-init-lr 1e-7 --min-lr 1e-4 --clip-norm 0.1
        --log-interval 1 --no-progress-bar --seed 3 --max-update 6""".split()
    runs = {}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    for name, launcher, uf in (("one", [sys.executable], "2"), ("two", torchrun, "1")):
        save = ctx.work / f"ddp-{name}"
        shutil.rmtree(save, ignore_errors=True)
        cmd = [*launcher, "-m", "adaptive_lm", "train", str(data), *flags, "--update-freq", uf, "--save-dir", str(save)]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1")
        )
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-15:]
            return Record(
                FAIL,
                f"{name} process(es) exited {proc.returncode}",
                {"tail": tail},
                tail[-1] if tail else "",
                details=tail,
            )
        lines = [json.loads(x) for x in open(save / "metrics.jsonl")]
        runs[name] = ([x["loss"] for x in lines if x["split"] == "train_inner"], final_weights(save), proc.stdout)
    (l1, w1, _), (l2, w2, out2) = runs["one"], runs["two"]
    loss_diff = max(abs(a - b) for a, b in zip(l1, l2)) if len(l1) == len(l2) == 6 else float("inf")
    w_diff = max(maxdiff(w1[k], w2[k]) for k in w1)
    ok = loss_diff < 2e-3 and w_diff < 1e-5 and "world 2" in out2
    figs = dict(losses_one=l1, losses_two=l2, max_loss_diff=loss_diff, max_weight_diff=w_diff)
    return Record(verdict(ok), f"nccl x2 vs 1 x update-freq 2: losses {fmt(loss_diff)}, weights {fmt(w_diff)}", figs)


# =====================================================================================================
# 6. the seed recipe's model: speed, MFU, memory, host syncs, kernels
# =====================================================================================================
def matmul_peak_tflops(device: torch.device, n: int, seconds: float = 1.0) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    it, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        it += 1
        if device.type == "cuda" and it % 10 == 0:
            torch.cuda.synchronize()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * it / (time.perf_counter() - t0) / 1e12


def peak_tflops(ctx: Ctx) -> tuple[float, str]:
    if ctx.cuda:
        name = torch.cuda.get_device_name(0)
        table = gpu_peak_tflops(name)
        if table:
            return table, f"{name} dense bf16 peak (table)"
        return matmul_peak_tflops(ctx.device, 8192, 2.0), f"measured 8192^3 bf16 matmul ({name} not in the table)"
    return matmul_peak_tflops(ctx.device, 1024, 1.0), "measured 1024^3 bf16 matmul on this CPU"


def check_recipe_speed(ctx: Ctx) -> Record:
    from torch.utils.flop_counter import FlopCounterMode

    r = ctx.recipe()
    t: Trainer = r["trainer"]
    p = ctx.plan
    T = p.recipe_T
    with tf32(None):
        with FlopCounterMode(display=False) as counter:  # one micro-batch, forward + backward + update
            out = ctx.recipe_step(ctx.recipe_samples(1))
        flops_per_token = counter.get_total_flops() / out["ntokens"]
        peak, peak_src = peak_tflops(ctx)
        figs: dict[str, Any] = dict(
            device=ctx.where,
            vocab=len(t.dictionary),
            tokens_per_sample=T,
            parameters=t.model.num_parameters(),
            dtype="bf16" if ctx.recipe_bf16 else "fp32",
            build_seconds=round(r["build_s"], 1),
            gflop_per_token=flops_per_token / 1e9,
            peak_tflops=peak,
            peak_source=peak_src,
        )
        losses = []
        for uf in (1, 3):
            for _ in range(2 if ctx.cuda else 0 if ctx.quick else 1):  # warm-up (allocator, cuBLAS/flash plans)
                ctx.recipe_step(ctx.recipe_samples(uf))
            groups = [ctx.recipe_samples(uf) for _ in range(p.recipe_updates)]
            if ctx.cuda:
                torch.cuda.reset_peak_memory_stats()
            ctx.sync()
            t0 = time.perf_counter()
            outs = [ctx.recipe_step(g) for g in groups]
            ctx.sync()
            secs = time.perf_counter() - t0
            tokens = sum(o["ntokens"] for o in outs)
            tps = tokens / secs
            losses += [o["loss"] for o in outs]
            figs[f"uf{uf}"] = dict(
                updates=len(outs),
                tokens=tokens,
                seconds=round(secs, 3),
                tokens_per_s=round(tps),
                s_per_update=round(secs / len(outs), 4),
                mfu=tps * flops_per_token / (peak * 1e12),
                peak_memory_gib=(round(torch.cuda.max_memory_allocated() / 2**30, 2) if ctx.cuda else None),
            )
    if not ctx.cuda:
        figs["process_peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    finite = all(math.isfinite(x) for x in losses)
    u1, u3 = figs["uf1"], figs["uf3"]
    mem = f", peak {u1['peak_memory_gib']} / {u3['peak_memory_gib']} GiB" if ctx.cuda else ""
    summary = (
        f"{ctx.where} V={len(t.dictionary):,} T={T} {figs['dtype']}: {u1['tokens_per_s']:,} / "
        f"{u3['tokens_per_s']:,} tok/s (uf 1 / 3), MFU {100 * u1['mfu']:.3g}% / {100 * u3['mfu']:.3g}%{mem}"
    )
    note = f"MFU against {peak_src} ({peak:.3g} TFLOP/s); FLOPs counted by FlopCounterMode (attention as full T x T)"
    return Record(verdict(finite), summary, figs, note if finite else "non-finite loss")


def count_syncs(ctx: Ctx, samples: list[dict[str, Any]]) -> tuple[int, Counter]:
    """Synchronising CUDA calls during one update, by Python source line (``set_sync_debug_mode("warn")``)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            ctx.recipe_step(samples)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    return len(syncs), Counter(f"{Path(w.filename).name}:{w.lineno}" for w in syncs)


def check_recipe_syncs(ctx: Ctx) -> Record:
    if not ctx.cuda:
        return skip(NO_CUDA + " (torch.cuda.set_sync_debug_mode)")
    with tf32(None):
        ctx.recipe_step(ctx.recipe_samples(1))  # warm
        n1, where1 = count_syncs(ctx, ctx.recipe_samples(1))
        n3, where3 = count_syncs(ctx, ctx.recipe_samples(3))
    per_micro = (n3 - n1) / 2
    per_update = n1 - per_micro
    figs = dict(
        update_freq_1=n1,
        update_freq_3=n3,
        per_micro_batch=per_micro,
        per_update=per_update,
        where_uf1=dict(where1),
        where_uf3=dict(where3),
    )
    ok = per_micro == 0 and per_update <= 1
    summary = f"{per_micro:g} per micro-batch, {per_update:g} per update (uf1: {n1}, uf3: {n3})"
    details = [f"host syncs in one update with update-freq 3, by source line: {dict(where3)}"] if n3 else []
    return Record(verdict(ok), summary, figs, "" if ok else "goal: 0 per micro-batch, 1 per update", details)


def device_time(e: Any) -> float:
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(e, attr):
            return float(getattr(e, attr))
    return 0.0


def check_recipe_profile(ctx: Ctx) -> Record:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    samples = ctx.recipe_samples(1)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.cuda else [])
    with tf32(None), contextlib.redirect_stdout(io.StringIO()), profile(activities=acts) as prof:
        ctx.recipe_step(samples)
        ctx.sync()
    events = prof.key_averages()
    ops = {e.key for e in events}
    if ctx.cuda:
        kernels = [e for e in events if getattr(e, "device_type", None) == DeviceType.CUDA and device_time(e) > 0]
        kernels = kernels or [e for e in events if device_time(e) > 0]
        timing = device_time
    else:
        kernels = [e for e in events if e.self_cpu_time_total > 0]
        timing = lambda e: float(e.self_cpu_time_total)  # noqa: E731
    total = sum(timing(e) for e in kernels) or 1.0
    top = sorted(kernels, key=timing, reverse=True)[:10]
    listing = [f"{100 * timing(e) / total:5.1f}%  {timing(e) / 1e3:8.2f} ms  x{e.count:<4d} {e.key[:110]}" for e in top]
    fused_ops = sorted(o for o in ops if o.startswith("aten::_scaled_dot_product_") and "math" not in o)
    math_path = sorted(o for o in ops if "_scaled_dot_product_attention_math" in o)
    names = ("flash", "fmha", "sdpa", "attention")
    attn_kernels = [e.key for e in kernels if any(s in e.key.lower() for s in names)] if ctx.cuda else []
    softmax_share = sum(timing(e) for e in kernels if "softmax" in e.key.lower()) / total
    figs = dict(
        device=ctx.where,
        top10=listing,
        fused_attention_ops=fused_ops,
        math_attention_ops=math_path,
        attention_kernels=attn_kernels[:6],
        softmax_share=softmax_share,
    )
    unit = "CUDA" if ctx.cuda else "CPU"
    details = [f"top {len(top)} {'kernels' if ctx.cuda else 'ops'} of one recipe step by self {unit} time:"]
    details += ["    " + x for x in listing]
    summary = (
        f"top: {top[0].key[:48] if top else '-'}; fused attention {bool(fused_ops or attn_kernels)}, "
        f"math path {bool(math_path)}, softmax {100 * softmax_share:.1f}%"
    )
    if not ctx.cuda:
        return Record(SKIP, summary, figs, NO_CUDA + " (CPU SDPA with dropout takes the math path)", details)
    ok = bool(fused_ops or attn_kernels) and not math_path and softmax_share < 0.25
    return Record(verdict(ok), summary, figs, "" if ok else "no fused attention kernel, or a T x T softmax", details)


# =====================================================================================================
# 7. evaluation, generation, scoring
# =====================================================================================================
def recipe_lm(ctx: Ctx) -> LanguageModel:
    r = ctx.recipe()
    t: Trainer = r["trainer"]
    return LanguageModel(t.model, t.dictionary, "recipe", ctx.plan.recipe_T)


def check_eval(ctx: Ctx) -> Record:
    lm = recipe_lm(ctx)
    data = ctx.recipe()["data"]
    C, T = ctx.plan.eval_context, ctx.plan.recipe_T
    figs: dict[str, Any] = dict(device=ctx.where, context_window=C, tokens_per_sample=T)
    with plain_kernels(True), tf32(False):
        for name, bf16 in (("fp32", False), ("bf16", True)):
            cfg = EvalConfig(
                data=str(data), gen_subset="valid", context_window=C, tokens_per_sample=T, bf16=bf16, progress=False
            )
            ctx.sync()
            res = evaluate(lm, cfg)
            ctx.sync()
            figs[name] = dict(
                tokens=res.n_tokens,
                loss_base2=res.loss_base2,
                seconds=round(res.seconds, 3),
                tokens_per_s=round(res.n_tokens / max(res.seconds, 1e-9)),
                plan=res.plan,
            )
    f32, b16 = figs["fp32"], figs["bf16"]
    figs["bf16_vs_fp32_loss_diff"] = abs(f32["loss_base2"] - b16["loss_base2"])
    ok = f32["tokens"] > 0 and f32["tokens"] == b16["tokens"] and math.isfinite(f32["loss_base2"])
    ok = ok and figs["bf16_vs_fp32_loss_diff"] < 0.05
    summary = (
        f"{ctx.where} recipe model, window {C}/{T}: {f32['tokens_per_s']:,} tok/s fp32, {b16['tokens_per_s']:,} bf16 "
        f"({f32['tokens']:,} tokens, loss diff {figs['bf16_vs_fp32_loss_diff']:.4f})"
    )
    return Record(verdict(ok), summary, figs, "fp32 without TF32")


def check_generate(ctx: Ctx) -> Record:
    lm = recipe_lm(ctx)
    model = lm.model
    N = ctx.plan.gen_tokens
    prompt = torch.tensor([5, 17, 9, 230, 41, 2])  # 5 words + </s>, as lm.encode gives
    L = len(prompt) - 1
    figs: dict[str, Any] = dict(device=ctx.where, new_tokens=N, prompt_tokens=L)
    hyps = {}
    with plain_kernels(True), tf32(False):
        for use_cache in (True, False):
            ctx.sync()
            t0 = time.perf_counter()
            out = lm.generate([prompt], beam=1, max_len_b=L + N, min_len=L + N, use_cache=use_cache)
            ctx.sync()
            secs = time.perf_counter() - t0
            hyp = out[0][0]
            n_gen = len(hyp["positional_scores"])
            hyps[use_cache] = hyp
            figs["cache" if use_cache else "no_cache"] = dict(
                tokens=n_gen, seconds=round(secs, 3), tokens_per_s=round(n_gen / secs, 1)
            )
        # the cached run's scores against one full forward over its own output (teacher forcing)
        hyp = hyps[True]
        toks = hyp["tokens"].to(lm.device)
        src = torch.cat([toks.new_tensor([lm.dictionary.eos()]), toks[:-1]])
        n_gen = len(hyp["positional_scores"])
        with torch.no_grad():
            full = model.target_log_probs(src[None], toks[None])[0, -n_gen:]
    diff = maxdiff(full, hyp["positional_scores"])
    same = torch.equal(hyps[True]["tokens"].cpu(), hyps[False]["tokens"].cpu())
    figs.update(cached_scores_vs_full_forward=diff, same_tokens_with_and_without_cache=same)
    c, nc = figs["cache"], figs["no_cache"]
    ok = diff <= 2e-3 and c["tokens"] == nc["tokens"] == N + 1
    summary = (
        f"{ctx.where} recipe model, {N} tokens greedy: {c['tokens_per_s']:,} tok/s cached, {nc['tokens_per_s']:,} "
        f"uncached ({c['tokens_per_s'] / max(nc['tokens_per_s'], 1e-9):.1f}x); cached scores vs full {fmt(diff)}"
    )
    note = "" if same else "greedy tokens differ with/without the cache (near-ties of a random model; scores checked)"
    return Record(
        verdict(ok), summary, figs, note if ok else f"cached scores differ from a full forward by {fmt(diff)}"
    )


def check_score(ctx: Ctx) -> Record:
    """n-best rescoring: ``adaptive_lm.inference.rescore.sentence_logprobs`` (length-sorted batches, target-only
    softmax)
    against ``lm.score`` (the hub's per-sentence scores): speed of both, and the same sums."""
    lm = recipe_lm(ctx)
    rng = np.random.default_rng(0)
    top = min(len(lm.dictionary), 5000)
    n_sent = 256 if ctx.cuda else 32
    lengths = rng.integers(5, 60 if ctx.cuda else 30, n_sent)
    sentences = [" ".join(lm.dictionary[int(i)] for i in rng.integers(4, top, n)) for n in lengths]
    rescore = _import("adaptive_lm.inference.rescore")
    figs: dict[str, Any] = dict(device=ctx.where, sentences=n_sent, rescore_module=rescore is not None)
    with plain_kernels(True), tf32(False):
        lm.score(sentences[:2])  # warm
        ctx.sync()
        t0 = time.perf_counter()
        scored = lm.score(sentences, batch_size=16)
        ctx.sync()
        secs = time.perf_counter() - t0
        hub = np.array([float(s["positional_scores"].double().sum()) for s in scored])
        tokens = sum(len(s["positional_scores"]) for s in scored)
        figs["lm_score"] = dict(tokens=tokens, seconds=round(secs, 3), tokens_per_s=round(tokens / secs))
        ok = bool(np.isfinite(hub).all())
        summary = f"{ctx.where} recipe model: lm.score {figs['lm_score']['tokens_per_s']:,} tok/s"
        note = "adaptive_lm.inference.rescore absent: lm.score only"
        if rescore is not None and hasattr(rescore, "sentence_logprobs"):
            ids = rescore.encode_hypotheses(lm, sentences)
            ctx.sync()
            t0 = time.perf_counter()
            lp = rescore.sentence_logprobs(lm, ids)
            ctx.sync()
            secs = time.perf_counter() - t0
            diff = float(np.abs(np.asarray(lp, dtype=np.float64) - hub).max())
            figs["rescore"] = dict(tokens=tokens, seconds=round(secs, 3), tokens_per_s=round(tokens / secs),
                                   max_abs_diff_vs_lm_score=diff)  # fmt: skip
            ok = ok and diff <= 1e-3
            summary += f", rescore {figs['rescore']['tokens_per_s']:,} tok/s (sums vs lm.score {fmt(diff)})"
            note = "" if ok else f"rescore sums differ from lm.score by {fmt(diff)}"
        elif rescore is not None:
            note = "adaptive_lm.inference.rescore has no sentence_logprobs: lm.score only"
    return Record(verdict(ok), summary + f"; {n_sent} sentences", figs, note)


def _import(name: str) -> Any:
    """The module, or None if it does not exist (optional parts of the package)."""
    import importlib
    import importlib.util

    return importlib.import_module(name) if importlib.util.find_spec(name) is not None else None


def check_fixture(ctx: Ctx) -> Record:
    if not (FIXTURE / "model" / "checkpoint_best.pt").is_file():
        return skip(f"{FIXTURE} absent (the shared fairseq fixture)")
    if ctx.quick and not ctx.cuda:
        return skip("--quick: 2 x 217,646 tokens on a CPU; run without --quick for the fixture's perplexity")
    lm = adaptive_lm.from_pretrained(FIXTURE / "model" / "checkpoint_best.pt", device=ctx.device)
    figs: dict[str, Any] = dict(device=ctx.where)
    bad = []
    with plain_kernels(True), tf32(False):
        for C, (n, loss, ppl) in FIXTURE_EVAL.items():
            cfg = EvalConfig(
                data=str(FIXTURE / "data-bin"),
                gen_subset="valid",
                context_window=C,
                tokens_per_sample=256,
                progress=False,
            )
            res = evaluate(lm, cfg)
            figs[f"cw{C}"] = dict(
                tokens=res.n_tokens,
                loss_base2=res.loss_base2,
                ppl=res.ppl,
                fairseq_loss=loss,
                fairseq_ppl=ppl,
                tokens_per_s=round(res.n_tokens / max(res.seconds, 1e-9)),
            )
            if res.n_tokens != n or abs(res.loss_base2 - loss) > 1e-3:
                bad.append(f"cw {C}: {res.n_tokens} tokens, loss {res.loss_base2:.4f} (fairseq {n}, {loss})")
    a, b = figs["cw0"], figs["cw128"]
    summary = (
        f"{ctx.where}: cw0 loss {a['loss_base2']:.4f} ppl {a['ppl']:.2f}, cw128 {b['loss_base2']:.4f} / "
        f"{b['ppl']:.2f} (fairseq 8.3184 / 319.22, 8.3131 / 318.04), {a['tokens']:,} tokens"
    )
    return Record(verdict(not bad), summary, figs, "; ".join(bad))


# =====================================================================================================
# the runner
# =====================================================================================================
CHECKS: list[tuple[str, str, Callable[[Ctx], Record]]] = [
    ("env", "env: machine", check_machine),
    ("env", "env: GPU, attention kernels, bf16", check_gpu_features),
    ("kernels", "kernels: attention fp32 (device vs CPU, fp64)", check_attention),
    ("kernels", "kernels: cross_entropy_sum value + grads", check_cross_entropy),
    ("kernels", "kernels: dropout reseeding + kept fraction", check_dropout),
    ("model", "model: 2 layers fp64, device vs CPU", check_model_fp64),
    ("trainer", "trainer: fp32", check_train_fp32),
    ("trainer", "trainer: bf16", check_train_bf16),
    ("trainer", "trainer: fp16 (loss scaling)", check_train_fp16),
    ("trainer", "trainer: 8 updates == 4 + resume", check_resume),
    ("trainer", "trainer: compile vs eager", check_compile),
    ("distributed", "distributed: world-1 group (subprocess)", check_world1_group),
    ("distributed", "distributed: 2 processes vs update-freq 2", check_two_processes),
    ("recipe", "recipe: tokens/s, MFU, memory", check_recipe_speed),
    ("recipe", "recipe: host syncs per step", check_recipe_syncs),
    ("recipe", "recipe: top kernels of one step", check_recipe_profile),
    ("eval", "eval: tokens/s with a context window", check_eval),
    ("eval", "generate: tokens/s with/without cache", check_generate),
    ("eval", "rescore: tokens/s (n-best scoring)", check_score),
    ("eval", "fixture: fairseq eval-lm perplexity", check_fixture),
]


def run_checks(ctx: Ctx, only: set[str] | None) -> list[Record]:
    groups = {c[0] for c in CHECKS}
    names = [o for o in only or () if o not in groups]  # anything else selects by a part of the check's name
    selected = [c for c in CHECKS if not only or c[0] in only or any(o in c[1] for o in names)]
    records = []
    for i, (group, name, fn) in enumerate(selected, 1):
        t0 = time.perf_counter()
        try:
            rec = fn(ctx)
        except Exception as e:  # noqa: BLE001 - an exception is this check's FAIL, the others still run
            tb = traceback.format_exc().strip().splitlines()
            rec = Record(
                FAIL,
                f"{type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''}",
                {"traceback": tb[-25:]},
                f"{type(e).__name__}: {e}"[:500],
                details=tb[-8:],
            )
        rec.name, rec.group, rec.seconds = name, group, time.perf_counter() - t0
        records.append(rec)
        print(f"[{i:2d}/{len(selected)}] {rec.status}  {name}  ({rec.seconds:.1f} s)", file=sys.stderr, flush=True)
    return records


def table(records: list[Record], width: int) -> str:
    """An aligned text table; long results wrap inside their column."""
    rows = [("#", "check", "status", "s", "result")]
    rows += [(str(i), r.name, r.status, f"{r.seconds:.1f}", r.summary) for i, r in enumerate(records, 1)]
    w = [max(len(row[c]) for row in rows) for c in range(4)]
    room = max(40, width - sum(w) - 4 * 3)
    blank = " | ".join(" " * x for x in w)
    out = []
    for j, row in enumerate(rows):
        lines = textwrap.wrap(row[4], room, break_on_hyphens=False) or [""]
        cells = [row[0].rjust(w[0]), row[1].ljust(w[1]), row[2].ljust(w[2]), row[3].rjust(w[3])]
        out.append(" | ".join([*cells, lines[0]]))
        out += [f"{blank} | {x}" for x in lines[1:]]
        if j == 0:
            out.append("-+-".join("-" * x for x in w) + "-+-" + "-" * room)
    return "\n".join(out)


def report(records: list[Record], ctx: Ctx, seconds: float) -> str:
    lines = [table(records, shutil.get_terminal_size((160, 24)).columns)]
    notes = [(i, r) for i, r in enumerate(records, 1) if r.note]
    if notes:
        lines += ["", "notes:"] + [f"  {i:2d}. {r.status}: {r.note}" for i, r in notes]
    for i, r in enumerate(records, 1):
        if r.details:
            lines += ["", f"{i}. {r.name}:"] + [f"  {x}" for x in r.details]
    counts = Counter(r.status for r in records)
    lines += [
        "",
        f"{counts[PASS]} PASS, {counts[FAIL]} FAIL, {counts[SKIP]} SKIP in {seconds:.0f} s ({ctx.mode} mode, "
        f"device {ctx.where})",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--dry-run", action="store_true", help="run on the CPU with the plain kernels (automatic without CUDA)"
    )
    ap.add_argument("--quick", action="store_true", help="the smallest sizes (CI: tests/test_gpu_check.py)")
    ap.add_argument(
        "--out",
        default=None,
        help="JSON output (default: benchmarks/results/gpu_check.json, or "
        "gpu_check_dry.json for a dry run, so that it never overwrites a GPU result)",
    )
    ap.add_argument(
        "--only",
        default="",
        help="comma-separated groups (env, kernels, model, trainer, distributed, recipe, eval) or parts of check names",
    )
    ap.add_argument(
        "--workdir", default=None, help="where generated data and checkpoints go (kept); default: a temp dir"
    )
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--verbose", action="store_true", help="show the trainer's console output")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child == "dist":
        return dist_child(args)
    ctx = Ctx(args)
    out = (
        Path(args.out)
        if args.out
        else REPO / "benchmarks" / "results" / ("gpu_check.json" if ctx.cuda else "gpu_check_dry.json")
    )
    why = "" if ctx.cuda else (" (--dry-run)" if args.dry_run and torch.cuda.is_available() else " (no CUDA device)")
    print(f"adaptive-lm GPU check: {ctx.mode} mode{why}, device {ctx.where}, work dir {ctx.work}", file=sys.stderr)
    t0 = time.perf_counter()
    only = {x.strip() for x in args.only.split(",") if x.strip()} or None
    try:
        records = run_checks(ctx, only)
    finally:
        if not ctx.keep:
            shutil.rmtree(ctx.work, ignore_errors=True)
    seconds = time.perf_counter() - t0
    print(report(records, ctx, seconds))
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = dict(
        mode=ctx.mode,
        device=ctx.where,
        machine=hardware.describe(),
        torch=torch.__version__,
        seconds=round(seconds, 1),
        counts=dict(Counter(r.status for r in records)),
        records=[asdict(r) for r in records],
    )
    out.write_text(json.dumps(doc, indent=2, default=str))
    print(f"wrote {out}")
    return 1 if any(r.status == FAIL for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
