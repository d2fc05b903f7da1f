"""``adaptive-lm``: one console script; each subcommand parses its flags, calls a library function, prints the result.

Flag names are fairseq's wherever the meaning is the same, so published fairseq recipes run unchanged with
``fairseq-train`` replaced by ``adaptive-lm train``. Every flag is checked when parsed (argparse's one-line
error); everything a user can fix (a file, a mismatch) is one ``error:`` line too, never a traceback.
"""

from __future__ import annotations

import argparse
import ast
import ctypes
import gc
import json
import math
import os
import platform
import signal
import sys
from pathlib import Path
from typing import Any

from .config import ConfigError
from .errors import UserError
from .train_config import add_train_args, config_from_args, nonneg, positive, probability

UNK_WARN_RATE = 0.05  # report the unknown-word rate above this


class OneLineParser(argparse.ArgumentParser):
    """argparse with a one-line error (``adaptive-lm train: error: unrecognized arguments: --foo``)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---- argument types: paths ---------------------------------------------------------------------------------
def existing_file(s: str) -> str:
    if not os.path.isfile(s):
        raise argparse.ArgumentTypeError(f"{s}: no such file")
    return s


def existing_dir(s: str) -> str:
    if not os.path.isdir(s):
        raise argparse.ArgumentTypeError(f"{s}: no such folder")
    return s


def creatable_dir(s: str) -> str:
    """A folder that exists or can be created (its nearest existing parent is a writable folder)."""
    p = Path(s).absolute()
    if p.exists() and not p.is_dir():
        raise argparse.ArgumentTypeError(f"{s}: exists and is not a folder")
    q = p
    while not q.exists():
        q = q.parent
    if not q.is_dir() or not os.access(q, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{s}: cannot write there ({q} is not a writable folder)")
    return s


def model_path(s: str) -> str:
    from .pretrained import RELEASED

    if not os.path.exists(s) and s not in RELEASED:
        raise argparse.ArgumentTypeError(f"{s}: no such file or folder (or a released model: {', '.join(RELEASED)})")
    return s


def overrides_dict(s: str) -> dict[str, Any]:
    """fairseq's ``--model-overrides "{'decoder_layers_to_keep': '0,2'}"``: a Python literal dict, never eval'd."""
    try:
        d = ast.literal_eval(s)
    except (ValueError, SyntaxError):
        d = None
    if not isinstance(d, dict):
        raise argparse.ArgumentTypeError(f"{s!r} is not a dict literal such as \"{{'decoder_layers_to_keep': '0,2'}}\"")
    return d


def topk(s: str) -> int:
    v = int(float(s)) if s.lstrip("-").replace(".", "", 1).isdigit() else None
    if v is None or (v != -1 and v < 1):
        raise argparse.ArgumentTypeError(f"{s!r} must be a positive integer (or -1: off)")
    return v


def topp(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if v != -1 and not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"{s!r} must be in (0, 1] (or -1: off)")
    return v


def integer(s: str) -> int:
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None


# ---- train ---------------------------------------------------------------------------------------------------
def cmd_train(ns: argparse.Namespace) -> int:
    from .train import train
    from .train_config import TrainConfig

    result = train(TrainConfig.from_args(ns))
    if result["signal"]:  # saved and stopping: a repeated signal must not turn the exit into a crash
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        return 128 + result["signal"]
    return 0


# ---- preprocess -------------------------------------------------------------------------------------------
def add_preprocess_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--only-source", action="store_true", help="accepted (language modelling is always source-only)")
    p.add_argument("--trainpref", type=existing_file, help="training text (builds the dictionary)")
    p.add_argument("--validpref", help="validation text; comma-separated list allowed: valid, valid1, ...")
    p.add_argument("--testpref", help="test text; comma-separated list allowed: test, test1, ...")
    p.add_argument("--destdir", default="data-bin", type=creatable_dir, help="output folder (default: data-bin)")
    p.add_argument("--srcdict", type=existing_file, help="reuse this dict.txt instead of building one")
    p.add_argument("--thresholdsrc", type=nonneg, default=0, help="drop words seen at most this often")
    p.add_argument("--nwordssrc", type=integer, default=-1, help="keep at most this many words (-1: all)")
    p.add_argument("--padding-factor", type=positive, default=8, help="pad the dictionary to a multiple of this")
    p.add_argument("--workers", type=positive, default=1, help="processes")
    p.add_argument("--dataset-impl", default="mmap", choices=["mmap"], help="fairseq's mmap format")
    p.add_argument("--task", default="language_modeling", choices=["language_modeling"], help="fairseq's task")
    p.add_argument("--no-progress-bar", action="store_true", help="no progress output")


def cmd_preprocess(ns: argparse.Namespace) -> int:
    from .preprocess import PreprocessConfig, preprocess

    print("\n".join(preprocess(config_from_args(PreprocessConfig, ns))))
    return 0


# ---- quickstart / corpus / plots ----------------------------------------------------------------------------
def cmd_quickstart(ns: argparse.Namespace) -> int:
    from .quickstart import quickstart

    quickstart(ns.dir, ns.updates)
    return 0


def cmd_make_corpus(ns: argparse.Namespace) -> int:
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


# ---- eval / score / generate ------------------------------------------------------------------------------------
def add_model_path(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--path",
        required=True,
        type=model_path,
        help="fairseq checkpoint, our checkpoint, exported model folder, or wiki103/gbw",
    )
    p.add_argument("--dict", default=None, type=existing_file, help="dictionary (default: the model's own)")
    p.add_argument(
        "--model-overrides",
        type=overrides_dict,
        default=None,
        help="model settings to change at load, e.g. \"{'decoder_layers_to_keep': '0,2'}\"",
    )
    p.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")
    p.add_argument(
        "--kernels",
        default="auto",
        choices=["auto", "plain"],
        help="plain: PyTorch's kernels everywhere (what CUDA runs)",
    )


def _load(ns: argparse.Namespace, dtype: Any = None):
    import torch

    from .hub import from_pretrained
    from .kernels import use_plain_kernels

    if ns.kernels == "plain":
        use_plain_kernels(True)
    device = "cpu" if ns.cpu or not torch.cuda.is_available() else "cuda"
    return from_pretrained(
        ns.path,
        dictionary=ns.dict,
        device=device,
        dtype=dtype,
        tokenizer=getattr(ns, "tokenizer", None),
        overrides=ns.model_overrides,
    )


def _half_notice(ns: argparse.Namespace, lm: Any) -> None:
    import torch

    from .hardware import half_precision_notice

    for flag, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if getattr(ns, flag, False) and lm.device.type == "cpu":
            note = half_precision_notice(dt)
            if note:
                print(note, file=sys.stderr)


def cmd_eval(ns: argparse.Namespace) -> int:
    from .evaluate import EvalConfig, evaluate, frequency_bins, summary_lines, word_prob_lines, word_stats

    lm = _load(ns)
    _half_notice(ns, lm)
    cfg = EvalConfig.from_args(ns)
    details = ns.output_word_probs or ns.output_word_stats or ns.freq_bins or ns.plot
    lines = [f"model {ns.path}: {lm.model.num_parameters():,} parameters, vocabulary {len(lm.dictionary)}"]
    if ns.knn:
        from .knn import knn_evaluate, knn_summary_lines

        kres = knn_evaluate(
            lm,
            cfg,
            ns.knn,
            k=ns.k,
            lmbda=ns.lmbda,
            temperature=ns.knn_temp,
            sim=ns.knn_sim,
            approximate=ns.knn_approx_dists,
            nprobe=ns.nprobe,
        )
        lines += knn_summary_lines(kres)
        return _emit(ns, lines)
    res = evaluate(lm, cfg, keep_scores=bool(details))
    lines.append(res.plan)
    if ns.output_word_probs:
        lines += word_prob_lines(res, lm.dictionary)
    if ns.output_word_stats:
        lines += ["word\tcount\tsum ln p\tmean ln p", *word_stats(res, lm.dictionary)]
    if ns.freq_bins or ns.plot:
        bins = frequency_bins(res, lm)
        lines.append("loss by frequency band (ids are sorted by training frequency):")
        lines += [
            f"  {name:>24}: {n:>9,} tokens, loss (base 2) {loss:.4f}, ppl {2**loss:.2f}" for name, n, loss in bins
        ]
        if ns.plot:
            from .plots import plot_bins

            plot_bins(bins, ns.plot)
            lines.append(f"wrote {ns.plot}")
    unk = _unk_line(res.n_unk, res.n_tokens, lm, f"{ns.data}/{ns.gen_subset}")
    lines += ([unk] if unk else []) + summary_lines(res)
    return _emit(ns, lines)


def _emit(ns: argparse.Namespace, lines: list[str]) -> int:
    """Print (all lines, or with --quiet the closing ones) and, with --results-path, write them to a file."""
    shown = lines[-2:] if ns.quiet else lines
    print("\n".join(shown))
    if ns.results_path:
        Path(ns.results_path).mkdir(parents=True, exist_ok=True)
        out = Path(ns.results_path) / f"eval-{ns.gen_subset}.txt"
        out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


def _unk_line(n_unk: int, n: int, lm: Any, what: str) -> str | None:
    """The unknown-word rate, when it is high enough to distort scores (unknown words score as ``<unk>``)."""
    rate = n_unk / max(n, 1)
    if rate <= UNK_WARN_RATE:
        return None
    hint = (
        ""
        if lm.tokenizer is not None
        else "; raw text needs --tokenizer moses (punctuation attached to words makes them unknown)"
    )
    share = f"{100 * rate:.1f}% of the tokens of {what}"
    return f"note: {share} are <unk> (scored as one symbol, which flatters the score){hint}"


def cmd_score(ns: argparse.Namespace) -> int:
    lm = _load(ns)
    try:
        with open(ns.file, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f]
    except UnicodeDecodeError as e:
        raise UserError(f"{ns.file}: not valid UTF-8 ({e.reason}); convert it to UTF-8") from None
    out = open(ns.output, "w", encoding="utf-8") if ns.output else sys.stdout
    n = n_unk = 0
    try:
        for row in lm.score_rows(lines, ns.batch_size):
            out.write(json.dumps(row) + "\n")
            n += len(row["tokens"])
            n_unk += row["tokens"].count(lm.dictionary.unk_word)
    finally:
        if out is not sys.stdout:
            out.close()
    unk = _unk_line(n_unk, n, lm, ns.file)
    if unk:
        print(unk, file=sys.stderr)
    return 0


def cmd_generate(ns: argparse.Namespace) -> int:
    import torch

    if ns.nbest > ns.beam and not ns.sampling:
        raise UserError(f"--nbest {ns.nbest} exceeds --beam {ns.beam}: a beam holds at most that many hypotheses")
    lm = _load(ns, torch.bfloat16 if ns.bf16 else None)
    _half_notice(ns, lm)
    kw = dict(
        sampling=ns.sampling,
        sampling_topk=ns.sampling_topk,
        sampling_topp=ns.sampling_topp,
        temperature=ns.temperature,
        max_len_a=ns.max_len_a,
        max_len_b=ns.max_len_b,
        min_len=ns.min_len,
        unkpen=ns.unkpen,
        nbest=ns.nbest,
        seed=ns.seed,
        no_repeat_ngram_size=ns.no_repeat_ngram_size,
        lenpen=ns.lenpen,
    )
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


def cmd_convert(ns: argparse.Namespace) -> int:
    from .convert import convert

    print(f"wrote {convert(ns.src, ns.dst, to=ns.to, dictionary=ns.dict)}")
    return 0


def cmd_download(ns: argparse.Namespace) -> int:
    from .pretrained import fetch

    folder = fetch(ns.model, Path(ns.dir) if ns.dir else None, ns.url)
    print(f"{ns.model}: {folder}")
    print(f"next: adaptive-lm eval {folder}/data-bin --path {folder}/model.pt --gen-subset test ...")
    return 0


# ---- the parser ---------------------------------------------------------------------------------------------
def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", type=existing_dir, help="binarised data folder (with the model's dict.txt)")
    add_model_path(p)
    p.add_argument("--gen-subset", default="test", help="split to evaluate (default: test)")
    p.add_argument("--context-window", type=nonneg, default=0, help="tokens of earlier text in front of each block")
    p.add_argument("--tokens-per-sample", type=positive, default=None, help="default: the model's training value")
    p.add_argument(
        "--sample-break-mode",
        default="none",
        choices=["none", "complete", "complete_doc", "eos"],
        help="how the split is cut into blocks (none: fixed-size blocks across lines)",
    )
    p.add_argument(
        "--max-tokens", type=positive, default=None, help="tokens per batch (default: 8192 on CPU, 98304 on a GPU)"
    )
    p.add_argument("--batch-size", "--max-sentences", type=positive, default=None, help="blocks per batch")
    p.add_argument(
        "--softmax-batch", type=nonneg, default=0, help="positions per softmax chunk (0: automatic, memory-bounded)"
    )
    p.add_argument("--output-word-probs", action="store_true", help="every token's ln p, per block")
    p.add_argument("--output-word-stats", action="store_true", help="per-word counts and mean ln p")
    p.add_argument("--freq-bins", action="store_true", help="loss per word-frequency band")
    p.add_argument("--plot", default=None, help="PNG of the frequency-band losses (needs matplotlib)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--fp16", action="store_true", help="float16 autocast")
    p.add_argument("--num-workers", type=nonneg, default=0, help="accepted for compatibility")
    p.add_argument(
        "--results-path", type=creatable_dir, default=None, help="also write the output to RESULTS_PATH/eval-SUBSET.txt"
    )
    p.add_argument("--quiet", action="store_true", help="print only the closing lines")
    p.add_argument("--no-progress-bar", action="store_true", help="no progress output")
    g = p.add_argument_group("kNN-LM (Khandelwal et al. 2020; see adaptive-lm knn-store)")
    g.add_argument("--knn", type=existing_dir, default=None, metavar="DSTORE", help="interpolate with this datastore")
    g.add_argument("--k", type=positive, default=1024, help="neighbours per token (default: 1024)")
    g.add_argument("--lmbda", type=probability, default=0.25, help="weight of the kNN distribution (default: 0.25)")
    g.add_argument("--knn-temp", type=positive, default=1.0, help="softmax temperature over -distances")
    g.add_argument("--knn-sim", default="l2", choices=["l2", "ip"], help="similarity: -squared L2 or inner product")
    g.add_argument("--knn-approx-dists", action="store_true", help="use the index's approximate distances")
    g.add_argument("--nprobe", type=positive, default=32, help="IVF lists searched (default: 32)")


def _score_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", type=existing_file, help="text, one sentence per line")
    add_model_path(p)
    p.add_argument("--output", default=None, help="write the JSON lines here instead of standard output")
    p.add_argument("--batch-size", type=positive, default=16, help="sentences per batch")
    p.add_argument("--tokenizer", default=None, choices=["space", "moses"],
                   help="moses: raw text (needs the [tokenize] extra); default: already tokenised")  # fmt: skip


def _generate_args(p: argparse.ArgumentParser) -> None:
    add_model_path(p)
    p.add_argument("--prompt", action="append", help="repeatable; without it prompts are read from stdin")
    p.add_argument("--beam", type=positive, default=1, help="beam size (default: 1)")
    p.add_argument("--sampling", action="store_true", help="sample instead of searching")
    p.add_argument("--sampling-topk", type=topk, default=-1, help="sample from the k most likely words")
    p.add_argument("--sampling-topp", type=topp, default=-1.0, help="sample from the smallest set with mass p")
    p.add_argument("--temperature", type=positive, default=1.0, help="divides the logits (default: 1)")
    p.add_argument("--max-len-a", type=nonneg, default=0.0, help="length limit a * prompt length + b")
    p.add_argument("--max-len-b", type=positive, default=200, help="length limit, prompt included (default: 200)")
    p.add_argument("--min-len", type=nonneg, default=1, help="no </s> before this length")
    p.add_argument("--unkpen", type=float, default=0.0, help="subtracted from <unk>'s score")
    p.add_argument("--lenpen", type=float, default=1.0, help="length penalty exponent of beam scores")
    p.add_argument("--no-repeat-ngram-size", type=nonneg, default=0, help="forbid repeating n-grams of this size")
    p.add_argument("--nbest", type=positive, default=1, help="hypotheses per prompt")
    p.add_argument("--seed", type=integer, default=None, help="sampling seed")
    p.add_argument("--batch-size", type=positive, default=8, help="prompts per batch")
    p.add_argument("--bf16", action="store_true", help="bfloat16 weights")
    p.add_argument("--show-scores", action="store_true", help="prefix each line with its mean ln p")
    p.add_argument("--tokenizer", default=None, choices=["space", "moses"], help="moses: raw-text prompts")


def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", type=model_path, help="model to convert")
    p.add_argument("dst", help="output folder (or .pt file with --to fairseq)")
    p.add_argument(
        "--to",
        default="folder",
        choices=["folder", "fairseq"],
        help="folder: config.json + model.safetensors + dict.txt; fairseq: a model.pt for fairseq",
    )
    p.add_argument("--dict", default=None, type=existing_file, help="dictionary (default: the model's own)")


def _download_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", choices=["wiki103", "gbw"], help="which released model")
    p.add_argument("--dir", default=None, type=creatable_dir, help="where to keep the archive (default ~/.cache)")
    p.add_argument("--url", default=None, help="base URL of a mirror")


def _corpus_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="corpus", type=creatable_dir, help="output folder (default: corpus)")
    p.add_argument("--tokens", type=positive, default=1_000_000, help="training tokens (default: 1,000,000)")
    p.add_argument("--vocab", type=positive, default=12000, help="word types (default: 12,000)")
    p.add_argument("--seed", type=integer, default=0, help="random seed")


def _plot_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=existing_dir, help="a --save-dir (with metrics.jsonl)")
    p.add_argument("--output", default=None, help="PNG path (default: RUN_DIR/curves.png)")


def _quickstart_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", default="quickstart-run", type=creatable_dir, help="working folder")
    p.add_argument("--updates", type=positive, default=300, help="training updates (default: 300)")


def _from(module: str, name: str) -> Any:
    """A function of a subcommand module that needs optional extras at run time (imported when called)."""

    def call(arg: Any) -> Any:
        import importlib

        return getattr(importlib.import_module(f"adaptive_lm.{module}"), name)(arg)

    return call


# (name, help, add its flags, run it): the subcommands in the order ``adaptive-lm --help`` lists them
COMMANDS: list[tuple[str, str, Any, Any]] = [
    ("train", "train a language model (fairseq-train's flags)", add_train_args, cmd_train),
    ("preprocess", "text -> dict.txt + binarised splits (fairseq-preprocess)", add_preprocess_args, cmd_preprocess),
    ("eval", "perplexity of a binarised split (fairseq-eval-lm), optionally with kNN-LM", _eval_args, cmd_eval),
    ("score", "one JSON line of log-probs per input line", _score_args, cmd_score),
    ("generate", "continue prompts (from --prompt or stdin)", _generate_args, cmd_generate),
    ("rescore", "add LM scores to n-best lists; pick the best; tune weights",
     _from("rescore", "add_rescore_args"), _from("rescore", "cmd_rescore")),
    ("knn-store", "write a kNN-LM datastore (keys and next tokens) for a split",
     _from("knn", "add_knn_store_args"), _from("knn", "cmd_knn_store")),
    ("knn-index", "build a FAISS index over a datastore's keys (needs the [knn] extra)",
     _from("knn", "add_knn_index_args"), _from("knn", "cmd_knn_index")),
    ("convert", "fairseq model -> our folder (safetensors), or back (--to fairseq)", _convert_args, cmd_convert),
    ("download", "download a released fairseq model (wiki103, gbw) into the cache", _download_args, cmd_download),
    ("make-corpus", "generate a corpus with a known entropy rate", _corpus_args, cmd_make_corpus),
    ("plot", "training/validation curves of a run as a PNG (needs matplotlib)", _plot_args, cmd_plot),
    ("quickstart", "generate a corpus, preprocess, train a small model, evaluate it", _quickstart_args, cmd_quickstart),
]  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    about = "Word-level Transformer language models with adaptive input (fairseq's transformer_lm, without fairseq)."
    parser = OneLineParser(prog="adaptive-lm", description=about, allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for name, help, add_args, run in COMMANDS:
        p = sub.add_parser(name, help=help, description=help, allow_abbrev=False)
        add_args(p)
        p.set_defaults(func=run)
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
    # counts every step; ``kernels.pad_rows`` rounds them to a few sizes, which fit in 128 entries (the default 1024
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
        return 128 + signal.SIGINT
    except BrokenPipeError:  # `adaptive-lm score ... | head`
        return 0
