"""``adaptive-lm``: one console script, thin subcommands over importable functions.

Flag names are fairseq's wherever the meaning is the same, so published fairseq recipes run unchanged with
``fairseq-train`` replaced by ``adaptive-lm train``. Errors a user can fix print as one line, not a traceback.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import os
import platform
import sys
from typing import Any

from .config import ConfigError, ModelConfig
from .errors import UserError


class OneLineParser(argparse.ArgumentParser):
    """argparse with a one-line error (``adaptive-lm train: error: unrecognized arguments: --foo``)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _bool(s: str) -> bool:
    return s.lower() in ("1", "true", "yes", "on")


# ---- model flags, generated from ModelConfig (fairseq's names) -----------------------------------------------
def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (fairseq transformer_lm options; unset ones come from --arch)")
    for f in dataclasses.fields(ModelConfig):
        if f.name in ("vocab_size", "padding_idx"):
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            g.add_argument(flag, action="store_const", const=True, default=None)
        elif "tuple" in str(f.type):
            g.add_argument(flag, default=None, metavar="N,N")
        elif "float" in str(f.type):
            g.add_argument(flag, type=float, default=None)
        elif "int" in str(f.type):
            g.add_argument(flag, type=int, default=None)
        else:
            g.add_argument(flag, default=None)


def model_overrides(ns: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(ModelConfig):
        v = getattr(ns, f.name, None)
        if v is not None and f.name not in ("vocab_size", "padding_idx"):
            out[f.name] = v
    return out


# ---- train ---------------------------------------------------------------------------------------------------
def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="binarised data folder (dict.txt, train.bin/.idx, valid.bin/.idx)")
    p.add_argument("--task", default="language_modeling", choices=["language_modeling"])
    p.add_argument("--arch", "-a", default="transformer_lm")
    p.add_argument("--save-dir", default="checkpoints")
    p.add_argument("--criterion", default="adaptive_loss", choices=["adaptive_loss", "cross_entropy"])
    p.add_argument("--optimizer", default="nag", choices=["nag"])
    p.add_argument("--lr-scheduler", default="cosine", choices=["cosine"])
    p.add_argument(
        "--ddp-backend",
        default="legacy_ddp",
        choices=["legacy_ddp", "no_c10d", "c10d", "pytorch_ddp"],
        help="accepted for compatibility: gradients are always reduced the legacy_ddp way",
    )
    p.add_argument("--lr", default="0.25", help="peak learning rate (fairseq: --lr; before 2021 --max-lr)")
    p.add_argument("--max-lr", type=float, default=None, help="old name of the peak lr; then --lr is the floor")
    p.add_argument("--min-lr", type=float, default=None)
    p.add_argument("--stop-min-lr", type=float, default=-1.0)
    p.add_argument("--warmup-updates", type=int, default=0)
    p.add_argument("--warmup-init-lr", type=float, default=-1.0)
    p.add_argument("--lr-period-updates", type=float, default=-1)
    p.add_argument("--t-mult", type=float, default=1.0)
    p.add_argument("--lr-shrink", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.99)
    p.add_argument("--weight-decay", "--wd", type=float, default=0.0)
    p.add_argument("--clip-norm", type=float, default=0.0)
    p.add_argument("--update-freq", default="1")
    p.add_argument("--max-update", type=int, default=0)
    p.add_argument("--max-epoch", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--batch-size", "--max-sentences", type=int, default=None)
    p.add_argument("--max-tokens-valid", type=int, default=None)
    p.add_argument("--batch-size-valid", type=int, default=None)
    p.add_argument(
        "--required-batch-size-multiple",
        type=int,
        default=8,
        help="fairseq's batch rounding; like fairseq, a last batch whose size is not a multiple is dropped "
        "(pass 1 to keep every sample)",
    )
    p.add_argument("--tokens-per-sample", type=int, default=1024)
    p.add_argument("--sample-break-mode", default="none", choices=["none", "complete", "complete_doc", "eos"])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--valid-subset", default="valid")
    p.add_argument("--skip-invalid-size-inputs-valid-test", action="store_true")
    p.add_argument("--save-interval", type=int, default=1)
    p.add_argument("--save-interval-updates", type=int, default=0)
    p.add_argument("--keep-last-epochs", type=int, default=-1)
    p.add_argument("--keep-interval-updates", type=int, default=-1)
    p.add_argument("--no-epoch-checkpoints", action="store_true")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--restore-file", default="checkpoint_last.pt")
    p.add_argument("--reset-optimizer", action="store_true")
    p.add_argument("--reset-lr-scheduler", action="store_true")
    p.add_argument("--reset-dataloader", action="store_true")
    p.add_argument("--reset-meters", action="store_true")
    p.add_argument("--disable-validation", action="store_true")
    p.add_argument("--validate-interval", type=int, default=1)
    p.add_argument("--validate-interval-updates", type=int, default=0)
    p.add_argument("--patience", type=int, default=-1)
    p.add_argument("--log-interval", type=int, default=100)
    p.add_argument("--log-format", default="simple", choices=["simple", "json", "none", "tqdm"])
    p.add_argument("--no-progress-bar", action="store_true")
    p.add_argument("--tensorboard-logdir", default=None)
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--fp16", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (falls back with a warning)")
    p.add_argument("--num-workers", type=int, default=0, help="accepted; batches are built in-process")
    p.add_argument(
        "--tail-ignore-quirk",
        type=_bool,
        default=True,
        metavar="BOOL",
        help="reproduce fairseq's adaptive_loss ignore_index on tail targets (default true; see docs)",
    )
    p.add_argument("--stop-after-updates", type=int, default=0, help=argparse.SUPPRESS)
    add_model_args(p)


