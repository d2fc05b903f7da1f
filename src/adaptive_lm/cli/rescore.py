"""``adaptive-lm rescore``: LM scores for every hypothesis of n-best lists, each list's best, weights tuned on WER."""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from pathlib import Path
from typing import TextIO

import numpy as np

from adaptive_lm.cli.common import (
    add_model_flags,
    add_progress_flag,
    add_text_flags,
    existing_file,
    finite,
    load_model,
    nonneg,
    output_file,
    positive_int,
    unk_line,
)
from adaptive_lm.core.errors import UserError
from adaptive_lm.inference.rescore import (
    LM_COLUMN,
    LM_COLUMN_EOS,
    PROGRESS_LOG_MIN,
    NBest,
    best_per_list,
    check_references,
    combined_score,
    encode_hypotheses,
    fmt_number,
    jiwer_module,
    read_nbest,
    sentence_logprobs,
    wer_report,
)


def parse_grid(s: str) -> list[float]:
    """``START:STOP:STEP`` (both ends included) or a comma-separated list -> the values; argparse type."""
    try:
        if ":" in s:
            a, b, step = (float(x) for x in s.split(":"))
            if not (math.isfinite(a) and math.isfinite(b) and step > 0 and b >= a):
                raise ValueError
            n = int(math.floor((b - a) / step + 1e-9)) + 1
            if n > 10_000:
                raise argparse.ArgumentTypeError(f"{s!r}: {n} values, at most 10,000")
            return [round(a + i * step, 10) for i in range(n)]
        vals = [float(x) for x in s.split(",")]
        if not vals or not all(math.isfinite(v) for v in vals):
            raise ValueError
        return vals
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{s!r} is not START:STOP:STEP (STOP >= START, STEP > 0) or a comma-separated list of numbers"
        ) from None


