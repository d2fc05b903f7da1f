"""``adaptive-lm``: one console script; each subcommand is a module of this package with ``add_args(parser)`` (its
flags) and ``run(namespace) -> exit code`` (it calls the library and prints). The library below never prints and
never imports this package.

Flag names are fairseq's wherever the meaning is the same, so published fairseq recipes run unchanged with
``fairseq-train`` replaced by ``adaptive-lm train``. Only the chosen subcommand's module is imported, and torch only
when a command needs it: ``adaptive-lm --help`` answers at once.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import re
import signal
import sys
from typing import Any

from adaptive_lm import __version__
from adaptive_lm.cli.common import OneLineParser, Terminated
from adaptive_lm.core.errors import ConfigError, UserError
from adaptive_lm.core.malloc import keep_freed_memory

# (name, module of adaptive_lm.cli, one line of help): the subcommands in the order ``adaptive-lm --help`` lists them
COMMANDS: list[tuple[str, str, str]] = [
    ("train", "train", "train a language model (fairseq-train's flags)"),
    ("preprocess", "preprocess", "text -> dict.txt + binarised splits (fairseq-preprocess)"),
    ("eval", "evaluate", "perplexity of a binarised split (fairseq-eval-lm), optionally with kNN-LM"),
    ("score", "score", "one JSON line of log-probs per input line"),
    ("generate", "generate", "continue prompts (beam search or sampling, as fairseq's hub)"),
    ("rescore", "rescore", "add LM scores to n-best lists; pick the best; tune weights"),
    ("knn-store", "knn_store", "write a kNN-LM datastore (keys and next tokens) for a split"),
    ("knn-index", "knn_index", "build a FAISS index over a datastore's keys (needs the [knn] extra)"),
    ("convert", "convert", "fairseq model -> our folder (safetensors), or back (--to fairseq)"),
    ("download", "download", "download a released fairseq model (wiki103, gbw) into the cache"),
    ("make-corpus", "make_corpus", "generate a corpus with a known entropy rate"),
    ("plot", "plot", "training/validation curves of a run as a PNG (needs the [plot] extra)"),
    ("quickstart", "quickstart", "generate a corpus, preprocess, train a small model, evaluate it"),
    ("check", "check", "self-check this machine's GPU (--dry-run: the GPU code path on the CPU)"),
]


def command_module(module: str) -> Any:
    return importlib.import_module(f"adaptive_lm.cli.{module}")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or (``only``) one whose other subcommands are listed but not built (their modules and torch
    are not imported)."""
    about = "Word-level Transformer language models with adaptive input (fairseq's transformer_lm, without fairseq)."
    parser = OneLineParser(prog="adaptive-lm", description=about, allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"adaptive-lm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    for name, module, help in COMMANDS:
        p = sub.add_parser(name, help=help, description=help, allow_abbrev=False)
        if only is None or only == name:
            mod = command_module(module)
            mod.add_args(p)
            p.set_defaults(run=mod.run)
    return parser


def _chosen(argv: list[str]) -> str | None:
    """The subcommand named on the command line (the first word that is one), if any."""
    names = {name for name, _, _ in COMMANDS}
    return next((a for a in argv if a in names), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return _main(argv)
    except KeyboardInterrupt:  # before the command runs: while its modules (and torch, 0.7 s) are being imported
        print(f"adaptive-lm {_chosen(argv) or ''}: interrupted".replace(" :", ":"), file=sys.stderr)
        return 128 + signal.SIGINT


def _main(argv: list[str]) -> int:
    parser = build_parser(only=_chosen(argv) or "")
    ns, extra = parser.parse_known_args(argv)
    if extra:  # named by the command's own parser: "adaptive-lm train: error: ... (see adaptive-lm train --help)"
        sub = next(
            (a.choices.get(ns.command) for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None
        )
        (sub or parser).error(f"unrecognized arguments: {' '.join(extra)}")
    if ns.command is None:  # bare `adaptive-lm`: the overview, not an error
        parser.print_help()
        return 0
    # oneDNN (CPU bf16 matmuls) builds and caches a kernel per shape. Adaptive tails and bands change their row
    # counts every step; ``kernels.pad_rows`` rounds them to a few sizes, which fit in 128 entries (the default 1024
    # once held ~1 GB when every row count was its own shape; too small a cache rebuilds kernels every step).
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "128")
    keep_freed_memory()
    return _run(ns)


# core.files.temporary_name's suffix (an atomic write's file, named by the OSError of writing it)
TEMPORARY = re.compile(r"\.tmp-[^/]*-\d+-[0-9a-f]{8}$")

# commands whose interruption keeps their progress (the trainer and quickstart say so themselves)
RESUMES = {
    "knn-store": "; the progress is saved: the same command resumes",
    "preprocess": "; the finished parts are kept: the same command resumes after them",
}


def _run(ns: argparse.Namespace) -> int:
    """The command, its bad input as one line and its interruption as an exit code."""
    try:
        rc = int(ns.run(ns) or 0)
        gc.freeze()  # interpreter shutdown then skips walking torch's objects (0.2 s of every command's exit)
        return rc
    except (UserError, ConfigError) as e:
        print(f"adaptive-lm {ns.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"adaptive-lm {ns.command}: interrupted{RESUMES.get(ns.command, '')}", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)
    except BrokenPipeError:  # `adaptive-lm score ... | head`
        return 0
    except (MemoryError, RuntimeError) as e:  # an allocation the machine cannot make (a size far too large)
        if not out_of_memory(e):
            raise
        print(f"adaptive-lm {ns.command}: error: out of memory ({_first_line(e)}); choose smaller sizes "
              f"(model widths, positions, --max-tokens/--batch-size)", file=sys.stderr)  # fmt: skip
        return 2
    except OSError as e:  # a file the user named cannot be read or written: one line, not a traceback
        where = f"{TEMPORARY.sub('', str(e.filename))}: " if e.filename else ""  # the target, not its temporary name
        print(
            f"adaptive-lm {ns.command}: error: {where}{e.strerror or e}; check the path and its permissions",
            file=sys.stderr,
        )
        return 2


OOM_TEXTS = ("can't allocate memory", "out of memory", "Cannot allocate memory")


def out_of_memory(e: BaseException) -> bool:
    """A failed allocation (Python's MemoryError, PyTorch's CPU allocator, CUDA), not any other RuntimeError."""
    return isinstance(e, MemoryError) or any(t in str(e) for t in OOM_TEXTS)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    m = text.find("you tried to allocate")  # PyTorch: "[enforce fail at alloc_cpu.cpp:127] ... you tried to ..."
    return text[m:].split(". Error code")[0] if m >= 0 else text[:160]