def train_config(ns: argparse.Namespace):
    from .train import TrainConfig

    lr_list = [float(x) for x in str(ns.lr).split(",")]
    if len(lr_list) != 1:
        raise UserError("--lr takes one value with the cosine schedule (fairseq rejects a list too)")
    lr, min_lr, stop_min_lr = lr_list[0], ns.min_lr, ns.stop_min_lr
    if ns.max_lr is not None:  # pre-2021 names: --max-lr peak, --lr floor, --min-lr stop threshold
        lr, min_lr, stop_min_lr = ns.max_lr, lr_list[0], (ns.min_lr if ns.min_lr is not None else stop_min_lr)
    update_freq = [int(x) for x in str(ns.update_freq).split(",")]
    overrides = model_overrides(ns)
    return TrainConfig(
        data=ns.data,
        save_dir=ns.save_dir,
        arch=ns.arch,
        model_overrides=overrides,
        max_update=ns.max_update,
        max_epoch=ns.max_epoch,
        lr=lr,
        momentum=ns.momentum,
        weight_decay=ns.weight_decay,
        min_lr=min_lr if min_lr is not None else 0.0,
        stop_min_lr=stop_min_lr,
        warmup_updates=ns.warmup_updates,
        warmup_init_lr=ns.warmup_init_lr,
        lr_period_updates=ns.lr_period_updates,
        t_mult=ns.t_mult,
        lr_shrink=ns.lr_shrink,
        clip_norm=ns.clip_norm,
        update_freq=update_freq[0],
        tail_ignore_quirk=ns.tail_ignore_quirk and ns.criterion == "adaptive_loss",
        max_tokens=ns.max_tokens,
        batch_size=ns.batch_size,
        tokens_per_sample=ns.tokens_per_sample,
        sample_break_mode=ns.sample_break_mode,
        seed=ns.seed,
        valid_subset=ns.valid_subset,
        max_tokens_valid=ns.max_tokens_valid,
        batch_size_valid=ns.batch_size_valid,
        required_batch_size_multiple=ns.required_batch_size_multiple,
        skip_invalid_size_inputs_valid_test=ns.skip_invalid_size_inputs_valid_test,
        save_interval=ns.save_interval,
        save_interval_updates=ns.save_interval_updates,
        keep_last_epochs=ns.keep_last_epochs,
        keep_interval_updates=ns.keep_interval_updates,
        no_epoch_checkpoints=ns.no_epoch_checkpoints,
        no_save=ns.no_save,
        restore_file=ns.restore_file,
        reset_optimizer=ns.reset_optimizer,
        reset_lr_scheduler=ns.reset_lr_scheduler,
        reset_dataloader=ns.reset_dataloader,
        reset_meters=ns.reset_meters,
        disable_validation=ns.disable_validation,
        validate_interval=ns.validate_interval,
        validate_interval_updates=ns.validate_interval_updates,
        patience=ns.patience,
        log_interval=ns.log_interval,
        log_format=ns.log_format,
        tensorboard_logdir=ns.tensorboard_logdir,
        progress_bar=not ns.no_progress_bar,
        cpu=ns.cpu,
        bf16=ns.bf16,
        fp16=ns.fp16,
        compile=ns.compile,
        num_workers=ns.num_workers,
        stop_after_updates=ns.stop_after_updates,
    )


