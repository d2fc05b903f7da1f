"""``adaptive-lm preprocess``: text -> ``dict.txt`` + fairseq mmap ``{split}.bin/.idx`` (fairseq-preprocess
``--only-source``; ``fairseq_cli/preprocess.py``), byte-identical to fairseq's output.

The text is cut into ~8 MB line-aligned byte ranges that ``--workers`` processes count and encode in parallel;
results come back in order and are streamed to disk, so memory stays bounded whatever the corpus size.
The whole set (dict.txt and every split) is written into a temporary folder beside ``--destdir`` and moved into
place only when complete, so a failure leaves a previous data-bin untouched; a previous split that this run does
not rebuild and whose dictionary no longer matches is moved aside rather than left to mix with the new set.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adaptive_lm.core.data import IndexedWriter, best_dtype
from adaptive_lm.core.dictionary import Dictionary
from adaptive_lm.core.errors import UserError
from adaptive_lm.core.options import opt
from adaptive_lm.core.progress import Progress

CHUNK_BYTES = 8 << 20


@dataclass
class PreprocessConfig:
    """fairseq-preprocess's options for language modelling (``--only-source``)."""

    trainpref: str | None = opt(None, "training text (builds the dictionary)", kind="existing_file")
    validpref: str | None = opt(None, "validation text; a comma-separated list makes valid, valid1, ...")
    testpref: str | None = opt(None, "test text; a comma-separated list makes test, test1, ...")
    destdir: str = opt("data-bin", "output folder", kind="creatable_dir")
    srcdict: str | None = opt(None, "reuse this dict.txt instead of building one", kind="existing_file")
    thresholdsrc: int = opt(0, "drop words seen at most this often", kind="nonneg")
    nwordssrc: int = opt(-1, "keep at most this many words (-1: all)", kind=int)
    padding_factor: int = opt(8, "pad the dictionary to a multiple of this", kind="positive")
    workers: int = opt(1, "processes", kind="positive")
    dataset_impl: str = opt("mmap", "fairseq's binary format (mmap only)", choices=["mmap"])
    progress: bool = opt(True, "no progress output (a bar on a terminal, a line per 10% in logs)",
                         flags=("--no-progress-bar",))  # fmt: skip


# ---- reading text in line-aligned byte ranges ---------------------------------------------------------
def check_text_file(path: str) -> int:
    if not os.path.isfile(path):
        raise UserError(f"{path}: file not found; check --trainpref/--validpref/--testpref")
    size = os.path.getsize(path)
    if size == 0:
        raise UserError(f"{path}: file is empty; give a text file with one sentence or paragraph per line")
    return size


def line_ranges(path: str, chunk: int = CHUNK_BYTES) -> list[tuple[int, int]]:
    """Byte ranges that start at line starts and together cover the file."""
    size = os.path.getsize(path)
    bounds = [0]
    with open(path, "rb") as f:
        pos = chunk
        while pos < size:
            f.seek(pos)
            f.readline()
            nxt = f.tell()
            if nxt >= size:
                break
            if nxt > bounds[-1]:
                bounds.append(nxt)
            pos = nxt + chunk
    bounds.append(size)
    return list(zip(bounds[:-1], bounds[1:]))


