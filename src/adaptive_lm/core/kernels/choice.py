"""Which GEMM library runs a given fp32 CPU linear (also which kernel an inference attention of middle length runs,
``attention.BLOCKS_T_MAX``, and training's stored attention's query block, ``attention.stored_block``): measured once
per shape on this machine, then cached on disk.

Why measure: MKL and oneDNN trade places between CPUs and shapes. On an AMD Zen 5, MKL's fp32 path ran at half of
oneDNN's; on a Zen 4 the two are within 10% for square shapes while MKL's ``gy^T @ x`` (a weight gradient, read
transposed in place) beats oneDNN, which needs both operands copied; with few rows (generation's 80 beams) each wins
some shapes. A rule written for one CPU is wrong on the next, so the first time a (kind, rows, in, out) shape runs,
each candidate (both libraries; for a weight gradient also oneDNN's backward-weights primitive) runs it on the real
operands a few times and the one with the fastest median is kept for that shape.

Why a disk cache: the two libraries round differently, so the choice must not change between the processes of one
job (a resumed run must equal an uninterrupted one bit for bit, two ranks must compute alike). Choices are keyed by
the machine (CPU model and flags, threads, PyTorch version, ISA caps) and written atomically to
``$ADAPTIVE_LM_CACHE/kernels/linears-<rule>-<machine>.json``, one process measuring a new shape at a time (a
lock file beside it: ranks that meet a shape together take one choice); every later process on the machine reads
them (a new measuring rule, ``RULE``, starts a new file, so the choices of one job stay those of one rule). Given
the file, the numbers are deterministic. ``ADAPTIVE_LM_LINEARS=mkl`` or ``onednn`` forces one library (no
measuring; forced oneDNN runs weight gradients through its GEMM, not through the backward-weights primitive a
measurement may pick).

Row counts are rounded to a coarse size (``bucket_rows``) for the key: evaluation and rescoring batches have a new
row count nearly every time, and one measurement per size class is enough.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from adaptive_lm.core.files import atomic_write_json

LIBRARIES = ("mkl", "onednn")
CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
WARMUPS = 2  # untimed runs per library first (oneDNN builds its kernel on the first call)
TRIALS = 5  # timed runs per library, alternating; the medians decide
# The measuring rule's version, part of the file name: a new rule measures afresh instead of reading choices the old
# one made. v2: medians of 5 (v1, the fastest of 3, let one quiet moment of MKL's jittery small GEMMs win: beam
# search's 80-row tail GEMMs had been kept on MKL at 1.1-2x oneDNN's time). v3: weight gradients also try oneDNN's
# backward-weights primitive ("onednn-ip", ``linears.weight_grad_gemm``)
RULE = "v3"


def bucket_rows(n: int) -> int:
    """``n`` rounded up to a power of two up to 64, then to a quarter of the power of two below it (size classes
    with at most 25% between neighbours)."""
    if n <= 64:
        return 1 << max(0, (n - 1).bit_length())
    step = 1 << (n.bit_length() - 3)
    return -(-n // step) * step


def _machine_key() -> str:
    """What a choice depends on: the CPU (model, flags), threads, PyTorch, and the ISA caps in the environment."""
    try:
        info = Path("/proc/cpuinfo").read_text(errors="replace")
        cpu = [line for line in info.splitlines() if line.startswith(("model name", "flags", "cpu family", "model\t"))]
        cpu_text = "\n".join(sorted(set(cpu)))
    except OSError:
        cpu_text = "unknown"
    caps = [f"{k}={os.environ.get(k, '')}" for k in CAPS]
    text = "|".join([cpu_text, str(torch.get_num_threads()), torch.__version__, *caps])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _cache_file() -> Path:
    root = Path(os.environ.get("ADAPTIVE_LM_CACHE", Path.home() / ".cache" / "adaptive-lm"))
    return root / "kernels" / f"linears-{RULE}-{_machine_key()}.json"


class GemmChoice:
    """The per-shape library table of this process: loaded from the machine's file on first use, extended by
    measurement, written back when it grows."""

    def __init__(self) -> None:
        self.table: dict[str, str] | None = None
        self.lock = threading.Lock()

    def _load(self) -> dict[str, str]:
        if self.table is None:
            self.table = _read(_cache_file())
        return self.table

    def pick(
        self, kind: str, rows: int, k: int, n: int, runs: dict[str, Callable[[], Tensor]], linear: bool = True
    ) -> str:
        """The library for this shape: forced by the environment (``linear``: a linear's GEMM library), known, or
        measured now on ``runs`` (each a call of one library, or kernel, on the real operands)."""
        forced = os.environ.get("ADAPTIVE_LM_LINEARS", "measure")
        if linear and forced in LIBRARIES:
            return forced
        key = f"{kind}:{bucket_rows(rows)}x{k}x{n}"
        with self.lock:
            table = self._load()
            if key not in table:
                with _machine_lock():  # another process (a second rank) may be measuring this shape right now
                    table.update(_read(_cache_file()))
                    if key not in table:
                        table[key] = _fastest(runs)
                        self._save()
            return table[key]

    def _save(self) -> None:
        """Write the table, which ``pick`` merged with the file under the lock just before (nothing to re-read)."""
        path = _cache_file()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, dict(self.table or {}))
        except (OSError, ValueError):  # a read-only home: the choices still hold for this process
            pass

    def forget(self) -> None:
        """Drop the loaded table (tests, or after changing ``ADAPTIVE_LM_CACHE``)."""
        with self.lock:
            self.table = None


def _read(path: Path) -> dict[str, str]:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def _machine_lock() -> Iterator[None]:
    """Measure and record a new shape in one process at a time. Two ranks (or two jobs) that met the same new shape
    together each measured it and could keep different libraries: the ranks then rounded differently for the rest
    of the run, and a resumed run (reading the one choice the file kept) differed from the uninterrupted one. Under
    this lock the second process re-reads the file and takes the first one's choice. Where no lock can be taken (a
    read-only cache folder, no ``fcntl``), each process measures for itself as before."""
    try:
        import fcntl

        path = _cache_file().with_suffix(".lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a")  # noqa: SIM115 - held for the block below
    except (ImportError, OSError):
        yield
        return
    try:
        with contextlib.suppress(OSError):  # a file system without locks: measure anyway
            fcntl.flock(f, fcntl.LOCK_EX)
        yield
    finally:
        f.close()  # releases the lock


def _fastest(runs: dict[str, Callable[[], Tensor]]) -> str:
    """The library whose median of ``TRIALS`` runs is fastest (runs alternate, so a busy moment hits both; the
    median, not the best run, because a step meets a library's typical time, not its luckiest)."""
    with torch.no_grad():
        for _ in range(WARMUPS):
            for f in runs.values():
                f()
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(TRIALS):
            for name, f in runs.items():
                t0 = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t0)
    return min(times, key=lambda name: sorted(times[name])[len(times[name]) // 2])


CHOICE = GemmChoice()
