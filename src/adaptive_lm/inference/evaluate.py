"""``adaptive-lm eval``: fairseq-eval-lm's perplexity, with its context-window semantics (``fairseq_cli/eval_lm.py``,
``fairseq/data/lm_context_window_dataset.py``).

With ``--context-window C`` the split is cut into blocks of ``tokens_per_sample - C`` new tokens; every block is
fed with up to ``C`` tokens of the preceding text in front (taken, as in ``LMContextWindowDataset``, from the
inputs of the blocks before it) and only its own tokens are scored, so every token is scored exactly once.
Scores go through the adaptive softmax's target-only path in chunks of ``--softmax-batch`` positions, so the
V-way distribution never exists for a whole batch. Loss is the mean natural-log NLL over all scored tokens
(``</s>`` included), reported in base 2, perplexity = 2^loss. With ``add_bos_token`` models every block starts
with ``<s>`` and the score of that ``<s>`` is dropped, as eval-lm does.

``scored_batches`` is the loop itself, yielding per batch what was scored (and, on request, the features at the
scored positions): the kNN-LM datastore (``knn.py``) walks the same blocks through it.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from adaptive_lm.core.data import DATASET_IMPLS, LMDataset, load_split, ordered_indices
from adaptive_lm.core.dictionary import Dictionary
from adaptive_lm.core.errors import UserError
from adaptive_lm.core.kernels import fast_linears
from adaptive_lm.core.metrics import perplexity
from adaptive_lm.core.options import opt
from adaptive_lm.core.progress import Progress
from adaptive_lm.inference.hub import LanguageModel

DEFAULT_TOKENS_CPU, DEFAULT_TOKENS_GPU = 8192, 98_304


@dataclass
class EvalConfig:
    """How a split is scored (``adaptive-lm eval``'s flags; ``knn-store`` walks a split with the same ones)."""

    data: str = opt("", "binarised data folder (with the model's dict.txt)", kind="existing_dir", positional=True)
    gen_subset: str = opt("test", "split to score")
    context_window: int = opt(0, "tokens of earlier text in front of each block", kind="nonneg")
    tokens_per_sample: int | None = opt(None, "block size (default: the model's training value)", kind="positive")
    dataset_impl: str | None = opt(None, "fairseq's index format (mmap, lazy, cached), or raw: the split is a text "
                                   "file named as the split (data/valid), encoded as it is read; default: read from "
                                   "the files", choices=list(DATASET_IMPLS))  # fmt: skip
    sample_break_mode: str = opt("none", "how the split is cut into blocks (none: fixed-size blocks across lines)",
                                 choices=["none", "complete", "complete_doc", "eos"])  # fmt: skip
    max_tokens: int | None = opt(None, f"tokens per batch (default: {DEFAULT_TOKENS_CPU} on CPU, {DEFAULT_TOKENS_GPU} "
                                 "on a GPU)", kind="positive")  # fmt: skip
    batch_size: int | None = opt(None, "blocks per batch", flags=("--max-sentences",), kind="positive")
    softmax_batch: int = opt(0, "positions per softmax chunk (0: automatic, memory-bounded)", kind="nonneg")
    bf16: bool = opt(False, "bfloat16 autocast (fp32 weights)")
    fp16: bool = opt(False, "float16 autocast (fp32 weights)")
    full_blocks_only: bool = opt(False, "score only blocks of the full block size (knnlm's datastores do this)")
    progress: bool = opt(True, "no progress output (a bar on a terminal, a line per 10% in logs)",
                         flags=("--no-progress-bar",))  # fmt: skip


@dataclass
class EvalPlan:
    """How a split is cut and batched: what ``evaluate`` logs before it starts."""

    dataset: LMDataset
    split: str
    block: int  # new (scored) tokens per block
    tokens_per_sample: int
    context: int
    rows: int  # blocks per batch
    n_tokens: int  # tokens to score
    skipped: int = 0  # blocks longer than the model's positions, left out as fairseq-eval-lm leaves them out
    limit: int = 0  # the model's positions
    break_mode: str = "none"
    ids: np.ndarray | None = None  # each block's index in the split (fairseq's sample id), before any is left out
    visit: np.ndarray | None = None  # the blocks (positions in ``dataset``) in the order fairseq-eval-lm visits them
    files: str = ""  # the split's data file (its .bin, or the text of --dataset-impl raw), for messages

    def describe(self) -> str:
        line = (
            f"{self.split}: {len(self.dataset)} blocks of {self.block} new tokens, context window {self.context} "
            f"(tokens per sample {self.tokens_per_sample}), {self.n_tokens} tokens to score, "
            f"{self.rows} blocks per batch"
        )
        if self.skipped:
            line += (
                f"; warning: {self.skipped} blocks longer than the model's {self.limit} positions are skipped, as "
                f"fairseq-eval-lm skips them; {self.remedy()} scores them all"
            )
        return line

    def remedy(self) -> str:
        if self.break_mode == "none":
            return f"--tokens-per-sample {self.limit} or less"
        return f"--sample-break-mode none (it cuts long lines into blocks; {self.break_mode} keeps them whole)"


@dataclass
class ScoredBatch:
    targets: np.ndarray  # (N,) int64 ids of the scored tokens, stream order
    logprobs: np.ndarray  # (N,) float64 ln p(target)
    block_lengths: list[int]  # scored tokens per block of this batch
    features: torch.Tensor | None = None  # (N, k) what ``feature_fn`` returned at the scored positions


@dataclass
class EvalResult:
    n_tokens: int
    loss_base2: float
    ppl: float
    seconds: float
    n_blocks: int
    block_size: int
    plan: str = ""
    n_unk: int = 0  # scored tokens that are <unk>
    scores: np.ndarray | None = None  # per scored token (ln p), stream order
    targets: np.ndarray | None = None
    block_lengths: list[int] = field(default_factory=list)
    block_ids: np.ndarray | None = None  # with the scores: each block's index in the split (fairseq's sample id)
    block_order: np.ndarray | None = None  # the blocks (positions) in the order fairseq-eval-lm visits them
    n_fed: int = 0  # tokens of the blocks with their <s>: what fairseq-eval-lm's "Evaluated N tokens" counts


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


def check_dictionary(lm: LanguageModel, data: Path) -> None:
    """Scores of data binarised with another dictionary are meaningless (fairseq#2124): refuse, naming the first
    difference."""
    if not (data / "dict.txt").is_file():  # fairseq-eval-lm reads the data's own dictionary too
        raise UserError(
            f"{data}: no dict.txt beside the split (preprocess writes the data's dictionary there; --dict names "
            f"the model's): copy the dictionary the data was binarised (or, for raw text, is read) with into {data}"
        )
    d = Dictionary.load(data / "dict.txt")
    how = d.diff(lm.dictionary)  # this file's side first, as the message reads
    if how is not None:
        raise UserError(
            f"{data / 'dict.txt'} differs from the model's dictionary ({how}; the data's first); binarise the text "
            "with the model's dict.txt (preprocess --srcdict) or the perplexity is meaningless"
        )


def plan(lm: LanguageModel, cfg: EvalConfig) -> EvalPlan:
    """Blocks and batch size for ``cfg``; refuses a window that leaves no new tokens per block."""
    data = Path(cfg.data)
    if cfg.bf16 and cfg.fp16:
        raise UserError("--bf16 and --fp16 together: choose one autocast type")
    tps = cfg.tokens_per_sample or lm.tokens_per_sample or lm.cfg.max_target_positions
    C = cfg.context_window
    if C < 0 or (C > 0 and tps <= C):
        raise UserError(
            f"--context-window {C} must be smaller than --tokens-per-sample {tps} (the block is tokens-per-sample "
            f"minus the window); e.g. --tokens-per-sample {tps} --context-window {max(0, tps // 2)}"
        )
    block = tps - C
    # the split's largest id checked against the model's vocabulary: a .bin made with a larger dictionary (its dict.txt
    # replaced by the model's) failed inside the model with a traceback
    split = load_split(data, cfg.gen_subset, len(lm.dictionary), cfg.dataset_impl, dictionary=lm.dictionary)
    ds = LMDataset.from_split(split, block, cfg.sample_break_mode, add_bos=lm.cfg.add_bos_token)
    ids, split_sizes = np.arange(len(ds)), ds.sizes
    if cfg.full_blocks_only:
        ids, ds = ids[ds.sizes == block], ds.subset(ds.sizes == block)
    limit = lm.cfg.max_target_positions  # fairseq's model.max_positions(), whatever the positions' kind
    long = ds.sizes > limit  # eval-lm's batches have ignore_invalid_inputs: such blocks are skipped, with a warning
    skipped = int(long.sum())
    if skipped:
        ids, ds = ids[~long], ds.subset(~long)
    # the widest input: a block after as much context as fits in block + C (context_windows), and <s>
    sizes = ds.sizes
    width = int((sizes + np.clip(block + C - sizes, 0, C)).max(initial=0)) + int(lm.cfg.add_bos_token)
    if lm.cfg.decoder_learned_pos and not lm.cfg.no_token_positional_embeddings and width > limit:
        fit = limit - int(lm.cfg.add_bos_token)
        whole = int((sizes > fit).sum())  # blocks too long alone: whole lines, whatever --tokens-per-sample
        if whole and cfg.sample_break_mode != "none":
            raise UserError(
                f"--sample-break-mode {cfg.sample_break_mode} keeps {whole} line(s) whole that, with <s>, take more "
                f"than the model's {limit} learned positions (fairseq fails with an IndexError): pass "
                f"--sample-break-mode none (it cuts lines into blocks) with --tokens-per-sample {fit} or less"
            )
        raise UserError(
            f"--tokens-per-sample {tps}{f' with --context-window {C}' if C else ''} gives inputs of {width} "
            f"positions, more than the model's {limit} learned ones (fairseq fails with an IndexError): pass "
            f"--tokens-per-sample {fit} or less"
        )
    if cfg.batch_size:
        rows = cfg.batch_size
    else:  # default: 8K tokens on a CPU (cache-sized), 96K on a GPU (one 3,072-token block would idle it)
        tokens = cfg.max_tokens or (DEFAULT_TOKENS_GPU if lm.device.type == "cuda" else DEFAULT_TOKENS_CPU)
        rows = max(1, tokens // max(1, width))
    n = int(ds.sizes.sum())
    visit = fairseq_visit_order(split_sizes, ids, C)
    data_file = split.prefix if getattr(split, "impl", None) == "raw" else f"{split.prefix}.bin"
    return EvalPlan(ds, cfg.gen_subset, block, tps, C, rows, n, skipped, limit, cfg.sample_break_mode, ids, visit,
                    data_file)  # fmt: skip


def fairseq_visit_order(split_sizes: np.ndarray, ids: np.ndarray, context: int) -> np.ndarray:
    """Positions in ``ids`` (the blocks kept, ascending) in the order fairseq-eval-lm's batches visit them: with a
    context window the split's order (LMContextWindowDataset); without one MonolingualDataset's order (shuffled with
    numpy's seed 2, then sorted by size) over the whole split, before blocks are left out. (fairseq-fixed 0.12.3's
    get_batch_iterator orders under ``numpy_seed(seed + epoch)``: its default seed 1 and epoch 1.)"""
    if context > 0:
        return np.arange(len(ids))
    order = ordered_indices(split_sizes, shuffle=True, seed=2)
    return np.searchsorted(ids, order[np.isin(order, ids)])


def nonempty(p: EvalPlan) -> EvalPlan:
    """A plan with tokens to score: an empty split (or ``--full-blocks-only`` on one shorter than a block) would
    otherwise report perplexity 1.00."""
    if p.n_tokens == 0 and p.skipped:
        raise UserError(
            f"{p.split}: no tokens to score: all {p.skipped} blocks are longer than the model's {p.limit} positions "
            f"(fairseq-eval-lm skips them); pass {p.remedy()}"
        )
    if p.n_tokens == 0:
        raise UserError(
            f"{p.split}: no tokens to score (an empty split, or --full-blocks-only with no block of {p.block} tokens)"
            + (f" in {p.files}" if p.files else "")
        )
    return p


def scored_batches(
    lm: LanguageModel,
    cfg: EvalConfig,
    p: EvalPlan,
    feature_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    start_block: int = 0,
) -> Iterator[ScoredBatch]:
    """Run the blocks of ``p`` (from ``start_block``) through the model, ``p.rows`` at a time, and yield the scores
    of the scored positions. The model computes its last layer only from the first scored position of the batch on
    (``keep_from``: the context before it needs no output). ``feature_fn(src)`` (B, W') -> (B, W', k), called with
    those last W' positions of the batch inside the same forward context after the model ran, supplies their
    features to keep (kNN-LM keys: the last layer's or the model's own, so computed for exactly those positions)."""
    model = lm.model.eval()
    device = lm.device
    amp = torch.bfloat16 if cfg.bf16 else torch.float16 if cfg.fp16 else None
    ctx = torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext()
    pad = lm.dictionary.pad()
    skip_bos = lm.cfg.add_bos_token
    windows = context_windows(p.dataset, p.context, p.block)
    for _ in range(start_block):
        next(windows)
    with torch.no_grad(), ctx, fast_linears(device, packed=True):
        while True:
            chunk = [w for _, w in zip(range(p.rows), windows)]
            if not chunk:
                break
            W = max(len(x) for x, _, _ in chunk)
            src = np.full((len(chunk), W), pad, dtype=np.int64)
            tgt = np.full((len(chunk), W), pad, dtype=np.int64)
            lengths = []
            keep = W  # the first scored position of any row: the context before it needs no output
            for r, (x, t, s) in enumerate(chunk):
                src[r, : len(x)] = x
                first = s + int(skip_bos)  # eval-lm drops the score of the leading <s>
                tgt[r, first : s + len(t)] = t[int(skip_bos) :]
                lengths.append(len(t) - int(skip_bos))
                keep = min(keep, first)
            # CPU only: measured there (a quarter of a 2-layer model's work at a window of half the block); on a GPU
            # the masked attention of the kept queries would leave the causal flash kernel, unmeasured here. And at
            # least two kept positions, so that the attention stays the full forward's kernel (one query would take
            # the decoding step's path, whose softmax runs in bf16 under autocast)
            keep = keep if device.type == "cpu" and keep <= W - 2 else 0
            src_t, tgt_t = torch.from_numpy(src).to(device), torch.from_numpy(tgt[:, keep:]).to(device)
            feats = model(src_t, keep_from=keep)  # (B, W - keep, d)
            mask = tgt_t != pad
            rows_f, rows_t = feats[mask], tgt_t[mask]  # (N, d), (N,): only scored positions
            step = max(1, cfg.softmax_batch if cfg.softmax_batch > 0 else len(rows_t))
            parts = [
                model.target_log_probs_from_features(rows_f[i : i + step], rows_t[i : i + step])
                for i in range(0, len(rows_t), step)
            ]
            lp = torch.cat(parts) if parts else rows_f.new_zeros(0)
            keys = feature_fn(src_t[:, keep:])[mask] if feature_fn is not None else None
            yield ScoredBatch(rows_t.cpu().numpy(), lp.double().cpu().numpy(), lengths, keys)


def evaluate(
    lm: LanguageModel, cfg: EvalConfig, dictionary_check: bool = True, keep_scores: bool = False
) -> EvalResult:
    """Score a binarised split the way fairseq-eval-lm does; returns N, loss (base 2), perplexity and (with
    ``keep_scores``) every token's score in stream order."""
    if dictionary_check:
        check_dictionary(lm, Path(cfg.data))
    p = nonempty(plan(lm, cfg))
    score_sum, count, n_unk = 0.0, 0, 0
    unk = lm.dictionary.unk()
    scores: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    lengths: list[int] = []
    t0 = time.time()
    with Progress(len(p.dataset), f"eval {cfg.gen_subset}", cfg.progress, unit="blocks") as bar:
        for b in scored_batches(lm, cfg, p):
            finite = np.isfinite(b.logprobs)  # eval-lm skips tokens whose score is +-inf
            score_sum += float(b.logprobs[finite].sum())
            count += int(finite.sum())
            n_unk += int((b.targets == unk).sum())
            if keep_scores:
                scores.append(b.logprobs)
                targets.append(b.targets)
                lengths += b.block_lengths
            bar.update(len(b.block_lengths))
    seconds = time.time() - t0
    loss = -score_sum / max(count, 1) / math.log(2)
    res = EvalResult(count, loss, perplexity(loss), seconds, len(p.dataset), p.block, p.describe(), n_unk)
    res.n_fed = p.n_tokens + len(p.dataset) * int(lm.cfg.add_bos_token)
    if keep_scores:
        res.scores = np.concatenate(scores) if scores else np.zeros(0)
        res.targets = np.concatenate(targets) if targets else np.zeros(0, dtype=np.int64)
        res.block_lengths, res.block_ids, res.block_order = lengths, p.ids, p.visit
    return res


def summary_lines(res: EvalResult) -> list[str]:
    """fairseq-eval-lm's two closing lines: the tokens fed (with each block's <s>, as fairseq counts them), then the
    loss over the scored tokens."""
    fed = res.n_fed or res.n_tokens
    rate = fed / res.seconds if res.seconds > 0 else 0.0
    return [
        f"Evaluated {fed:,} tokens in {res.seconds:.1f}s ({rate:.2f} tokens/s)",
        f"Loss (base 2): {res.loss_base2:.4f}, Perplexity: {res.ppl:.2f}",
    ]


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