def read_range(path: str, start: int, end: int) -> str:
    """Decode one range as UTF-8 with universal newlines (as fairseq's text-mode reading); a decode error
    becomes a one-line message with the file's line number."""
    with open(path, "rb") as f:
        f.seek(start)
        raw = f.read(end - start)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        with open(path, "rb") as f:
            line = f.read(start).count(b"\n") + raw[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not valid UTF-8 ({e.reason}); convert the file to UTF-8") from None
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def _count_range(args: tuple[str, int, int]) -> tuple[Counter[str], int]:
    path, start, end = args
    text = read_range(path, start, end)
    n_lines = text.count("\n") + (0 if text.endswith("\n") else 1)
    return Counter(text.split()), n_lines


class _Lookup(dict):
    """word -> id with unknown words mapping to ``<unk>`` through ``__missing__`` (fast with ``map``)."""

    unk = 3

    def __missing__(self, key: str) -> int:
        return self.unk


_LOOKUP: _Lookup | None = None


def _init_worker(lookup: _Lookup) -> None:
    global _LOOKUP
    _LOOKUP = lookup


def _encode_range(args: tuple[str, int, int, str]) -> tuple[np.ndarray, np.ndarray, int, int]:
    """-> (tokens, sizes per line, number of <unk> replacements, number of tokens) for one range."""
    path, start, end, dtype = args
    lookup = _LOOKUP
    assert lookup is not None
    text = read_range(path, start, end)
    lines = text.split("\n")
    if text.endswith("\n"):
        lines.pop()
    eos = 2
    ids: list[int] = []
    sizes = np.empty(len(lines), dtype=np.int32)
    for i, line in enumerate(lines):
        toks = line.split()
        ids.extend(map(lookup.__getitem__, toks))
        ids.append(eos)
        sizes[i] = len(toks) + 1
    arr = np.asarray(ids, dtype=np.int64)
    n_unk = int((arr == lookup.unk).sum())
    n_literal_unk = text.split().count("<unk>") if n_unk else 0
    return arr.astype(dtype), sizes, n_unk - n_literal_unk, len(arr)


def _pool(workers: int, lookup: _Lookup | None = None):
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    return ctx.Pool(workers, initializer=_init_worker, initargs=(lookup,))


def _progress(total: int, desc: str, enabled: bool) -> Progress:
    return Progress(total, desc, enabled, unit="B")


# ---- the two passes ----------------------------------------------------------------------------------------
def count_words(path: str, workers: int = 1, progress: bool = True) -> tuple[Counter[str], int]:
    """Word counts of a text file plus the number of lines (each line adds one ``</s>``)."""
    size = check_text_file(path)
    ranges = [(path, s, e) for s, e in line_ranges(path)]
    counts: Counter[str] = Counter()
    n_lines = 0
    pool = _pool(workers) if workers > 1 else None
    try:
        with _progress(size, f"count {Path(path).name}", progress) as bar:
            results = pool.imap(_count_range, ranges) if pool else map(_count_range, ranges)
            for (c, n), (_, s, e) in zip(results, ranges):
                counts.update(c)
                n_lines += n
                bar.update(e - s)
    finally:
        if pool:
            pool.terminate()
    return counts, n_lines


def build_dictionary(path: str, cfg: PreprocessConfig) -> Dictionary:
    counts, n_lines = count_words(path, cfg.workers, cfg.progress)
    counts["</s>"] += n_lines
    d = Dictionary()
    for word, c in sorted(counts.items()):
        d.add_symbol(word, n=c)
    d.finalize(threshold=cfg.thresholdsrc, nwords=cfg.nwordssrc, padding_factor=cfg.padding_factor)
    return d


def binarize(path: str, prefix: str, d: Dictionary, workers: int = 1, progress: bool = True) -> dict[str, int]:
    """Encode a text file into ``prefix.bin/.idx``; returns counts for the log."""
    size = check_text_file(path)
    dtype = best_dtype(len(d))
    lookup = _Lookup(d.indices)
    lookup.unk = d.unk_index
    ranges = [(path, s, e, dtype.str) for s, e in line_ranges(path)]
    writer = IndexedWriter(prefix, dtype)
    stats = {"lines": 0, "tokens": 0, "unk": 0}
    pool = _pool(workers, lookup) if workers > 1 else None
    try:
        with _progress(size, f"binarize {Path(path).name}", progress) as bar:
            if pool is not None:
                results = pool.imap(_encode_range, ranges)
            else:
                _init_worker(lookup)
                results = map(_encode_range, ranges)
            for (tokens, sizes, n_unk, n_tok), (_, s, e, _) in zip(results, ranges):
                writer.add_array(tokens, sizes)
                stats["lines"] += len(sizes)
                stats["tokens"] += n_tok
                stats["unk"] += n_unk
                bar.update(e - s)
        writer.finalize()
    except BaseException:
        writer.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
    return stats


def preprocess(cfg: PreprocessConfig) -> list[str]:
    """fairseq-preprocess --only-source: dictionary from the training text (or --srcdict), then every split.
    Returns the log lines (also written to DESTDIR/preprocess.log)."""
    if cfg.dataset_impl != "mmap":
        raise UserError(f"--dataset-impl {cfg.dataset_impl} is not supported; only mmap (fairseq's default)")
    if not cfg.trainpref and not cfg.srcdict:
        raise UserError("give --trainpref to build the dictionary, or --srcdict to reuse one")
    splits: list[tuple[str, str]] = []
    if cfg.trainpref:
        splits.append(("train", cfg.trainpref))
    for name, prefs in (("valid", cfg.validpref), ("test", cfg.testpref)):
        for k, p in enumerate((prefs or "").split(",")):
            if p:
                splits.append((name if k == 0 else f"{name}{k}", p))
    for _, p in splits:
        check_text_file(p)
    dest = Path(cfg.destdir)
    if dest.exists() and not dest.is_dir():
        raise UserError(f"--destdir {dest}: exists and is not a folder; choose another --destdir")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    log: list[str] = []
    t0 = time.time()
    try:
        d = Dictionary.load(cfg.srcdict) if cfg.srcdict else build_dictionary(cfg.trainpref, cfg)  # type: ignore[arg-type]
        if cfg.srcdict and len(d) <= d.nspecial:
            raise UserError(f"{cfg.srcdict}: no words in this dictionary (an empty dict.txt?); pass the model's one")
        d.save(tmp / "dict.txt")
        log.append(f"dictionary: {len(d)} types (written to {dest / 'dict.txt'})")
        for split, path in splits:
            st = binarize(path, str(tmp / split), d, cfg.workers, cfg.progress)
            rate = 100.0 * st["unk"] / max(1, st["tokens"])
            log.append(f"{split} ({path}): {st['lines']} lines, {st['tokens']} tokens, {rate:.2f}% replaced by <unk>")
        log.append(f"wrote {dest} in {time.time() - t0:.1f}s")
        (tmp / "preprocess.log").write_text("\n".join(log) + "\n")
        log += _move_into_place(tmp, dest, d, {name for name, _ in splits})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return log


def _move_into_place(tmp: Path, dest: Path, d: Dictionary, built: set[str]) -> list[str]:
    """The finished set replaces its namesakes in ``dest`` (each file by one rename); earlier splits that were not
    rebuilt and were binarised with another dictionary move to ``dest/stale-TIME/``. Returns notices."""
    notes: list[str] = []
    if not dest.exists():
        os.replace(tmp, dest)
        return notes
    old_dict = dest / "dict.txt"
    changed = old_dict.is_file() and Dictionary.load(old_dict).symbols != d.symbols
    leftovers = sorted({p.name.split(".")[0] for p in dest.glob("*.idx")} - built)
    if changed and leftovers:
        aside = dest / time.strftime("stale-%Y%m%d-%H%M%S")
        aside.mkdir()
        for split in leftovers:
            for p in dest.glob(f"{split}.*"):
                os.replace(p, aside / p.name)
        notes.append(f"note: {', '.join(leftovers)} were binarised with the previous dictionary: moved to {aside}")
    for p in tmp.iterdir():
        os.replace(p, dest / p.name)
    for p in dest.glob("*.bin.maxid"):  # checks cached for the replaced files
        p.unlink(missing_ok=True)
    return notes