LM_GRID, BONUS_GRID = "0:2:0.1", "-2:2:0.25"  # the grid search's defaults


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("nbest", type=existing_file, help="n-best lists: TSV (id<TAB>hypothesis[...], an optional first "
                   "line '#name<TAB>name...' naming the columns) or fairseq-generate output")  # fmt: skip
    add_model_flags(p)
    p.add_argument("--format", default="auto", choices=["auto", "tsv", "fairseq"], help="default: detected")
    p.add_argument("--id-column", default="1", help="TSV: utterance id column, number or header name (default 1)")
    p.add_argument("--text-column", default="2", help="TSV: hypothesis column, number or header name (default 2)")
    p.add_argument(
        "--score-column",
        default=None,
        help="TSV: the existing score (default: the first column other than id/text/reference holding numbers in at "
        "least half of the rows, else 0)",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--reference", default=None, metavar="COLUMN", help="TSV column holding each list's reference")
    g.add_argument("--references", default=None, type=existing_file, metavar="FILE", help="id<TAB>reference lines")
    add_text_flags(p, "hypotheses")
    p.add_argument(
        "--score-eos",
        action="store_true",
        help="also score the final </s> (fairseq's hub score and LanguageModel.score do not)",
    )
    p.add_argument(
        "--output", default=None, type=output_file, help="write the rescored rows here (- : stdout, the default)"
    )
    p.add_argument(
        "--best",
        default=None,
        type=output_file,
        help="write id<TAB>best hypothesis per list here (- : stdout, with --output FILE)",
    )
    p.add_argument("--lm-weight", type=nonneg, default=1.0, help="score = existing + W * lm + B * words (W: 1)")
    p.add_argument("--word-bonus", type=finite, default=0.0, help="B in that score, per word (default 0)")
    p.add_argument(
        "--lm-weight-grid", type=parse_grid, default=None, help=f"with references: W values tried ({LM_GRID})"
    )
    p.add_argument(
        "--word-bonus-grid", type=parse_grid, default=None, help=f"with references: B values tried ({BONUS_GRID})"
    )
    p.add_argument("--max-tokens", type=positive_int, default=4096, help="padded positions per batch (default 4096)")
    add_progress_flag(p)


def _write_rows(out: TextIO, nb: NBest, lm: np.ndarray, column: str) -> None:
    """Every input row in input order with the LM column appended (fairseq input: H- lines get it, the rest as
    is), under a ``#`` header naming the columns."""
    if nb.fmt == "fairseq":
        out.write("# fairseq-generate output; H- lines: " + "\t".join([*nb.columns, column]) + "\n")
        extra = dict(zip(nb.row_line, lm.tolist()))
        for k, line in enumerate(nb.lines):
            out.write(f"{line}\t{extra[k]:.6f}\n" if k in extra else line + "\n")
        return
    out.write("#" + "\t".join([*nb.columns, column]) + "\n")
    for k, v in zip(nb.row_line, lm.tolist()):
        out.write(f"{nb.lines[k]}\t{v:.6f}\n")


def _wants_wer(nb: NBest, asked: bool) -> bool:
    """WER when references were given; for fairseq input, also from its T- lines when jiwer is installed (else a
    note: the user did not ask, so a missing extra is not an error)."""
    if asked or not (nb.fmt == "fairseq" and nb.refs):
        return asked
    try:
        import jiwer  # noqa: F401
    except ImportError:
        print("note: the T- lines give references; pip install jiwer for WER and weight tuning", file=sys.stderr)
        return False
    return True


def _write_best(path: str, nb: NBest, list_ids: list[str], pick: np.ndarray, lm_weight: float, bonus: float) -> str:
    """Each list's chosen hypothesis as ``id<TAB>text``; returns the line saying what was written and by what."""
    with contextlib.nullcontext(sys.stdout) if path == "-" else open(path, "w", encoding="utf-8") as f:
        for lid, k in zip(list_ids, pick.tolist()):
            f.write(f"{lid}\t{nb.texts[k]}\n")
    what = f"{nb.score_name!r}" if nb.score_name else "0 (no score column)"
    where = "standard output" if path == "-" else path
    return (
        f"wrote {where}: the best of each list by {what} + {fmt_number(lm_weight)} * lm + {fmt_number(bonus)} * words"
    )


def _check_outputs(ns: argparse.Namespace) -> None:
    """``--output -`` is standard output, as without it; the two outputs may not be the same file or stream."""
    if ns.output == "-":
        ns.output = None
    if ns.best == "-" and not ns.output:
        raise UserError("--best - and the rescored rows would both go to standard output: give --output FILE")
    if ns.best and ns.output and Path(ns.best).resolve() == Path(ns.output).resolve():
        raise UserError(f"--best and --output are the same file ({ns.output}): one would overwrite the other")


def _check_lengths(nb: NBest, ids: list, most: int) -> None:
    """A hypothesis longer than the model takes is named by its file and line, before any scoring (it was 'sentence
    N', counted over the hypotheses, with advice for documents)."""
    for k, x in enumerate(ids):
        if len(x) > most:
            raise UserError(
                f"{nb.path}:{nb.row_line[k] + 1}: a hypothesis of {len(x):,} tokens, more than the {most:,} the model "
                f"takes with its </s> (fairseq's hub refuses it too): shorten it or leave it out"
            )


def run(ns: argparse.Namespace) -> int:
    nb = read_nbest(
        ns.nbest, ns.format, ns.id_column, ns.text_column, ns.score_column, ns.reference, ns.references
    )  # all input checks before the model loads
    wer = _wants_wer(nb, bool(ns.reference or ns.references))
    if not wer and (ns.lm_weight_grid or ns.word_bonus_grid):
        raise UserError("--lm-weight-grid / --word-bonus-grid tune against references: add --reference COLUMN or "
                        "--references FILE (or give --lm-weight / --word-bonus directly)")  # fmt: skip
    _check_outputs(ns)
    if wer:
        jiwer_module()  # a missing extra or reference fails now, not after scoring
        check_references(nb)
    lm = load_model(ns)
    t0 = time.perf_counter()
    ids = encode_hypotheses(lm, nb.texts)
    _check_lengths(nb, ids, lm.model.cfg.max_target_positions - 1)
    list_ids, list_of = nb.lists()
    # a bar on a terminal; in a log only for long work (10% lines for a second's work are noise)
    progress = ns.progress and (sys.stderr.isatty() or len(ids) >= PROGRESS_LOG_MIN)
    scores = sentence_logprobs(lm, ids, ns.score_eos, int(ns.max_tokens), progress=progress)
    secs = time.perf_counter() - t0
    n_tok = sum(len(x) + int(ns.score_eos) for x in ids)
    column = LM_COLUMN_EOS if ns.score_eos else LM_COLUMN
    out = open(ns.output, "w", encoding="utf-8") if ns.output else sys.stdout
    try:
        _write_rows(out, nb, scores, column)
    finally:
        if out is not sys.stdout:
            out.close()
    info = sys.stdout if ns.output and ns.best != "-" else sys.stderr
    print(
        f"rescored {len(ids):,} hypotheses ({len(list_ids):,} lists, {n_tok:,} tokens) in {secs:.2f} s: "
        f"{len(ids) / max(secs, 1e-9):,.0f} hypotheses/s, {n_tok / max(secs, 1e-9):,.0f} tokens/s on {lm.device}",
        file=info,
    )
    flat = np.fromiter((t for x in ids for t in x), dtype=np.int64, count=sum(len(x) for x in ids))
    unk = unk_line(int((flat == lm.dictionary.unk()).sum()), len(flat), lm.tokenizer is not None, ns.nbest)
    if unk:
        print(unk, file=sys.stderr)
    existing = np.asarray(nb.scores, dtype=np.float64)
    n_words = np.array([len(t.split()) for t in nb.texts], dtype=np.float64)
    if ns.best:
        pick = best_per_list(
            list_of, combined_score(existing, scores, n_words, ns.lm_weight, ns.word_bonus), len(list_ids)
        )
        print(_write_best(ns.best, nb, list_ids, pick, ns.lm_weight, ns.word_bonus), file=info)
    if wer:
        lines = wer_report(
            nb,
            list_ids,
            list_of,
            existing,
            scores,
            n_words,
            ns.lm_weight,
            ns.word_bonus,
            ns.lm_weight_grid or parse_grid(LM_GRID),
            ns.word_bonus_grid or parse_grid(BONUS_GRID),
        )
        print("\n".join(lines), file=info)
    return 0
