"""``adaptive-lm eval``: fairseq-eval-lm's perplexity, with its context-window semantics (reference section 8).

With ``--context-window C`` the split is cut into blocks of ``tokens_per_sample - C`` new tokens; every block is
fed with up to ``C`` tokens of the preceding text in front (taken, as in ``LMContextWindowDataset``, from the
inputs of the blocks before it) and only its own tokens are scored, so every token is scored exactly once.
Scores go through the adaptive softmax's target-only path in chunks of ``--softmax-batch`` positions, so the
V-way distribution never exists for a whole batch. Loss is the mean natural-log NLL over all scored tokens
(``</s>`` included), reported in base 2, perplexity = 2^loss.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm  # noqa: E402

from .data import LMDataset, load_split
from .dictionary import Dictionary
from .errors import UserError
from .hub import LanguageModel


@dataclass
class EvalConfig:
    data: str = ""
    gen_subset: str = "test"
    context_window: int = 0
    tokens_per_sample: int | None = None  # None: the model's training value
    sample_break_mode: str = "none"
    max_tokens: int | None = None
    batch_size: int | None = None
    softmax_batch: int = 0
    output_word_probs: bool = False
    output_word_stats: bool = False
    freq_bins: bool = False
    plot: str | None = None
    bf16: bool = False
    fp16: bool = False
    log: list[str] = field(default_factory=list)


@dataclass
class EvalResult:
    n_tokens: int
    loss_base2: float
    ppl: float
    seconds: float
    n_blocks: int
    block_size: int
    scores: np.ndarray | None = None  # per scored token (ln p), stream order
    targets: np.ndarray | None = None


def context_windows(ds: LMDataset, context: int, block: int) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """(input, target, start) per block in order: ``input`` = up to ``context`` earlier input tokens + the block's
    source; ``target`` = the block's tokens; the first ``start`` positions are context and are not scored."""
    prev = np.zeros(0, dtype=np.int64)
    width_limit = block + context  # fairseq's tokens_per_sample + context_window
    for i in range(len(ds)):
        src, tgt = ds.item(i)
        extra = len(prev) + len(src) - width_limit
        if extra > 0:
            prev = prev[extra:]
        inp = np.concatenate([prev, src])
        yield inp, tgt, len(prev)
        prev = inp[-context:] if context > 0 else prev[:0]