def cmd_train(ns: argparse.Namespace) -> int:
    from .train import train

    if ns.max_tokens is None and ns.batch_size is None:
        raise UserError("give --max-tokens (as in the recipe) or --batch-size")
    train(train_config(ns))
    return 0


# ---- preprocess -------------------------------------------------------------------------------------------
def add_preprocess_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--only-source", action="store_true", help="accepted (language modelling is always source-only)")
    p.add_argument("--trainpref")
    p.add_argument("--validpref", help="comma-separated list allowed: valid, valid1, ...")
    p.add_argument("--testpref", help="comma-separated list allowed: test, test1, ...")
    p.add_argument("--destdir", default="data-bin")
    p.add_argument("--srcdict")
    p.add_argument("--thresholdsrc", type=int, default=0)
    p.add_argument("--nwordssrc", type=int, default=-1)
    p.add_argument("--padding-factor", type=int, default=8)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--dataset-impl", default="mmap")
    p.add_argument("--task", default="language_modeling", choices=["language_modeling"])
    p.add_argument("--no-progress-bar", action="store_true")


def cmd_preprocess(ns: argparse.Namespace) -> int:
    from .preprocess import PreprocessConfig, preprocess

    cfg = PreprocessConfig(
        trainpref=ns.trainpref,
        validpref=ns.validpref,
        testpref=ns.testpref,
        destdir=ns.destdir,
        srcdict=ns.srcdict,
        thresholdsrc=ns.thresholdsrc,
        nwordssrc=ns.nwordssrc,
        padding_factor=ns.padding_factor,
        workers=ns.workers,
        dataset_impl=ns.dataset_impl,
        progress=not ns.no_progress_bar,
    )
    preprocess(cfg)
    print("\n".join(cfg.log))
    return 0


# ---- quickstart ---------------------------------------------------------------------------------------------
def cmd_quickstart(ns: argparse.Namespace) -> int:
    from .quickstart import quickstart

    quickstart(ns.dir, ns.updates)
    return 0


# ---- eval / score / generate ------------------------------------------------------------------------------------
def _load(ns: argparse.Namespace):
    import torch

    from .hub import from_pretrained

    device = "cpu" if ns.cpu or not torch.cuda.is_available() else "cuda"
    return from_pretrained(ns.path, dictionary=getattr(ns, "dict", None), device=device)


def cmd_eval(ns: argparse.Namespace) -> int:
    from .evaluate import EvalConfig, evaluate, frequency_bins, summary_lines, word_stats

    lm = _load(ns)
    cfg = EvalConfig(
        data=ns.data,
        gen_subset=ns.gen_subset,
        context_window=ns.context_window,
        tokens_per_sample=ns.tokens_per_sample,
        sample_break_mode=ns.sample_break_mode,
        max_tokens=ns.max_tokens,
        batch_size=ns.batch_size,
        softmax_batch=ns.softmax_batch,
        output_word_probs=ns.output_word_probs,
        output_word_stats=ns.output_word_stats,
        freq_bins=ns.freq_bins or bool(ns.plot),
        plot=ns.plot,
        bf16=ns.bf16,
        fp16=ns.fp16,
    )
    print(f"model {ns.path}: {lm.model.num_parameters():,} parameters, vocabulary {len(lm.dictionary)}")
    res = evaluate(lm, cfg)
    for line in cfg.log:
        print(line)
    if ns.output_word_stats:
        print("word\tcount\tsum ln p\tmean ln p")
        print("\n".join(word_stats(res, lm.dictionary)))
    if cfg.freq_bins:
        bins = frequency_bins(res, lm)
        print("loss by frequency band (ids are sorted by training frequency):")
        for name, n, loss in bins:
            print(f"  {name:>24}: {n:>9,} tokens, loss (base 2) {loss:.4f}, ppl {2**loss:.2f}")
        if ns.plot:
            from .plots import plot_bins

            plot_bins(bins, ns.plot)
            print(f"wrote {ns.plot}")
    print("\n".join(summary_lines(res)))
    return 0


