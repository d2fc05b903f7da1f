"""``adaptive-lm rescore``: add a language-model score to every hypothesis of n-best lists, pick each list's best
under ``existing + lm_weight * lm + word_bonus * words``, and tune the two weights on references (WER).

Why a command: speech recognisers (wav2vec 2.0, Whisper) and translation systems produce n-best lists that a
word-level LM reranks, and with fairseq this is do-it-yourself (fairseq#3774, NeMo#2287): its hub ``score`` runs
the full (N, V) softmax and a Python loop per sentence. Here every hypothesis is one sentence, framed exactly as
``LanguageModel.score`` and fairseq's hub frame it (``framing.frame``: input ``</s> w1 .. wn``, or ``<s> w1 ..
wn`` for ``add_bos_token`` models, targets ``w1 .. wn``, the final ``</s>`` not scored unless ``score_eos``),
scored in length-sorted batches (little padding) through the target-only softmax
(``target_log_probs_from_features``: no (N, V) tensor), padding rows skipped.

Inputs: a TSV ``id<TAB>hypothesis[<TAB>score columns...]`` (an optional ``#`` header naming the columns), or
fairseq-generate's output (``H-<id><TAB><score><TAB><text>`` hypotheses, ``T-<id>`` references). Output: every
input row in input order with one more column, the LM log-probability in nats.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from adaptive_lm.core.errors import UserError
from adaptive_lm.core.kernels import fast_linears
from adaptive_lm.core.progress import Progress
from adaptive_lm.inference.framing import frame

LM_COLUMN = "lm_logprob (natural log)"
LM_COLUMN_EOS = "lm_logprob (natural log, </s> included)"
_FAIRSEQ_LINE = re.compile(r"^([A-Z])-(\d+)\t")
PROGRESS_LOG_MIN = 100_000  # hypotheses: below this, no progress lines in a log (a few seconds of work)


# =====================================================================================================
# Scoring
# =====================================================================================================
def encode_hypotheses(lm: Any, texts: Sequence[str]) -> list[list[int]]:
    """Word ids of each text (the model's text pipeline applied, no ``</s>``): what ``LanguageModel.score`` feeds."""
    return [lm.ids(t) for t in texts]


def length_batches(lengths: Sequence[int], max_tokens: int, max_sentences: int | None = None) -> list[np.ndarray]:
    """Indices grouped into batches of similar length, longest first, each at most ``max_tokens`` padded positions.

    Why longest first: the largest batch shape is met at once (memory peak known from the start, the allocator
    reuses its blocks for the smaller ones)."""
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        width = max(1, int(lengths[order[start]]))  # the widest row of this batch (sorted: the first)
        n = max(1, max_tokens // width)
        if max_sentences:
            n = min(n, max_sentences)
        batches.append(order[start : start + n])
        start += n
    return batches


@torch.no_grad()
def sentence_logprobs(
    lm: Any,
    ids: Sequence[Sequence[int]],
    score_eos: bool = False,
    max_tokens: int = 4096,
    max_sentences: int | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Natural-log probability of each sentence (word ids, no ``</s>``), in input order, float64 sums of the float32
    position scores; framed by ``framing.frame`` exactly as ``LanguageModel.score`` frames it (``<s>`` first for
    ``add_bos_token`` models).

    Length-sorted batches of at most ``max_tokens`` padded positions; the softmax only for the scored positions
    (``target_log_probs_from_features``: no (N, V) tensor, nothing for padding)."""
    model, d = lm.model, lm.dictionary
    device = next(model.parameters()).device
    n = np.array([len(x) + 1 if score_eos else len(x) for x in ids], dtype=np.int64)  # scored positions
    out = np.zeros(len(ids), dtype=np.float64)
    todo = np.nonzero(n > 0)[0]  # an empty sentence without </s> scores nothing: 0
    with Progress(len(ids), "rescore", enabled=progress, unit="hyp") as bar, fast_linears(device):
        bar.update(len(ids) - len(todo))
        for batch in length_batches(n[todo], max_tokens, max_sentences):
            rows = todo[batch]
            src, tgt, m = frame([ids[i] for i in rows.tolist()], lm.start_token, d.pad(), d.eos(), score_eos)
            valid = torch.arange(src.shape[1])[None, :] < m[:, None]  # (B, W) the scored positions
            feats = model(src.to(device))  # (B, W, d)
            x = feats[valid.to(device)]  # (N, d)
            lp = model.target_log_probs_from_features(x, tgt[valid].to(device))  # (N,)
            which = valid.nonzero()[:, 0].to(device)  # (N,) the row of each position
            sums = torch.zeros(len(rows), dtype=torch.float64, device=device).index_add_(0, which, lp.double())
            out[rows] = sums.cpu().numpy()
            bar.update(len(rows))
    return out


# =====================================================================================================
# Reading n-best lists
# =====================================================================================================
@dataclass
class NBest:
    """Parsed n-best lists: one entry per hypothesis (input order) plus what is needed to echo the input."""

    path: str
    fmt: str  # "tsv" or "fairseq"
    lines: list[str]  # the input lines (no newline), echoed on output
    row_line: list[int] = field(default_factory=list)  # per hypothesis: its index in ``lines``
    ids: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)  # the existing score (0 when there is none)
    refs: dict[str, str] = field(default_factory=dict)  # list id -> reference
    ref_where: dict[str, str] = field(default_factory=dict)  # list id -> "file:line" of the reference
    columns: list[str] = field(default_factory=list)  # output header names (TSV)
    score_name: str | None = None  # which existing score was used ("" = none)
    header: bool = False

    def lists(self) -> tuple[list[str], np.ndarray]:
        """(list ids in order of first appearance, (n_hyp,) index of each hypothesis's list)."""
        index: dict[str, int] = {}
        of = np.array([index.setdefault(i, len(index)) for i in self.ids], dtype=np.int64)
        return list(index), of


def _read_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return [line.rstrip("\r\n") for line in f]
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid UTF-8 ({e.reason}); convert it to UTF-8") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None


def _number(text: str, where: str, what: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not math.isfinite(v):
        raise UserError(f"{where}: {what} is {text!r}, not a finite number")
    return v


def detect_format(lines: list[str]) -> str:
    """fairseq-generate output if any line is an ``H-<id><TAB>`` hypothesis, else TSV."""
    return "fairseq" if any(line.startswith("H-") and _FAIRSEQ_LINE.match(line) for line in lines) else "tsv"


def _column(spec: str, names: list[str] | None, n: int, path: str, line_no: int, flag: str) -> int:
    """A column given by 1-based number or by header name -> 0-based index; one line naming the file if absent."""
    if spec.isdigit() and int(spec) >= 1:
        if int(spec) > n:
            raise UserError(f"{path}:{line_no}: {flag} {spec}, but the rows have {n} columns")
        return int(spec) - 1
    if names is not None and spec in names:
        return names.index(spec)
    known = f"the header names {', '.join(repr(x) for x in names)}" if names else "no header line: use a number"
    raise UserError(f"{path}:{line_no}: {flag} {spec!r} is no column ({known})")


def _tsv_columns(
    path: str,
    names: list[str] | None,
    n: int,
    line0: int,
    first_row: list[str],
    id_column: str,
    text_column: str,
    score_column: str | None,
    reference_column: str | None,
) -> tuple[int, int, int | None, int | None]:
    """The 0-based id, text, reference and score columns from the flags (numbers or header names); with no
    ``--score-column``, the first other column whose first value is a number (None: no existing score)."""
    id_c = _column(id_column, names, n, path, line0, "--id-column")
    text_c = _column(text_column, names, n, path, line0, "--text-column")
    ref_c = _column(reference_column, names, n, path, line0, "--reference") if reference_column else None
    if text_c == id_c:
        raise UserError(f"{path}: --id-column and --text-column are the same column ({id_c + 1})")
    if score_column is not None:
        score_c = _column(score_column, names, n, path, line0, "--score-column")
        if score_c in (id_c, text_c):
            raise UserError(f"{path}: --score-column {score_column} is the id or the hypothesis column")
        return id_c, text_c, ref_c, score_c
    for c in range(n):
        if c not in (id_c, text_c, ref_c):
            try:
                if math.isfinite(float(first_row[c])):
                    return id_c, text_c, ref_c, c
            except ValueError:
                pass
    return id_c, text_c, ref_c, None


def read_tsv(
    path: str,
    id_column: str = "1",
    text_column: str = "2",
    score_column: str | None = None,
    reference_column: str | None = None,
    lines: list[str] | None = None,
) -> NBest:
    """``id<TAB>hypothesis[<TAB>...]`` rows, an optional ``#`` header line naming the columns; blank lines skipped.

    ``score_column``: the existing score (a number or a header name); default the first column other than id,
    text and reference whose first value is a number, else none (0)."""
    lines = _read_lines(path) if lines is None else lines
    nb = NBest(path, "tsv", lines)
    names: list[str] | None = None
    first = 0
    if lines and lines[0].startswith("#"):
        names = [x.strip() for x in lines[0][1:].split("\t")]
        nb.header, first = True, 1
    data = [(k, line.split("\t")) for k, line in enumerate(lines) if k >= first and line.strip()]
    if not data:
        raise UserError(f"{path}: no hypotheses (expected id<TAB>hypothesis rows)")
    n = len(names) if names is not None else len(data[0][1])
    shape_from = "the header (line 1)" if names is not None else f"line {data[0][0] + 1}"
    for k, fields in data:
        if len(fields) != n:
            raise UserError(
                f"{path}:{k + 1}: {len(fields)} tab-separated columns where {shape_from} has {n} (ragged TSV)"
            )
    line0 = 1 if names is not None else data[0][0] + 1
    id_c, text_c, ref_c, score_c = _tsv_columns(
        path, names, n, line0, data[0][1], id_column, text_column, score_column, reference_column
    )
    nb.columns = list(names) if names is not None else [f"column{c + 1}" for c in range(n)]
    if names is None:
        nb.columns[id_c], nb.columns[text_c] = "id", "hypothesis"
        if ref_c is not None:
            nb.columns[ref_c] = "reference"
    nb.score_name = nb.columns[score_c] if score_c is not None else ""
    for k, fields in data:
        where = f"{path}:{k + 1}"
        list_id, text = fields[id_c].strip(), fields[text_c].strip()
        if not list_id:
            raise UserError(f"{where}: empty utterance id (column {id_c + 1})")
        if not text:
            raise UserError(f"{where}: empty hypothesis (column {text_c + 1}); drop the row or write a placeholder")
        score = 0.0
        if score_c is not None:
            score = _number(fields[score_c].strip(), where, f"score column {nb.columns[score_c]!r}")
        if ref_c is not None:
            _add_ref(nb, list_id, fields[ref_c].strip(), where)
        nb.row_line.append(k)
        nb.ids.append(list_id)
        nb.texts.append(text)
        nb.scores.append(score)
    return nb


def _add_ref(nb: NBest, list_id: str, ref: str, where: str) -> None:
    if list_id in nb.refs and nb.refs[list_id] != ref:
        raise UserError(f"{where}: reference of {list_id!r} differs from the one at {nb.ref_where[list_id]}")
    nb.refs.setdefault(list_id, ref)
    nb.ref_where.setdefault(list_id, where)


def read_fairseq(path: str, lines: list[str] | None = None) -> NBest:
    """fairseq-generate output: ``H-<id>\\t<score>\\t<text>`` hypotheses (``--nbest`` of them per id), ``T-<id>``
    references; every other line (``S-``, ``D-``, ``P-``, logs) is echoed unchanged. The score is fairseq's
    (length-normalised, base 2)."""
    lines = _read_lines(path) if lines is None else lines
    nb = NBest(path, "fairseq", lines, header=False, score_name="fairseq score (base 2)")
    nb.columns = ["H-<id>", "score (fairseq, base 2)", "hypothesis"]
    for k, line in enumerate(lines):
        m = _FAIRSEQ_LINE.match(line)
        if not m or m.group(1) not in "HT":
            continue
        where = f"{path}:{k + 1}"
        fields = line.split("\t")
        if m.group(1) == "T":
            _add_ref(nb, m.group(2), "\t".join(fields[1:]).strip(), where)
            continue
        if len(fields) != 3:
            raise UserError(f"{where}: an H- line has 3 tab-separated fields (H-<id>, score, text), not {len(fields)}")
        if not fields[2].strip():
            raise UserError(f"{where}: empty hypothesis")
        nb.row_line.append(k)
        nb.ids.append(m.group(2))
        nb.texts.append(fields[2].strip())
        nb.scores.append(_number(fields[1].strip(), where, "the H- score"))
    if not nb.ids:
        raise UserError(f"{path}: no H-<id> hypothesis lines (is this fairseq-generate output?)")
    return nb


def read_references(path: str, nb: NBest) -> None:
    """``id<TAB>reference`` per line (blank lines skipped) -> nb.refs; every list of nb must have one."""
    seen: dict[str, int] = {}
    for k, line in enumerate(_read_lines(path)):
        if not line.strip() or (k == 0 and line.startswith("#")):
            continue
        fields = line.split("\t")
        if len(fields) != 2:
            raise UserError(f"{path}:{k + 1}: {len(fields)} tab-separated columns, expected 2 (id<TAB>reference)")
        rid = fields[0].strip()
        if rid in seen:
            raise UserError(f"{path}:{k + 1}: id {rid!r} again (first at line {seen[rid]})")
        seen[rid] = k + 1
        nb.refs[rid] = fields[1].strip()
        nb.ref_where[rid] = f"{path}:{k + 1}"


def read_nbest(
    path: str,
    fmt: str = "auto",
    id_column: str = "1",
    text_column: str = "2",
    score_column: str | None = None,
    reference_column: str | None = None,
    references: str | None = None,
) -> NBest:
    lines = _read_lines(path)
    fmt = detect_format(lines) if fmt == "auto" else fmt
    if fmt == "fairseq":
        if reference_column:
            raise UserError("--reference names a TSV column; fairseq-generate output carries its T- lines")
        nb = read_fairseq(path, lines)
    else:
        nb = read_tsv(path, id_column, text_column, score_column, reference_column, lines)
    if references:
        nb.refs, nb.ref_where = {}, {}
        read_references(references, nb)
    return nb


# =====================================================================================================
# Picking the best, WER, grid search
# =====================================================================================================
def best_per_list(list_of: np.ndarray, score: np.ndarray, n_lists: int) -> np.ndarray:
    """(n_lists,) index of the highest-scoring hypothesis of each list; ties go to the earliest row."""
    order = np.lexsort((np.arange(len(score)), -score, list_of))  # by list, then score descending, then row
    first = np.ones(len(order), dtype=bool)
    first[1:] = list_of[order][1:] != list_of[order][:-1]
    best = np.empty(n_lists, dtype=np.int64)
    best[list_of[order][first]] = order[first]
    return best


def combined_score(existing: np.ndarray, lm: np.ndarray, n_words: np.ndarray, lm_weight: float, word_bonus: float):
    return existing + lm_weight * lm + word_bonus * n_words


def jiwer_module():
    try:
        import jiwer
    except ImportError:
        raise UserError("WER needs jiwer: pip install 'adaptive-lm[asr]' (or pip install jiwer)") from None
    return jiwer


def word_errors(refs: Sequence[str], hyps: Sequence[str]) -> np.ndarray:
    """Edit operations (substitutions + deletions + insertions) of each hypothesis against its reference, by
    jiwer's alignment: a selection's corpus WER is then sum(errors) / sum(reference words), jiwer's own figure."""
    jiwer = jiwer_module()
    out = jiwer.process_words(list(refs), list(hyps))
    errs = np.zeros(len(hyps), dtype=np.int64)
    for i, chunks in enumerate(out.alignments):
        for c in chunks:
            if c.type in ("substitute", "delete"):
                errs[i] += c.ref_end_idx - c.ref_start_idx
            elif c.type == "insert":
                errs[i] += c.hyp_end_idx - c.hyp_start_idx
    return errs


@dataclass
class GridResult:
    lm_weight: float
    word_bonus: float
    wer: float  # of the best point
    table: np.ndarray  # (len(lm_weights), len(word_bonuses)) WER of every point


def grid_search(
    list_of: np.ndarray,
    existing: np.ndarray,
    lm: np.ndarray,
    n_words: np.ndarray,
    errors: np.ndarray,
    ref_words: int,
    lm_weights: Sequence[float],
    word_bonuses: Sequence[float],
) -> GridResult:
    """Corpus WER of the selection at every (lm weight, word bonus) point; the lowest wins, ties going to the
    smallest LM weight, then the word bonus closest to 0 (the least change to the first pass)."""
    n_lists = int(list_of.max()) + 1 if len(list_of) else 0
    table = np.zeros((len(lm_weights), len(word_bonuses)))
    for a, w in enumerate(lm_weights):
        for b, bonus in enumerate(word_bonuses):
            pick = best_per_list(list_of, combined_score(existing, lm, n_words, w, bonus), n_lists)
            table[a, b] = errors[pick].sum() / max(ref_words, 1)
    points = [(a, b) for a in range(len(lm_weights)) for b in range(len(word_bonuses))]
    a, b = min(points, key=lambda ab: (round(table[ab], 12), lm_weights[ab[0]], abs(word_bonuses[ab[1]])))
    return GridResult(float(lm_weights[a]), float(word_bonuses[b]), float(table[a, b]), table)


def fmt_number(x: float) -> str:
    return f"{x:g}"


def check_references(nb: NBest) -> None:
    """Every list has a reference of at least one word (jiwer refuses empty ones); one line naming where not."""
    list_ids, list_of = nb.lists()
    missing = [i for i in list_ids if i not in nb.refs]
    if missing:
        first = nb.row_line[int(np.nonzero(list_of == list_ids.index(missing[0]))[0][0])] + 1
        raise UserError(
            f"{nb.path}:{first}: no reference for utterance {missing[0]!r} ({len(missing)} of {len(list_ids)} lists "
            f"have none)"
        )
    for i in list_ids:
        if not nb.refs[i].strip():
            raise UserError(f"{nb.ref_where[i]}: empty reference for {i!r} (WER needs at least one word)")


def wer_report(
    nb: NBest,
    list_ids: list[str],
    list_of: np.ndarray,
    existing: np.ndarray,
    lm: np.ndarray,
    n_words: np.ndarray,
    lm_weight: float,
    word_bonus: float,
    lm_grid: Sequence[float],
    bonus_grid: Sequence[float],
) -> list[str]:
    """WER of the first pass, of the given weights, of the grid's best weights and of the oracle (jiwer)."""
    check_references(nb)
    refs_of_row = [nb.refs[i] for i in nb.ids]
    errors = word_errors(refs_of_row, nb.texts)  # (n_hyp,)
    ref_words = sum(len(nb.refs[i].split()) for i in list_ids)
    jiwer = jiwer_module()
    n_lists = len(list_ids)
    refs = [nb.refs[i] for i in list_ids]

    def wer_of(pick: np.ndarray) -> float:
        w = float(jiwer.wer(refs, [nb.texts[k] for k in pick]))
        assert abs(w - errors[pick].sum() / ref_words) < 1e-9, "jiwer's WER and the per-hypothesis counts disagree"
        return w

    first = best_per_list(list_of, existing, n_lists)
    given = best_per_list(list_of, combined_score(existing, lm, n_words, lm_weight, word_bonus), n_lists)
    grid = grid_search(list_of, existing, lm, n_words, errors, ref_words, lm_grid, bonus_grid)
    tuned = best_per_list(list_of, combined_score(existing, lm, n_words, grid.lm_weight, grid.word_bonus), n_lists)
    oracle = best_per_list(list_of, -errors.astype(np.float64), n_lists)
    what = f"existing score {nb.score_name!r}" if nb.score_name else "no existing score: each list's first row"
    rows = [
        (f"first pass ({what})", wer_of(first)),
        (f"--lm-weight {fmt_number(lm_weight)} --word-bonus {fmt_number(word_bonus)}", wer_of(given)),
        (
            f"best on the grid: --lm-weight {fmt_number(grid.lm_weight)} --word-bonus {fmt_number(grid.word_bonus)}",
            wer_of(tuned),
        ),
        ("oracle (the best hypothesis of each list)", wer_of(oracle)),
    ]
    width = max(len(r[0]) for r in rows)
    out = [f"WER (jiwer) over {n_lists:,} lists, {ref_words:,} reference words:"]
    out += [f"  {name.ljust(width)}  {100 * w:6.2f}%" for name, w in rows]
    out.append(
        f"  grid: lm weight {_span(lm_grid)} x word bonus {_span(bonus_grid)} ({len(lm_grid) * len(bonus_grid):,} "
        f"points); ties go to the smaller lm weight, then the bonus nearer 0"
    )
    edges = [
        f"{flag} {fmt_number(v)} is the {'largest' if v == max(grid_vals) else 'smallest'} value tried"
        for flag, v, grid_vals in (
            ("--lm-weight", grid.lm_weight, lm_grid),
            ("--word-bonus", grid.word_bonus, bonus_grid),
        )
        if len(grid_vals) > 1 and v in (min(grid_vals), max(grid_vals)) and not (flag == "--lm-weight" and v == 0)
    ]
    if edges:
        out.append(f"  note: {'; '.join(edges)}: widen the grid (--lm-weight-grid / --word-bonus-grid)")
    return out


def _span(vals: Sequence[float]) -> str:
    if len(vals) > 2:
        steps = np.diff(vals)
        if np.allclose(steps, steps[0]):
            return f"{fmt_number(vals[0])}..{fmt_number(vals[-1])} step {fmt_number(round(float(steps[0]), 10))}"
    return ",".join(fmt_number(v) for v in vals)
