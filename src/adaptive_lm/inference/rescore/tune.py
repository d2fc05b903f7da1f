"""Picking each list's best under ``existing + lm_weight * lm + word_bonus * words``, word errors by jiwer (the
``[asr]`` extra, imported only when a WER is asked for), the weight grid, and the WER report."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from adaptive_lm.core.errors import UserError
from adaptive_lm.inference.rescore.nbest import NBest


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


def jiwer_module() -> Any:
    """jiwer, imported only when a WER is computed (the optional ``[asr]`` extra): one line naming it if absent."""
    try:
        import jiwer
    except ImportError:
        raise UserError("WER needs jiwer: pip install 'adaptive-lm[asr]' (or pip install jiwer)") from None
    return jiwer


def word_errors(refs: Sequence[str], hyps: Sequence[str]) -> np.ndarray:
    """Edit operations (substitutions + deletions + insertions) of each hypothesis against its reference, by
    jiwer's alignment: a selection's corpus WER is then sum(errors) / sum(reference words), jiwer's own figure."""
    return _alignment_counts(refs, hyps)[0]


def _alignment_counts(refs: Sequence[str], hyps: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(errors, reference words) of each hypothesis, both read off jiwer's alignment: the reference words are
    counted as jiwer splits them (on spaces only: a no-break space joins two words there, unlike ``str.split``), so
    that sum(errors) / sum(reference words) is jiwer's WER."""
    jiwer = jiwer_module()
    out = jiwer.process_words(list(refs), list(hyps))
    errs = np.zeros(len(hyps), dtype=np.int64)
    ref_len = np.zeros(len(hyps), dtype=np.int64)
    for i, chunks in enumerate(out.alignments):
        for c in chunks:
            ref_len[i] += c.ref_end_idx - c.ref_start_idx
            if c.type in ("substitute", "delete"):
                errs[i] += c.ref_end_idx - c.ref_start_idx
            elif c.type == "insert":
                errs[i] += c.hyp_end_idx - c.hyp_start_idx
    return errs, ref_len


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
    errors, ref_len = _alignment_counts(refs_of_row, nb.texts)  # (n_hyp,) each
    first_row = np.unique(list_of, return_index=True)[1]  # (n_lists,): a row of each list, whose reference it has
    ref_words = int(ref_len[first_row].sum())  # as jiwer counts them (not str.split: no-break spaces)
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
    return out + _grid_lines(grid, lm_grid, bonus_grid)


def _grid_lines(grid: GridResult, lm_grid: Sequence[float], bonus_grid: Sequence[float]) -> list[str]:
    """The report's lines about the grid: its span, and a note when the best point lies on its edge (the optimum
    may lie beyond it; an lm weight of 0 is no edge to widen past)."""
    out = [
        f"  grid: lm weight {_span(lm_grid)} x word bonus {_span(bonus_grid)} ({len(lm_grid) * len(bonus_grid):,} "
        f"points); ties go to the smaller lm weight, then the bonus nearer 0"
    ]
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
