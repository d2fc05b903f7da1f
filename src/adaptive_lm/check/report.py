"""The self-check's outputs: the text report (an aligned table, the notes, the details, the counts) and the JSON
document (every record with its figures). Both are returned, never printed: ``adaptive-lm check`` shows them."""

from __future__ import annotations

import textwrap
from collections import Counter
from dataclasses import asdict
from typing import Any

import torch

from adaptive_lm.check.context import FAIL, PASS, SKIP, Record
from adaptive_lm.core import hardware


def table(records: list[Record], width: int) -> str:
    """An aligned text table; long results wrap inside their column."""
    rows = [("#", "check", "status", "s", "result")]
    rows += [(str(i), r.name, r.status, f"{r.seconds:.1f}", r.summary) for i, r in enumerate(records, 1)]
    w = [max(len(row[c]) for row in rows) for c in range(4)]
    room = max(40, width - sum(w) - 4 * 3)
    blank = " | ".join(" " * x for x in w)
    out = []
    for j, row in enumerate(rows):
        lines = textwrap.wrap(row[4], room, break_on_hyphens=False) or [""]
        cells = [row[0].rjust(w[0]), row[1].ljust(w[1]), row[2].ljust(w[2]), row[3].rjust(w[3])]
        out.append(" | ".join([*cells, lines[0]]))
        out += [f"{blank} | {x}" for x in lines[1:]]
        if j == 0:
            out.append("-+-".join("-" * x for x in w) + "-+-" + "-" * room)
    return "\n".join(out)


def counts_line(records: list[Record]) -> str:
    counts = Counter(r.status for r in records)
    return f"{counts[PASS]} PASS, {counts[FAIL]} FAIL, {counts[SKIP]} SKIP"


def text_report(records: list[Record], mode: str, where: str, seconds: float, width: int = 160) -> str:
    """The table, then each note and each record's details (e.g. the top kernels), then the counts."""
    lines = [table(records, width)]
    notes = [(i, r) for i, r in enumerate(records, 1) if r.note]
    if notes:
        lines += ["", "notes:"] + [f"  {i:2d}. {r.status}: {r.note}" for i, r in notes]
    for i, r in enumerate(records, 1):
        if r.details:
            lines += ["", f"{i}. {r.name}:"] + [f"  {x}" for x in r.details]
    lines += ["", f"{counts_line(records)} in {seconds:.0f} s ({mode} mode, device {where})"]
    return "\n".join(lines)


def json_report(records: list[Record], mode: str, where: str, seconds: float) -> dict[str, Any]:
    """The machine, the versions, the counts and every record: what a GPU run reports back."""
    return dict(
        mode=mode,
        device=where,
        machine=hardware.describe(),
        torch=torch.__version__,
        seconds=round(seconds, 1),
        counts=dict(Counter(r.status for r in records)),
        records=[asdict(r) for r in records],
    )