def evaluate(
    lm: LanguageModel, cfg: EvalConfig, dictionary_check: bool = True, keep_scores: bool = False
) -> EvalResult:
    """Score a binarised split the way fairseq-eval-lm does; returns N, loss (base 2) and perplexity."""
    data = Path(cfg.data)
    if dictionary_check:
        d = Dictionary.load(data / "dict.txt")
        how = lm.dictionary.diff(d)
        if how is not None:
            raise UserError(
                f"{data / 'dict.txt'} differs from the model's dictionary ({how}); binarise the text with the "
                f"model's dict.txt (preprocess --srcdict) or the perplexity is meaningless"
            )
    tps = cfg.tokens_per_sample or lm.tokens_per_sample or lm.cfg.max_target_positions
    C = cfg.context_window
    if C < 0 or (C > 0 and tps <= C):
        raise UserError(
            f"--context-window {C} must be smaller than --tokens-per-sample {tps} (the block is tokens-per-sample "
            f"minus the window); e.g. --tokens-per-sample {tps} --context-window {max(0, tps // 2)}"
        )
    block = tps - C
    ds = LMDataset.from_split(load_split(data, cfg.gen_subset), block, cfg.sample_break_mode)
    width = int(ds.sizes.max(initial=0)) + C
    if cfg.batch_size:
        rows = cfg.batch_size
    elif cfg.max_tokens:
        rows = max(1, cfg.max_tokens // max(1, width))
    else:
        rows = max(1, 8192 // max(1, width))
    cfg.log.append(
        f"{cfg.gen_subset}: {len(ds)} blocks of {block} new tokens, context window {C} "
        f"(tokens per sample {tps}), {int(ds.sizes.sum())} tokens to score, {rows} blocks per batch"
    )
    model = lm.model.eval()
    device = lm.device
    amp = torch.bfloat16 if cfg.bf16 else torch.float16 if cfg.fp16 else None
    ctx = torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext()
    pad = lm.dictionary.pad()
    score_sum, count = 0.0, 0
    all_scores: list[np.ndarray] = []
    all_targets: list[np.ndarray] = []
    t0 = time.time()
    windows = context_windows(ds, C, block)
    bar = tqdm(total=len(ds), desc=f"eval {cfg.gen_subset}", disable=not sys.stderr.isatty(), leave=False)
    with torch.no_grad(), ctx:
        while True:
            chunk = [w for _, w in zip(range(rows), windows)]
            if not chunk:
                break
            W = max(len(x) for x, _, _ in chunk)
            src = np.full((len(chunk), W), pad, dtype=np.int64)
            tgt = np.full((len(chunk), W), pad, dtype=np.int64)
            for r, (x, t, s) in enumerate(chunk):
                src[r, : len(x)] = x
                tgt[r, s : s + len(t)] = t
            src_t, tgt_t = torch.from_numpy(src).to(device), torch.from_numpy(tgt).to(device)
            feats = model(src_t)  # (B, W, d)
            mask = tgt_t != pad
            rows_f, rows_t = feats[mask], tgt_t[mask]  # (N, d), (N,): only scored positions
            step = cfg.softmax_batch if cfg.softmax_batch > 0 else len(rows_t)
            lp = (
                torch.cat(
                    [
                        model.target_log_probs_from_features(rows_f[i : i + step], rows_t[i : i + step])
                        for i in range(0, len(rows_t), max(1, step))
                    ]
                )
                if len(rows_t)
                else rows_f.new_zeros(0)
            )
            lp64 = lp.double().cpu().numpy()
            finite = np.isfinite(lp64)
            score_sum += float(lp64[finite].sum())
            count += int(finite.sum())
            if keep_scores or cfg.output_word_probs or cfg.output_word_stats or cfg.freq_bins:
                all_scores.append(lp64)
                all_targets.append(rows_t.cpu().numpy())
            if cfg.output_word_probs:
                off = 0
                for _, t, _ in chunk:
                    words = "\t".join(f"{lm.dictionary[int(w)]} [{s:2f}]" for w, s in zip(t, lp64[off : off + len(t)]))
                    cfg.log.append(words)
                    off += len(t)
            bar.update(len(chunk))
    bar.close()
    seconds = time.time() - t0
    loss = -score_sum / max(count, 1) / math.log(2)
    res = EvalResult(count, loss, 2**loss, seconds, len(ds), block)
    if all_scores:
        res.scores, res.targets = np.concatenate(all_scores), np.concatenate(all_targets)
    return res


def summary_lines(res: EvalResult) -> list[str]:
    """fairseq-eval-lm's two closing lines."""
    rate = res.n_tokens / res.seconds if res.seconds > 0 else 0.0
    return [
        f"Evaluated {res.n_tokens:,} tokens in {res.seconds:.1f}s ({rate:.2f} tokens/s)",
        f"Loss (base 2): {res.loss_base2:.4f}, Perplexity: {res.ppl:.2f}",
    ]


def word_stats(res: EvalResult, d: Dictionary, top: int = 50) -> list[str]:
    """Per word: count, mean log-prob (ln), sorted by count (fairseq's --output-word-stats, simplified)."""
    assert res.scores is not None and res.targets is not None
    ids, inv, counts = np.unique(res.targets, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=res.scores)
    order = np.argsort(-counts, kind="stable")[:top]
    return [f"{d[int(ids[i])]}\t{counts[i]}\t{sums[i]:.4f}\t{sums[i] / counts[i]:.4f}" for i in order]


def frequency_bins(res: EvalResult, lm: LanguageModel) -> list[tuple[str, int, float]]:
    """Average loss (base 2) per frequency band of the model's dictionary (ids are sorted by frequency): the
    adaptive bands, each split in log-spaced sub-bins, as in the paper's per-frequency analysis."""
    assert res.scores is not None and res.targets is not None
    V = len(lm.dictionary)
    edges = sorted({4, 100, 1000, 10_000, 100_000, *(lm.cfg.adaptive_softmax_cutoff or ()), V})
    edges = [e for e in edges if e <= V]
    out = []
    specials = res.targets < 4
    if specials.any():
        out.append(("specials (</s>, <unk>)", int(specials.sum()), float(-res.scores[specials].mean() / math.log(2))))
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (res.targets >= lo) & (res.targets < hi)
        if m.any():
            out.append((f"ids {lo}-{hi - 1}", int(m.sum()), float(-res.scores[m].mean() / math.log(2))))
    return out
