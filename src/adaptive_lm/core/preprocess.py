"""``adaptive-lm preprocess``: text -> ``dict.txt`` + fairseq mmap ``{split}.bin/.idx`` (fairseq-preprocess
``--only-source``; ``fairseq_cli/preprocess.py``), byte-identical to fairseq's output.

The text is cut into ~8 MB line-aligned byte ranges that ``--workers`` processes count and encode in parallel;
results come back in order and are streamed to disk, so memory stays bounded whatever the corpus size.
The whole set (dict.txt and every split) is written into a temporary folder beside ``--destdir`` and moved into
place only when complete, so a failure leaves a previous data-bin untouched; a previous split that this run does
not rebuild and whose dictionary no longer matches is moved aside rather than left to mix with the new set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing as mp
import os
import shutil
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adaptive_lm.core.data import IndexedWriter, best_dtype
from adaptive_lm.core.dictionary import Dictionary
from adaptive_lm.core.errors import UserError
from adaptive_lm.core.files import atomic_write_json
from adaptive_lm.core.options import opt
from adaptive_lm.core.progress import Progress

CHUNK_BYTES = 8 << 20
# fairseq-preprocess's --dataset-impl choices: the formats written, and why the others are refused
DATASET_IMPLS = {
    "mmap": "",
    "lazy": "",
    "cached": "",
    "raw": "fairseq-preprocess only copies the text, to train.None-None and so on, which its language_modeling "
    "task does not read",
    "huffman": "fairseq-preprocess fails with it too ('preprocessing.py doesn't support Huffman yet')",
    "fasta": "fairseq-preprocess fails with it too (NotImplementedError)",
}


@dataclass
class PreprocessConfig:
    """fairseq-preprocess's options for language modelling (``--only-source``)."""

    trainpref: str | None = opt(None, "training text (builds the dictionary)", kind="existing_file")
    validpref: str | None = opt(None, "validation text; a comma-separated list makes valid, valid1, ...")
    testpref: str | None = opt(None, "test text; a comma-separated list makes test, test1, ...")
    destdir: str = opt("data-bin", "output folder", kind="creatable_dir")
    srcdict: str | None = opt(None, "reuse this dict.txt instead of building one", kind="existing_file")
    thresholdsrc: int = opt(0, "drop words seen fewer than this many times (0 or less: none)", kind=int)
    nwordssrc: int = opt(-1, "keep at most this many words (-1: all)", kind=int)
    padding_factor: int = opt(8, "pad the dictionary to a multiple of this (1 or less: no padding)", kind=int)
    workers: int = opt(1, "processes", kind="positive")
    dataset_impl: str = opt(
        "mmap",
        "fairseq's binary format: mmap, or its older one (lazy and cached write the same "
        "files); raw, huffman and fasta are refused",
        choices=list(DATASET_IMPLS),
    )
    progress: bool = opt(True, "no progress output (a bar on a terminal, a line per 10% in logs)",
                         flags=("--no-progress-bar",))  # fmt: skip


# ---- reading text in line-aligned byte ranges ---------------------------------------------------------
def check_text_file(path: str) -> int:
    if os.path.isdir(path):
        raise UserError(f"{path}: a folder, not a file; give the text file itself (--trainpref/--validpref/--testpref)")
    if not os.path.isfile(path):
        raise UserError(f"{path}: file not found; check --trainpref/--validpref/--testpref")
    size = os.path.getsize(path)
    if size == 0:
        raise UserError(f"{path}: file is empty; give a text file with one sentence or paragraph per line")
    return size


def line_ranges(path: str, chunk: int | None = None) -> list[tuple[int, int]]:
    """Byte ranges of about ``chunk`` bytes (default ``CHUNK_BYTES``, read at the call: tests make it small) that
    start at line starts and together cover the file."""
    chunk = chunk or CHUNK_BYTES
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
    # fairseq counts a word as replaced when it maps to <unk>'s id and is not the word <unk> itself; a --srcdict that
    # re-maps "<unk>" (#fairseq:overwrite) gives the literal word another id, so nothing is subtracted then
    literal_is_unk = lookup["<unk>"] == lookup.unk
    n_literal_unk = text.split().count("<unk>") if n_unk and literal_is_unk else 0
    return arr.astype(dtype), sizes, n_unk - n_literal_unk, len(arr)