def cmd_score(ns: argparse.Namespace) -> int:
    import json
    import math

    lm = _load(ns)
    out = open(ns.output, "w", encoding="utf-8") if ns.output else sys.stdout
    try:
        with open(ns.file, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f]
    except FileNotFoundError:
        raise UserError(f"{ns.file}: file not found") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{ns.file}: not valid UTF-8 ({e.reason}); convert it to UTF-8") from None
    for b in range(0, len(lines), ns.batch_size):
        for line, r in zip(lines[b : b + ns.batch_size], lm.score(lines[b : b + ns.batch_size])):
            ps = r["positional_scores"].tolist()
            total = float(sum(ps))
            mean = total / len(ps) if ps else 0.0
            out.write(
                json.dumps(
                    {
                        "text": line,
                        "tokens": [lm.dictionary[i] for i in r["tokens"].tolist()],
                        "logprobs": [round(x, 6) for x in ps],
                        "sum": total,
                        "mean": mean,
                        "ppl": math.exp(-mean),
                    }
                )
                + "\n"
            )
    if out is not sys.stdout:
        out.close()
    return 0


def cmd_generate(ns: argparse.Namespace) -> int:
    lm = _load(ns)
    kw = dict(
        sampling=ns.sampling,
        sampling_topk=ns.sampling_topk,
        sampling_topp=ns.sampling_topp,
        temperature=ns.temperature,
        max_len_b=ns.max_len_b,
        min_len=ns.min_len,
        unkpen=ns.unkpen,
        nbest=ns.nbest,
        seed=ns.seed,
        no_repeat_ngram_size=ns.no_repeat_ngram_size,
        lenpen=ns.lenpen,
    )
    prompts = ns.prompt or []
    interactive = not prompts
    if interactive and sys.stdin.isatty():
        print("type a prompt per line (Ctrl-D to quit)", file=sys.stderr)
    source = prompts if prompts else (line.rstrip("\n") for line in sys.stdin)
    for prompt in source:
        hyps = lm.generate([lm.encode(prompt)], beam=ns.beam, **kw)[0]
        for h in hyps:
            print(
                lm.decode(h["tokens"]) if not ns.show_scores else f"{h['score']:.4f}\t{lm.decode(h['tokens'])}",
                flush=True,
            )
    return 0


def cmd_convert(ns: argparse.Namespace) -> int:
    from .convert import convert

    out = convert(ns.src, ns.dst, to=ns.to, dictionary=ns.dict)
    print(f"wrote {out}")
    return 0


