"""``adaptive-lm score``: one JSON line of log-probabilities per input line (a file, or stdin with ``-``)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from adaptive_lm.cli.common import (
    add_model_flags,
    add_precision_flags,
    add_progress_flag,
    add_text_flags,
    half_notice,
    load_model,
    nonneg_int,
    output_file,
    positive_int,
    read_lines,
    unk_line,
)
from adaptive_lm.core.errors import UserError
from adaptive_lm.core.files import atomic_path
from adaptive_lm.core.progress import Progress


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="text, one sentence per line; - reads standard input")
    add_model_flags(p)
    p.add_argument(
        "--output",
        default=None,
        type=output_file,
        help="write the JSON lines here, whole or not at all (- : stdout, the default)",
    )
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="at most this many sentences per batch (default: length-sorted batches of up to 4,096 "
                        "positions; lines sharing prefixes are computed once)")  # fmt: skip
    p.add_argument("--score-eos", action="store_true",
                   help="also score each line's final </s> (fairseq's hub score does not)")  # fmt: skip
    p.add_argument("--context-lines", type=nonneg_int, default=0, metavar="N",
                   help="score each line after the N lines with words before it (blank lines do not count), read "
                        "but not scored: sentence 2 given sentence 1; each line ends with </s>, the earliest words "
                        "left out if they do not fit the model; default 0: every line alone")  # fmt: skip
    p.add_argument("--base2", action="store_true",
                   help="log-probabilities, sum and mean in bits (log2), not nats (natural log, fairseq's hub); "
                        "the perplexity is the same")  # fmt: skip
    add_text_flags(p)
    add_precision_flags(p)
    add_progress_flag(p)


def run(ns: argparse.Namespace) -> int:
    lines = read_lines(ns.file)
    lm = load_model(ns)
    half_notice(ns, lm.device.type)
    name = "standard input" if ns.file == "-" else ns.file
    n = n_unk = 0
    # --output is written whole or not at all (a temporary file renamed at the end): a failure or Ctrl-C midway
    # leaves the previous file as it was, not a truncated one under the final name
    with contextlib.ExitStack() as stack:
        if ns.output and ns.output != "-":
            tmp = stack.enter_context(atomic_path(ns.output, follow_links=True))
            out = stack.enter_context(open(tmp, "w", encoding="utf-8"))
        else:
            out = sys.stdout
        bar = stack.enter_context(Progress(len(lines), "score", ns.progress, unit="lines"))
        try:
            for row in lm.score_rows(lines, ns.batch_size, ns.score_eos, _autocast(ns), ns.context_lines, ns.base2):
                out.write(json.dumps(row) + "\n")
                n += len(row["tokens"])
                n_unk += row["tokens"].count(lm.dictionary.unk_word)
                bar.update(1)
        except UserError as e:
            raise UserError(f"{name}: {e}") from None
        if out is not sys.stdout:
            out.close()  # before the rename
    unk = unk_line(n_unk, n, lm.tokenizer is not None, name)
    if unk:
        print(unk, file=sys.stderr)
    if not lines:  # nothing written: say why, rather than an exit 0 with no output at all
        print(f"note: {name} has no lines; nothing scored", file=sys.stderr)
    return 0


def _autocast(ns: argparse.Namespace) -> str | None:
    return "bf16" if ns.bf16 else "fp16" if ns.fp16 else None
