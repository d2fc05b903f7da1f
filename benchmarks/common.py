"""Shared helpers for the benchmark scripts: timing subprocesses with peak RSS, the machine's matmul peak,
and counting a model's real FLOPs with torch's FlopCounterMode."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIXTURE = SHARED / "fixtures" / "fairseq-tiny"


def run(cmd: list[str], env: dict | None = None, cwd: str | None = None) -> dict:
    """Run a command; wall seconds, peak RSS (MiB) of the process tree's largest member, stdout/stderr."""
    t0 = time.time()
    wrapped = ["/usr/bin/time", "-f", "MAXRSS_KB=%M"] + cmd if os.path.exists("/usr/bin/time") else cmd
    p = subprocess.run(wrapped, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=cwd)
    wall = time.time() - t0
    rss = None
    for line in p.stderr.splitlines():
        if line.startswith("MAXRSS_KB="):
            rss = int(line.split("=")[1]) / 1024
    if rss is None:
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    if p.returncode != 0:
        sys.stderr.write(p.stdout[-3000:] + p.stderr[-3000:])
        raise SystemExit(f"command failed ({p.returncode}): {' '.join(cmd)}")
    return {"wall": wall, "rss_mib": rss, "stdout": p.stdout, "stderr": p.stderr}


def matmul_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 2.0) -> float:
    """Measured FLOP/s of an n x n matmul in ``dtype`` on this machine (all threads): the faster of PyTorch's
    default GEMM (MKL for fp32) and oneDNN's, which our CPU kernels use for fp32 linears (on AMD CPUs MKL's fp32
    path runs at about half of oneDNN's, so MKL alone would understate the peak and overstate MFU)."""
    from adaptive_lm.core.kernels import OneDNNLinears

    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    ways = [lambda: a @ b]
    if dtype == torch.float32 and OneDNNLinears.available():
        bt = b.t().contiguous()
        ways.append(lambda: torch.ops.mkldnn._linear_pointwise(a, bt, None, "none", [], ""))
    best = 0.0
    for f in ways:
        for _ in range(3):
            f()
        it, t0 = 0, time.time()
        while time.time() - t0 < seconds:
            f()
            it += 1
        best = max(best, 2 * n**3 * it / (time.time() - t0))
    return best


def machine() -> dict:
    """The machine a figure came from: CPU model and instruction sets (native bf16 or not), PyTorch's kernel level,
    cores, GPU if any."""
    from adaptive_lm.core.hardware import describe

    return {**describe(), "cores": os.cpu_count(), "python": platform.python_version()}


def portable(obj: Any) -> Any:
    """``obj`` with this machine's absolute paths made relative: the repo as ``.``, ``../shared`` as itself, the
    home folder as ``~`` and the temporary folder as ``$TMPDIR``, so a committed result names no one's disk."""
    if isinstance(obj, dict):
        return {k: portable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [portable(v) for v in obj]
    if not isinstance(obj, str):
        return obj
    for prefix, short in ((str(REPO.parent / "shared"), "../shared"), (str(REPO), "."),
                          (tempfile.gettempdir(), "$TMPDIR"), (str(Path.home()), "~")):  # fmt: skip
        obj = obj.replace(prefix, short)
    return obj


def save(name: str, data: dict) -> Path:
    out = REPO / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(portable(data), indent=2))
    return path


def table(rows: list[dict], cols: list[str]) -> str:
    w = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    lines = [" | ".join(c.ljust(w[c]) for c in cols), "-|-".join("-" * w[c] for c in cols)]
    lines += [" | ".join(str(r.get(c, "")).ljust(w[c]) for c in cols) for r in rows]
    return "\n".join(lines)