def cmd_download(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from .pretrained import fetch

    folder = fetch(ns.model, Path(ns.dir) if ns.dir else None, ns.url)
    print(f"{ns.model}: {folder}")
    print(f"next: adaptive-lm eval {folder}/data-bin --path {folder}/model.pt --gen-subset test ...")
    return 0


def add_model_path(p: argparse.ArgumentParser) -> None:
    p.add_argument("--path", required=True, help="fairseq checkpoint, our checkpoint, or exported model folder")
    p.add_argument("--dict", default=None, help="dictionary (default: the model's own)")
    p.add_argument("--cpu", action="store_true")


def cmd_make_corpus(ns: argparse.Namespace) -> int:
    import math

    from .quickstart import make_corpus

    h = make_corpus(ns.out, ns.tokens, ns.vocab, ns.seed)
    print(
        f"wrote {ns.out}/{{train,valid,test}}.txt; entropy rate {h:.4f} nats/token, "
        f"best possible perplexity {math.exp(h):.2f}"
    )
    return 0


def cmd_plot(ns: argparse.Namespace) -> int:
    from .plots import plot_run

    out = ns.output or f"{ns.run_dir.rstrip('/')}/curves.png"
    plot_run(ns.run_dir, out)
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="adaptive-lm", description=__doc__.splitlines()[0], allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    p = sub.add_parser("train", help="train a language model (fairseq-train's flags)", allow_abbrev=False)
    add_train_args(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser(
        "preprocess", help="text -> dict.txt + binarised splits (fairseq-preprocess)", allow_abbrev=False
    )
    add_preprocess_args(p)
    p.set_defaults(func=cmd_preprocess)
    p = sub.add_parser("eval", help="perplexity of a binarised split (fairseq-eval-lm)", allow_abbrev=False)
    p.add_argument("data")
    add_model_path(p)
    p.add_argument("--gen-subset", default="test")
    p.add_argument("--context-window", type=int, default=0)
    p.add_argument("--tokens-per-sample", type=int, default=None, help="default: the model's training value")
    p.add_argument("--sample-break-mode", default="none", choices=["none", "complete", "complete_doc", "eos"])
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--batch-size", "--max-sentences", type=int, default=None)
    p.add_argument("--softmax-batch", type=int, default=0)
    p.add_argument("--output-word-probs", action="store_true")
    p.add_argument("--output-word-stats", action="store_true")
    p.add_argument("--freq-bins", action="store_true", help="loss per word-frequency band")
    p.add_argument("--plot", default=None, help="PNG of the frequency-band losses (needs matplotlib)")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--fp16", action="store_true")
    p.add_argument("--num-workers", type=int, default=0)
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("score", help="one JSON line of log-probs per input line", allow_abbrev=False)
    p.add_argument("file")
    add_model_path(p)
    p.add_argument("--output", default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.set_defaults(func=cmd_score)
    p = sub.add_parser("generate", help="continue prompts (from --prompt or stdin)", allow_abbrev=False)
    add_model_path(p)
    p.add_argument("--prompt", action="append", help="repeatable; without it prompts are read from stdin")
    p.add_argument("--beam", type=int, default=1)
    p.add_argument("--sampling", action="store_true")
    p.add_argument("--sampling-topk", type=int, default=-1)
    p.add_argument("--sampling-topp", type=float, default=-1.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-len-b", type=int, default=200)
    p.add_argument("--min-len", type=int, default=1)
    p.add_argument("--unkpen", type=float, default=0.0)
    p.add_argument("--lenpen", type=float, default=1.0)
    p.add_argument("--no-repeat-ngram-size", type=int, default=0)
    p.add_argument("--nbest", type=int, default=1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--show-scores", action="store_true")
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("convert", help="fairseq model -> our folder (safetensors), or back (--to fairseq)")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--to", default="folder", choices=["folder", "fairseq"])
    p.add_argument("--dict", default=None)
    p.set_defaults(func=cmd_convert)
    p = sub.add_parser("download", help="download a released fairseq model (wiki103, gbw) into the cache")
    p.add_argument("model", choices=["wiki103", "gbw"])
    p.add_argument("--dir", default=None, help="where to keep the archive (default ~/.cache/adaptive-lm)")
    p.add_argument("--url", default=None, help="base URL of a mirror")
    p.set_defaults(func=cmd_download)
    p = sub.add_parser("make-corpus", help="generate a corpus with a known entropy rate")
    p.add_argument("--out", default="corpus")
    p.add_argument("--tokens", type=int, default=1_000_000)
    p.add_argument("--vocab", type=int, default=12000)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_corpus)
    p = sub.add_parser("plot", help="training/validation curves of a run as a PNG (needs matplotlib)")
    p.add_argument("run_dir")
    p.add_argument("--output", default=None)
    p.set_defaults(func=cmd_plot)
    p = sub.add_parser(
        "quickstart", help="generate a corpus, preprocess, train a small model, evaluate it", allow_abbrev=False
    )
    p.add_argument("--dir", default="quickstart-run")
    p.add_argument("--updates", type=int, default=300)
    p.set_defaults(func=cmd_quickstart)
    return parser


def _tune_malloc() -> None:
    """Keep freed tensor memory in glibc's heap instead of returning it to the OS after every step.

    Why: by default glibc serves blocks above a few MiB with fresh ``mmap`` pages and unmaps them on free, so
    every large activation of every training step page-faults its memory in again (about 10% of the step on the
    14M benchmark). Blocks up to 32 MiB (glibc's ceiling) now come from the heap, and the heap is never trimmed:
    the RSS stays at its peak, which it reaches in the first step anyway. A no-op off glibc, or when the user set
    ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` themselves.
    """
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # from <malloc.h>
    libc.mallopt(m_mmap_threshold, 32 << 20)
    libc.mallopt(m_trim_threshold, 1 << 30)


def main(argv: list[str] | None = None) -> int:
    # oneDNN (CPU bf16 matmuls) builds and caches a kernel per shape. Adaptive tails and bands change their row
    # counts every step; ``model.bucket`` rounds them to a few sizes, which fit in 128 entries (the default 1024
    # once held ~1 GB when every row count was its own shape; too small a cache rebuilds kernels every step).
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "128")
    _tune_malloc()
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        rc = int(ns.func(ns) or 0)
        gc.freeze()  # interpreter shutdown then skips walking torch's objects (0.2 s of every command's exit)
        return rc
    except (UserError, ConfigError) as e:
        print(f"adaptive-lm {ns.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"adaptive-lm {ns.command}: interrupted", file=sys.stderr)
        return 130