def _init_pool_worker(lookup: _Lookup | None) -> None:
    """A pool process: Ctrl-C is the parent's to handle (a terminal sends it to every process of the group, and
    each worker printed its own KeyboardInterrupt traceback; a worker ended by it while waiting for a task would
    also hold the pool's queue lock for good, and the parent's ``terminate`` would wait for it forever), and
    SIGTERM, the pool's way to stop it, ends it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _POOL_SIGNALS)  # blocked by _pool until these were set
    _init_worker(lookup)


_POOL_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _pool(workers: int, lookup: _Lookup | None, pools: list) -> Any:
    """A pool of ``workers`` processes, appended to ``pools`` (the caller's ``finally`` terminates what is there:
    an interruption anywhere after the pool exists cannot leave its workers waiting forever). Ctrl-C and SIGTERM
    stay blocked while the workers are forked, so that none receives them under the parent's handlers before its
    initializer has set its own."""
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    masked = hasattr(signal, "pthread_sigmask")
    before = signal.pthread_sigmask(signal.SIG_BLOCK, _POOL_SIGNALS) if masked else None
    try:
        pools.append(ctx.Pool(workers, initializer=_init_pool_worker, initargs=(lookup,)))
    finally:
        if before is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, before)
    return pools[-1]


def _progress(total: int, desc: str, enabled: bool) -> Progress:
    return Progress(total, desc, enabled, unit="B")


def _check_line_ends(path: str, workers: int, block: int = 1 << 24) -> None:
    """fairseq-preprocess with more than one worker cuts a file at offsets from text-mode ``tell()``, which for
    ``\\r`` line ends (lone, or ``\\r\\n`` around blank lines) can be opaque numbers beyond the file: its chunks then
    overlap and lines repeat or go missing, depending on the number of workers. Not reproduced: refused. One read
    of the file at memory speed (UTF-8 never has 0x0D inside a character), before any work."""
    if workers <= 1:
        return
    with open(path, "rb") as f:
        while raw := f.read(block):
            if b"\r" in raw:
                raise UserError(
                    f"{path}: has \\r (CR or CRLF) line ends, which fairseq-preprocess with --workers {workers} cuts "
                    "into overlapping chunks (lines repeated or lost; not reproduced): pass --workers 1 (fairseq's "
                    "--workers 1 output) or convert the line ends to \\n (e.g. dos2unix)"
                )


# ---- the two passes ----------------------------------------------------------------------------------------
def count_words(path: str, workers: int = 1, progress: bool = True) -> tuple[Counter[str], int]:
    """Word counts of a text file plus the number of lines (each line adds one ``</s>``)."""
    size = check_text_file(path)
    ranges = [(path, s, e) for s, e in line_ranges(path)]
    counts: Counter[str] = Counter()
    n_lines = 0
    pools: list = []
    try:
        pool = _pool(workers, None, pools) if workers > 1 else None
        with _progress(size, f"count {Path(path).name}", progress) as bar:
            results = pool.imap(_count_range, ranges) if pool else map(_count_range, ranges)
            for (c, n), (_, s, e) in zip(results, ranges):
                counts.update(c)
                n_lines += n
                bar.update(e - s)
    finally:
        for p in pools:
            p.terminate()
    return counts, n_lines


def build_dictionary(path: str, cfg: PreprocessConfig) -> Dictionary:
    counts, n_lines = count_words(path, cfg.workers, cfg.progress)
    counts["</s>"] += n_lines
    d = Dictionary()
    for word, c in sorted(counts.items()):
        d.add_symbol(word, n=c)
    d.finalize(threshold=cfg.thresholdsrc, nwords=cfg.nwordssrc, padding_factor=cfg.padding_factor)
    return d


def binarize(
    path: str, prefix: str, d: Dictionary, workers: int = 1, progress: bool = True, impl: str = "mmap"
) -> dict[str, int]:
    """Encode a text file into ``prefix.bin/.idx`` (``impl``: fairseq's --dataset-impl, mmap or lazy/cached);
    returns counts for the log."""
    size = check_text_file(path)
    dtype = best_dtype(len(d))
    lookup = _Lookup(d.indices)
    lookup.unk = d.unk_index
    ranges = [(path, s, e, dtype.str) for s, e in line_ranges(path)]
    writer = IndexedWriter(prefix, dtype, legacy=impl in ("lazy", "cached"))
    stats = {"lines": 0, "tokens": 0, "unk": 0}
    pools: list = []
    try:
        pool = _pool(workers, lookup, pools) if workers > 1 else None
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
        for p in pools:
            p.terminate()
    return stats


MAX_WORKERS = 1024  # a pool forks them all at once (99999999999999999999 forked until the machine gave out)
MAX_PADDING = 1 << 20  # the dictionary is padded with made-up words to a multiple of it (a huge one never ended)


def _check_limits(cfg: PreprocessConfig) -> None:
    if cfg.workers > MAX_WORKERS:
        raise UserError(f"--workers {cfg.workers}: at most {MAX_WORKERS} processes (one per core is plenty)")
    if cfg.padding_factor > MAX_PADDING:
        raise UserError(
            f"--padding-factor {cfg.padding_factor}: at most {MAX_PADDING:,} (the dictionary is padded with made-up "
            f"words to a multiple of it; fairseq's default is 8)"
        )


def preprocess(cfg: PreprocessConfig) -> list[str]:
    """fairseq-preprocess --only-source: dictionary from the training text (or --srcdict), then every split.
    Returns the log lines (also written to DESTDIR/preprocess.log).

    The work goes into ``.DESTDIR.partial`` beside ``--destdir``; each finished part (the dictionary, then each
    split) is recorded in its ``progress.json`` with the settings and the input files' sizes and times. Interrupted
    (Ctrl-C, SIGTERM), the folder stays: the same command continues after the last finished part. Any other change
    (a flag, an input file) starts afresh."""
    _check_limits(cfg)
    splits = _splits(cfg)
    for _, path in splits:  # every file before any work: a \r in the test file must not cost the train split's hours
        _check_line_ends(path, cfg.workers)
    dest = Path(cfg.destdir)
    if dest.exists() and not dest.is_dir():
        raise UserError(f"--destdir {dest}: exists and is not a folder; choose another --destdir")
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = dest.parent / f".{dest.name}.partial"
    with _only_writer(work, dest):
        return _preprocess(cfg, splits, dest, work)


def _preprocess(cfg: PreprocessConfig, splits: list[tuple[str, str]], dest: Path, work: Path) -> list[str]:
    identity = _identity(cfg, splits)
    done = _resumable(work, identity)
    log: list[str] = list(done.get("log", []))
    if log:
        log.insert(0, f"resuming after: {', '.join(done['parts'])} (from an interrupted run, {work})")
    t0 = time.time()
    interrupted = False
    try:
        if "dictionary" in done["parts"]:
            d = Dictionary.load(work / "dict.txt")
        else:
            d = Dictionary.load(cfg.srcdict) if cfg.srcdict else build_dictionary(cfg.trainpref, cfg)  # type: ignore[arg-type]
            if cfg.srcdict and len(d) <= d.nspecial:
                raise UserError(
                    f"{cfg.srcdict}: no words in this dictionary (an empty dict.txt?); pass the model's one"
                )
            d.save(work / "dict.txt")
            log.append(f"dictionary: {len(d)} types (written to {dest / 'dict.txt'})")
            _record(work, done, "dictionary", log)
        for split, path in splits:
            if split in done["parts"]:
                continue
            st = binarize(path, str(work / split), d, cfg.workers, cfg.progress, cfg.dataset_impl)
            rate = 100.0 * st["unk"] / max(1, st["tokens"])
            log.append(f"{split} ({path}): {st['lines']} lines, {st['tokens']} tokens, {rate:.2f}% replaced by <unk>")
            _record(work, done, split, log)
        log.append(f"wrote {dest} in {time.time() - t0:.1f}s")
        (work / "preprocess.log").write_text("\n".join(log) + "\n")
        (work / PROGRESS).unlink()
        log += _move_into_place(work, dest, d, {name for name, _ in splits})
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM through the command's handler: the finished parts stay
        interrupted = True
        raise
    finally:
        if not interrupted:
            shutil.rmtree(work, ignore_errors=True)
    return log


PROGRESS = "progress.json"


@contextlib.contextmanager
def _only_writer(work: Path, dest: Path) -> Iterator[None]:
    """One preprocess at a time per ``--destdir``: ``work`` is shared by design (a rerun resumes there), so a second
    run would have removed the first one's files or written into them (a traceback in one of the two, or a mixed
    result). An advisory lock on ``work``'s ``.lock`` file beside it, released by the system if the process dies
    (no stale lock after a kill); where the system has none (Windows), no check."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path = work.with_name(work.name + ".lock")
    for _ in range(3):  # the file may be removed by its holder between our open and our lock: take the new one
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "?"
            f.close()
            raise UserError(
                f"--destdir {dest}: another preprocess is writing it (pid {holder}); wait for it to finish, or "
                "choose another --destdir"
            ) from None
        if os.path.exists(path) and os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
            break
        f.close()
    else:  # pragma: no cover - three holders in a row
        raise UserError(f"--destdir {dest}: other preprocess runs keep starting on it; run one at a time")
    try:
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield
    finally:
        path.unlink(missing_ok=True)  # while still holding it: a run waiting on this file retries on a new one
        f.close()


