"""What the subcommands share: the one-line-error parser, value checks, flags generated from config dataclasses,
the flag groups several commands take (loading a model, precision, tokenizer), and loading the model they name.

Every check runs when the value is parsed, so a typo costs a line before anything slow starts (argparse's one-line
error); everything a user can fix later (a file, a mismatch) is a ``UserError``, also one line.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import math
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from adaptive_lm.core.errors import UserError
from adaptive_lm.core.files import is_special
from adaptive_lm.core.logs import log_lines_to
from adaptive_lm.core.options import flag_fields


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or ``kill``'s stop) raised where Ctrl-C would be, inside ``sigterm_as_interrupt``:
    the command saves its progress the same way; the exit code is 143."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within: SIGTERM takes Ctrl-C's path. Only around work without child processes: a forked pool's workers
    would inherit the handler, and the pool stops them with SIGTERM (measured: preprocessing's pool then hung about
    once in forty runs)."""
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return

    def terminate(signum: int, frame: Any) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class OneLineParser(argparse.ArgumentParser):
    """argparse with a one-line error (``adaptive-lm train: error: unrecognized arguments: --foo``)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---- value checks (argparse types): one clear line for a bad value ----------------------------------------------
def _number(s: str) -> float | int:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{s!r} is not a finite number")
    return int(v) if v.is_integer() and "." not in s and "e" not in s.lower() else v


def positive(s: str) -> float | int:
    v = _number(s)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{s!r} must be a positive number")
    return v


def nonneg(s: str) -> float | int:
    v = _number(s)
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"{s!r} must be zero or positive")
    return v


def probability(s: str) -> float:
    v = float(_number(s))
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"{s!r} must be a probability in [0, 1)")
    return v


def weight(s: str) -> float:
    """A probability-like weight in [0, 1] (both ends allowed: kNN-LM's lambda)."""
    v = float(_number(s))
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"{s!r} must be in [0, 1]")
    return v


def positive_float(s: str) -> float:
    """``positive`` as a float: "99999999999999999999" stays no Python int (torch cannot take one that large)."""
    return float(positive(s))


def nonneg_float(s: str) -> float:
    return float(nonneg(s))


