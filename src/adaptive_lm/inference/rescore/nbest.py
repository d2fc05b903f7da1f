"""Reading n-best lists: a TSV ``id<TAB>hypothesis[<TAB>score columns...]`` (an optional ``#`` header naming the
columns) or fairseq-generate's output (``H-<id><TAB><score><TAB><text>`` hypotheses, ``T-<id>`` references), and
references from a separate ``id<TAB>reference`` file. Every bad input is one ``UserError`` naming file and line."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from adaptive_lm.core.errors import UserError

_FAIRSEQ_LINE = re.compile(r"^([A-Z])-(\d+)\t")


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
        with open(path, encoding="utf-8-sig") as f:  # a byte-order mark is not part of the first id
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


# ---- TSV ---------------------------------------------------------------------------------------------------------
def _column(spec: str, names: list[str] | None, n: int, path: str, line_no: int, flag: str) -> int:
    """A column given by 1-based number or by header name -> 0-based index; one line naming the file if absent."""
    if spec.isdigit() and int(spec) >= 1:
        if int(spec) > n:
            raise UserError(f"{path}:{line_no}: {flag} {spec}, but the rows have {n} columns")
        return int(spec) - 1
    if names is not None and spec in names:
        return names.index(spec)
    if spec.isdigit():  # 0
        raise UserError(f"{path}:{line_no}: {flag} {spec}: columns are numbered from 1 (1 to {n} here)")
    known = f"the header names {', '.join(repr(x) for x in names)}" if names else "no header line: use a number"
    raise UserError(f"{path}:{line_no}: {flag} {spec!r} is no column ({known})")


def _tsv_table(path: str, lines: list[str]) -> tuple[list[str] | None, list[tuple[int, list[str]]], int]:
    """(the ``#`` header's column names or None, the non-blank rows as (line index, fields), the number of columns),
    every row checked to have that many (a ragged row is one line naming it and the row that set the shape)."""
    names: list[str] | None = None
    first = 0
    if lines and lines[0].startswith("#"):
        names = [x.strip() for x in lines[0][1:].split("\t")]
        first = 1
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
    return names, data, n


def _tsv_columns(
    path: str,
    names: list[str] | None,
    n: int,
    line0: int,
    rows: list[list[str]],
    id_column: str,
    text_column: str,
    score_column: str | None,
    reference_column: str | None,
) -> tuple[int, int, int | None, int | None]:
    """The 0-based id, text, reference and score columns from the flags (numbers or header names); with no
    ``--score-column``, the first other column holding numbers in at least half of the rows (None: no existing
    score). Not the first row alone: one bad value there would drop the whole column without a word."""
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
        if c not in (id_c, text_c, ref_c) and 2 * sum(_is_number(r[c]) for r in rows) >= len(rows):
            return id_c, text_c, ref_c, c
    return id_c, text_c, ref_c, None


def _is_number(text: str) -> bool:
    """Reads as a number (nan and inf too: such a score column is found, and its values then refused)."""
    try:
        float(text)
    except ValueError:
        return False
    return True


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
    names, data, n = _tsv_table(path, lines)
    line0 = 1 if names is not None else data[0][0] + 1
    id_c, text_c, ref_c, score_c = _tsv_columns(
        path, names, n, line0, [f for _, f in data], id_column, text_column, score_column, reference_column
    )
    nb = NBest(path, "tsv", lines, header=names is not None)
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
            value = fields[score_c].strip()
            if names is None and k == data[0][0] and not _is_number(value):
                raise UserError(
                    f"{where}: {value!r} in the score column ({score_c + 1}), whose other rows hold numbers: a "
                    f"header line starts with '#' (#id<TAB>text<TAB>...), a score is a number"
                )
            score = _number(value, where, f"score column {nb.columns[score_c]!r}")
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


# ---- fairseq-generate, references, either format ----------------------------------------------------------------
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
    """The n-best lists of ``path`` in either format (``auto``: ``detect_format``); ``references``: a separate
    ``id<TAB>reference`` file, which replaces any references the input carries."""
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