def _splits(cfg: PreprocessConfig) -> list[tuple[str, str]]:
    """(split name, text file) of every split to write: train, valid, valid1, ..., test, test1, ..., checked."""
    if DATASET_IMPLS.get(cfg.dataset_impl, "?"):
        why = DATASET_IMPLS.get(cfg.dataset_impl, "not one of fairseq's")
        raise UserError(f"--dataset-impl {cfg.dataset_impl} is not supported ({why}); use mmap (the default)")
    if not cfg.trainpref and not cfg.srcdict:
        raise UserError("give --trainpref to build the dictionary, or --srcdict to reuse one")
    splits: list[tuple[str, str]] = []
    if cfg.trainpref:
        splits.append(("train", cfg.trainpref))
    for name, prefs in (("valid", cfg.validpref), ("test", cfg.testpref)):
        if not prefs:
            continue
        parts = prefs.split(",")
        if not all(parts):  # fairseq fails on the empty name; skipping it would renumber the rest
            raise UserError(f"--{name}pref {prefs!r}: an empty entry in the comma-separated list; remove it")
        splits += [(name if k == 0 else f"{name}{k}", p) for k, p in enumerate(parts)]
    for _, p in splits:
        check_text_file(p)
    return splits


def _identity(cfg: PreprocessConfig, splits: list[tuple[str, str]]) -> dict[str, object]:
    """What a resumed run must share with the interrupted one: every setting but the workers and the progress
    display (neither changes a byte), and each input file's path, size and modification time."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("workers", "progress")}
    files = [cfg.srcdict] if cfg.srcdict else []
    files += [p for _, p in splits]
    stats = [(os.path.abspath(f), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    return {"settings": settings, "splits": splits, "files": stats}


def _resumable(work: Path, identity: dict[str, object]) -> dict:
    """The progress an interrupted run of the same command left in ``work`` ({"parts": [], ...} if none); any
    other content of ``work`` is removed."""
    try:
        state = json.loads((work / PROGRESS).read_text())
        if state.get("identity") == json.loads(json.dumps(identity)):
            return state
    except (OSError, ValueError):
        pass
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    state = {"identity": identity, "parts": [], "log": []}
    atomic_write_json(work / PROGRESS, state)
    return state


def _record(work: Path, state: dict, part: str, log: list[str]) -> None:
    state["parts"].append(part)
    state["log"] = list(log)
    atomic_write_json(work / PROGRESS, state)


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
        stamp = time.strftime("stale-%Y%m%d-%H%M%S")
        aside = dest / stamp
        k = 1
        while aside.exists():  # twice within one second: another name, not a failure after all the work
            aside, k = dest / f"{stamp}-{k}", k + 1
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