def boolean(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{s!r} is not true/false")


def finite(s: str) -> float:
    """Any finite number (a weight that may be negative)."""
    return float(_number(s))


INT64 = 2**63  # torch and numpy hold counts and sizes as int64: a larger whole number failed deep inside them


def integer(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
    if not -INT64 <= v < INT64:
        raise argparse.ArgumentTypeError(f"{s!r} is too large (at most {INT64 - 1:,})")
    return v


def positive_int(s: str) -> int:
    v = integer(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{s!r} must be a positive integer")
    return v


def nonneg_int(s: str) -> int:
    v = integer(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"{s!r} must be zero or positive (a whole number)")
    return v


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


def existing_file(s: str) -> str:
    if os.path.isdir(s):
        raise argparse.ArgumentTypeError(f"{s}: a folder, not a file")
    if not os.path.isfile(s):
        raise argparse.ArgumentTypeError(f"{s}: no such file")
    return s


def existing_dir(s: str) -> str:
    if os.path.exists(s) and not os.path.isdir(s):
        raise argparse.ArgumentTypeError(f"{s}: a file, not a folder")
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


# fairseq flags a fairseq user passes out of habit that nothing here reproduces: each is refused with its reason and
# what to use instead (argparse's bare "unrecognized arguments" said neither)
FAIRSEQ_REFUSED = {
    "--user-dir": "fairseq plugin code (its own models and tasks) is not loaded here: only fairseq's transformer_lm "
    "family is built (see docs/from-fairseq.md)",
    "--memory-efficient-fp16": "fairseq's fp16 without fp32 master weights is not reproduced: use --fp16 or --amp "
    "(fp32 master weights)",
    "--memory-efficient-bf16": "fairseq's bf16 without fp32 master weights is not reproduced: use --bf16",
    "--wandb-project": "Weights & Biases logging is not built in: use --tensorboard-logdir, or read metrics.jsonl "
    "in --save-dir",
    "--aim-repo": "Aim logging is not built in: use --tensorboard-logdir, or read metrics.jsonl in --save-dir",
    "--azureml-logging": "AzureML logging is not built in: use --tensorboard-logdir, or read metrics.jsonl",
    "--shorten-method": "fairseq's truncation or random cropping of long samples is not reproduced: blocks of "
    "--tokens-per-sample (--sample-break-mode none) hold any text",
    "--shorten-data-split-list": "goes with --shorten-method, which is not reproduced",
    "--self-target": "fairseq's self/future/past targets (other LM objectives) are not reproduced: next-token only",
    "--future-target": "fairseq's self/future/past targets (other LM objectives) are not reproduced: next-token only",
    "--past-target": "fairseq's self/future/past targets (other LM objectives) are not reproduced: next-token only",
    "--output-dictionary-size": "an output vocabulary smaller than the dictionary is not reproduced: preprocess "
    "with --nwordssrc N to keep the N most frequent words",
    "--pad-to-fixed-length": "TPU padding is not reproduced (no TPU path here)",
    "--pad-to-fixed-bsz": "TPU padding is not reproduced (no TPU path here)",
}


# the same flags where a model is loaded to run (no training, so no master weights)
FAIRSEQ_REFUSED_RUN = {
    "--user-dir": FAIRSEQ_REFUSED["--user-dir"],
    "--memory-efficient-fp16": "fairseq's half-precision model is not reproduced: the weights stay fp32 here (with "
    "--fp16 / --bf16 autocast where the command offers it)",
    "--memory-efficient-bf16": "fairseq's half-precision model is not reproduced: the weights stay fp32 here (with "
    "--fp16 / --bf16 autocast where the command offers it)",
}


class _Refused(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, ns: argparse.Namespace, values: Any, opt: Any = None) -> None:
        parser.error(f"{opt}: {parser.refused_reasons[str(opt)]}")  # type: ignore[attr-defined]


def add_refused_fairseq_flags(p: argparse.ArgumentParser, reasons: dict[str, str] = FAIRSEQ_REFUSED) -> None:
    """The flags of ``reasons`` as hidden options whose use is one line saying why (the reason); nothing of them
    lands in the parsed namespace."""
    p.refused_reasons = {**getattr(p, "refused_reasons", {}), **reasons}  # type: ignore[attr-defined]
    for flag in reasons:
        p.add_argument(flag, action=_Refused, nargs="?", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def output_file(s: str) -> str:
    """A file path whose folder exists and is writable (a typo fails before the model loads); ``-`` is standard
    output."""
    if s == "-":
        return s
    if not s:
        raise argparse.ArgumentTypeError("an empty path: give a file name (or - for standard output)")
    p = Path(s)
    if is_special(p):  # /dev/null, a named pipe: written in place
        if not os.access(p, os.W_OK):
            raise argparse.ArgumentTypeError(f"{s}: cannot write to it")
        return s
    if p.is_symlink():  # its target is written (and replaced), in the target's folder
        p = p.resolve()
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"{s}: is a folder, not a file")
    parent = p.absolute().parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{s}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"{s}: cannot write in {parent}")
    return s


def model_path(s: str) -> str:
    from adaptive_lm.inference.download import RELEASED

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


KINDS: dict[Any, Any] = {
    "positive": positive, "nonneg": nonneg, "prob": probability, "weight": weight, "bool": boolean, "finite": finite,
    "existing_file": existing_file, "existing_dir": existing_dir, "creatable_dir": creatable_dir,
    "model_path": model_path, "topk": topk, "topp": topp, int: integer, float: finite,
}  # fmt: skip


# ---- flags generated from config dataclasses ------------------------------------------------------------------
def _annotation(f: dataclasses.Field) -> str:
    return str(f.type)


def _help(f: dataclasses.Field, m: dict[str, Any]) -> str:
    """The field's help; ``(default: ...)`` added unless the text already says what the default is."""
    text = m["help"].replace("%", "%%")  # argparse formats help strings with %
    if _annotation(f) == "bool" or f.default in (None, "") or "default" in text:
        return text
    return f"{text} (default: %(default)s)"


def _value_kwargs(f: dataclasses.Field, m: dict[str, Any]) -> dict[str, Any]:
    t = _annotation(f)
    kind = m["kind"] or (int if "int" in t else float if "float" in t else None)
    metavar = m["metavar"] or ("N" if "int" in t else "X" if "float" in t else None)
    kw: dict[str, Any] = dict(choices=m["choices"], metavar=metavar)
    if m["choices"] and len(m["choices"]) > 6:  # list long choices in the help, not in the usage line
        kw["metavar"] = f.name.upper()
    if kind is not None:
        kw["type"] = KINDS.get(kind, kind)
    if t.startswith("int") and kind in ("positive", "nonneg"):  # a whole number, as fairseq's parser wants ("2.0")
        kw["type"] = positive_int if kind == "positive" else nonneg_int
    if t.startswith("float") and kind in ("positive", "nonneg"):  # a float even when written as a whole number
        kw["type"] = positive_float if kind == "positive" else nonneg_float
    return kw


def add_config_flags(
    p: argparse.ArgumentParser,
    cls: Any,
    groups: dict[str, Any] | None = None,
    skip: tuple[str, ...] = (),
    special: dict[str, dict[str, Any]] | None = None,
) -> None:
    """One flag per ``opt`` field of the dataclass ``cls``: ``--field-name`` plus its aliases, its check, its default
    and its help; a bool field is a switch (a default-true one only has its ``--no-...`` name). ``groups`` maps a
    field's group to an argparse group; ``special`` replaces the generated keywords of some fields."""
    for f in flag_fields(cls):
        if f.name in skip:
            continue
        m = f.metadata
        target = (groups or {}).get(m["group"], p)
        default = f.default if f.default is not dataclasses.MISSING else None
        if m["positional"]:
            kw = _value_kwargs(f, m)
            kw.pop("metavar")
            target.add_argument(f.name, help=m["help"].replace("%", "%%"), **kw)
            continue
        names = ["--" + f.name.replace("_", "-")]
        names = list(m["flags"]) if m["flags"] and m["flags"][0].startswith("--no-") else names + list(m["flags"])
        kw = dict(dest=f.name, default=default, help=argparse.SUPPRESS if m["hidden"] else _help(f, m))
        if _annotation(f) == "bool" and m["kind"] != "bool":
            kw["action"] = "store_false" if default else "store_true"
        else:
            kw.update(_value_kwargs(f, m))
            if m["choices"] and len(m["choices"]) > 6:
                kw["help"] += f"; one of: {', '.join(m['choices'])}"
        kw.update((special or {}).get(f.name, {}))
        target.add_argument(*names, **kw)


def config_from_args(cls: Any, ns: argparse.Namespace, **given: Any) -> Any:
    """A config dataclass from the same-named attributes of a parsed command line; ``given`` sets the fields whose
    value needs logic."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {n: getattr(ns, n) for n in names if hasattr(ns, n)}
    return cls(**{**values, **given})


# ---- flag groups several commands share -----------------------------------------------------------------------
def add_model_flags(p: argparse.ArgumentParser, required: bool = True) -> None:
    """The model to load: ``--path`` (any layout ``from_pretrained`` reads), its dictionary, load-time overrides,
    the device and the kernels."""
    g = p.add_argument_group("model")
    g.add_argument(
        "--path",
        required=required,
        type=model_path,
        help="fairseq checkpoint, our checkpoint, exported model folder, or a released model (wiki103, gbw)",
    )
    g.add_argument("--dict", default=None, type=existing_file, help="dictionary (default: the model's own dict.txt)")
    g.add_argument(
        "--model-overrides",
        type=overrides_dict,
        default=None,
        metavar="DICT",
        help="model settings to change at load, e.g. \"{'decoder_layers_to_keep': '0,2'}\"",
    )
    g.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")
    g.add_argument(
        "--kernels",
        default="auto",
        choices=["auto", "plain"],
        help="auto: ours on CPU, PyTorch's on GPUs; plain: PyTorch's everywhere (what CUDA runs)",
    )
    add_refused_fairseq_flags(p, FAIRSEQ_REFUSED_RUN)


def add_precision_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--bf16", action="store_true", help="bfloat16 autocast (fp32 weights)")
    g.add_argument("--fp16", action="store_true", help="float16 autocast (fp32 weights)")


def add_text_flags(p: argparse.ArgumentParser, what: str = "input") -> None:
    """Raw text -> the model's symbols as fairseq's hub does it: a tokenizer, then a BPE (the model folder's
    encoder.json / vocab.bpe / sentencepiece.bpe.model are found by themselves)."""
    g = p.add_argument_group(f"text pipeline ({what})")
    g.add_argument("--tokenizer", default=None, choices=["space", "moses"],
                   help=f"moses: raw-text {what} (needs the [tokenize] extra); default: already tokenised like the "
                   f"model's data")  # fmt: skip
    g.add_argument(
        "--bpe",
        default=None,
        choices=["gpt2", "sentencepiece"],
        help="the model's BPE (needs the [bpe] extra; default: the checkpoint's own setting, if any)",
    )
    g.add_argument("--gpt2-encoder-json", default=None, type=existing_file, help="GPT-2 BPE: encoder.json")
    g.add_argument("--gpt2-vocab-bpe", default=None, type=existing_file, help="GPT-2 BPE: vocab.bpe")
    g.add_argument("--sentencepiece-model", default=None, type=existing_file, help="SentencePiece: the .model file")


def add_progress_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-progress-bar",
        dest="progress",
        action="store_false",
        help="no progress output (a bar on a terminal, a line per 10%% in logs)",
    )


def load_model(ns: argparse.Namespace, dtype: Any = None) -> Any:
    """The model ``--path`` names, on the GPU unless ``--cpu`` or there is none."""
    import torch

    from adaptive_lm.core.kernels import use_plain_kernels
    from adaptive_lm.inference.loading import from_pretrained

    if ns.kernels == "plain":
        use_plain_kernels(True)
    device = "cpu" if ns.cpu or not torch.cuda.is_available() else "cuda"
    files = {k: getattr(ns, k, None) for k in ("gpt2_encoder_json", "gpt2_vocab_bpe", "sentencepiece_model")}
    return from_pretrained(
        ns.path,
        dictionary=ns.dict,
        device=device,
        dtype=dtype,
        tokenizer=getattr(ns, "tokenizer", None),
        bpe=getattr(ns, "bpe", None),
        overrides=ns.model_overrides,
        **{k: v for k, v in files.items() if v},
    )


def half_notice(ns: argparse.Namespace, device_type: str) -> None:
    """``--bf16``/``--fp16`` on a CPU without native support: say so (and how much slower) on stderr."""
    import torch

    from adaptive_lm.core.hardware import half_precision_notice

    for flag, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if getattr(ns, flag, False) and device_type == "cpu":
            note = half_precision_notice(dt)
            if note:
                print(note, file=sys.stderr)


UNK_WARN_RATE = 0.05  # report the unknown-word rate above this


def unk_line(n_unk: int, n: int, has_tokenizer: bool, what: str, binarised: bool = False) -> str | None:
    """The unknown-word rate, when it is high enough to distort scores (unknown words score as ``<unk>``).
    ``binarised``: the words came from a data folder (eval: binarised, or raw text read as it is), whose text had to
    be split into words beforehand (eval takes no --tokenizer)."""
    rate = n_unk / max(n, 1)
    if rate <= UNK_WARN_RATE:
        return None
    if binarised:
        hint = "; split the text into words as the model's training data was (e.g. Moses) before preprocess or raw eval"
    elif has_tokenizer:
        hint = ""
    else:
        hint = "; raw text needs --tokenizer moses (punctuation attached to words makes them unknown)"
    share = f"{100 * rate:.1f}% of the tokens of {what}"
    return f"note: {share} are <unk> (scored as one symbol, which flatters the score){hint}"


def console_log(stream: Any = None) -> contextlib.AbstractContextManager:
    """Show the library's log lines (the trainer's, a datastore's progress) as plain lines on ``stream`` (stdout)
    while a command runs; the library itself never prints."""
    return log_lines_to(stream or sys.stdout)


def read_lines(path: str) -> list[str]:
    """The input's lines, UTF-8 (a byte-order mark dropped) from a file or from stdin's bytes (the text layer of
    stdin would let undecodable bytes through as escapes under a C locale)."""
    name = "standard input" if path == "-" else path
    try:
        if path == "-":
            text = sys.stdin.buffer.read().decode("utf-8-sig")
        else:
            with open(path, encoding="utf-8-sig") as f:
                text = f.read()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{name}: not valid UTF-8 ({e.reason}); convert it to UTF-8") from None
    return [line.rstrip("\r") for line in text.split("\n")][: -1 if text.endswith("\n") else None] if text else []
