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


# (M, K, N) products timed for the peak: square ones and the (tokens x d) x (d x 4d) shapes of training, where MKL
# under the AVX2 caps on an Intel Xeon ran 10% faster than at 2048^2 (that peak put a medium run at 103% MFU)
PEAK_SHAPES = ((2048, 2048, 2048), (1024, 1024, 1024), (2048, 512, 2048), (2048, 512, 1536), (2048, 2048, 512))


def matmul_peak(dtype: torch.dtype, seconds: float = 1.0) -> float:
    """Measured FLOP/s of matmuls in ``dtype`` on this machine (all threads): the best over ``PEAK_SHAPES`` of
    PyTorch's default GEMM (MKL for fp32) and oneDNN's, which our CPU kernels use for fp32 linears (on AMD CPUs MKL's
    fp32 path runs at about half of oneDNN's, so MKL alone would understate the peak and overstate MFU)."""
    from adaptive_lm.core.kernels import FastLinears

    best = 0.0
    for m, k, n in PEAK_SHAPES:
        a = torch.randn(m, k, dtype=dtype)
        w = torch.randn(n, k, dtype=dtype)  # (out, in), as a linear's weight
        wt = w.t().contiguous()
        ways = [lambda a=a, wt=wt: a @ wt]
        if dtype == torch.float32 and FastLinears.available():
            ways.append(lambda a=a, w=w: torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [], ""))
        for f in ways:
            for _ in range(3):
                f()
            it, t0 = 0, time.time()
            while time.time() - t0 < seconds:
                f()
                it += 1
            best = max(best, 2 * m * k * n * it / (time.time() - t0))
    return best


def flop_counter() -> Any:
    """torch's FlopCounterMode, also counting the CPU's fused attention: torch registers formulas for the CUDA
    flash / efficient / cuDNN kernels only, so on a CPU ``F.scaled_dot_product_attention`` (which dispatches to
    ``_scaled_dot_product_flash_attention_for_cpu``) counted 0 FLOPs, forward and backward."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten

    def fwd(q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return sdpa_flop_count(q, k, v)

    def bwd(grad_out: Any, q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return sdpa_backward_flop_count(grad_out, q, k, v)

    mapping = {aten._scaled_dot_product_flash_attention_for_cpu: fwd}
    mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = bwd
    return FlopCounterMode(display=False, custom_mapping=mapping)


def counted_flops(fn: Any) -> float:
    """FLOPs of ``fn()`` as torch's FlopCounterMode counts them (matmuls and attention, ``flop_counter``), run once
    on the plain kernels: our oneDNN linears are calls the counter cannot see, with the same shapes. Attention is
    counted as the full T x T products (the counter's convention, and what our stored-probability kernels compute),
    so for a kernel that skips the masked half MFU reads high and the bound low by up to half the attention's
    share."""
    from adaptive_lm.core.kernels import plain_kernels

    with plain_kernels(), flop_counter() as fc:
        fn()
    return float(fc.get_total_flops())


def roofline(flops: float, seconds: float, peak: float, baseline_seconds: float | None) -> dict:
    """How close a run is to the hardware: MFU (its counted FLOPs per second over the measured matmul peak of the
    dtype that ran) and, given the baseline's time, ``bound``: the speedup over the baseline if those FLOPs ran at
    100% of the peak and nothing else took time. A target above the bound cannot be met with this arithmetic."""
    from adaptive_lm.check.recipe import Peak, mfu

    out: dict = {"gflop": round(flops / 1e9, 1)}
    pct, raised = mfu(flops / seconds / 1e12, Peak(peak / 1e12, "", "benchmarks.common.matmul_peak"))
    if raised:  # the probe ran slow (a busy moment, a shape it missed): the run proves a higher peak
        out["peak_raised_to_gflops"] = round(flops / seconds / 1e9, 1)
        peak = flops / seconds
    out["mfu_%"] = round(pct, 1)
    if baseline_seconds:
        out["bound"] = round(baseline_seconds * peak / flops, 2)
    return out


CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def onednn_isa() -> str:
    """The instruction set oneDNN dispatches to in a fresh process with this environment (its verbose 'isa' line):
    proof that an ``ONEDNN_MAX_CPU_ISA`` cap took effect."""
    code = "import torch; x = torch.randn(8, 8); torch.ops.mkldnn._linear_pointwise(x, x, None, 'none', [], '')"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "ONEDNN_VERBOSE": "1"})  # fmt: skip
    for line in p.stdout.splitlines():
        if ",info,cpu,isa:" in line:
            return line.split("isa:", 1)[1].strip()
    return "unknown"


def cpu_id() -> str:
    """``family F model M`` from /proc/cpuinfo: the generation a bare model name such as "AMD EPYC" hides (AMD family
    25 is Zen 3 below model 16 and Zen 4 from 16; family 26 is Zen 5)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        return "unknown"
    return f"family {fields.get('cpu family', '?')} model {fields.get('model', '?')}"


def machine() -> dict:
    """The machine a figure came from: CPU model and instruction sets (native bf16 or not), the ISA caps in force
    and what ATen and oneDNN dispatch to under them, cores, GPU if any. (MKL takes its AVX2 path on AMD CPUs whatever
    ``MKL_ENABLE_INSTRUCTIONS`` says: it reserves AVX-512 for Intel's.)"""
    from adaptive_lm.core.hardware import describe

    caps = {k: os.environ[k] for k in CAPS if k in os.environ}
    info = {**describe(), "cpu_id": cpu_id(), "cores": os.cpu_count(), "python": platform.python_version()}
    return {**info, "caps": caps or "none", "onednn_isa": onednn_isa()}


def isa_label(info: dict) -> str:
    """``AVX2 caps`` or ``native`` plus what ran, for tables."""
    capped = "AVX2 caps" if info["caps"] != "none" else "no caps"
    return f"{capped}: ATen {info['aten_capability']}, oneDNN {info['onednn_isa']}"


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
    """Write ``results/<name>.json``; every result names the machine it came from (added here when missing) and
    the machine is printed with it."""
    if "machine" not in data:
        data = {"machine": machine(), **data}
    m = data["machine"]
    if m.get("caps", "none") != "none" and not name.endswith("_avx2"):
        name += "_avx2"  # a capped run never overwrites the native figures
    print(f"machine: {m.get('cpu')} ({m.get('cpu_id', '?')}), {m.get('isa')}; caps {m.get('caps', 'none')}")
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
