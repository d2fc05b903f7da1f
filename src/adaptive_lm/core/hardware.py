"""What machine this is: the CPU's model and instruction sets, native half precision, the GPU; for honest messages
and for benchmark records.

Why: bf16 training on a CPU without AVX512-BF16 or AMX (an AMD EPYC with AVX2 only, say) runs its matmuls in
emulation, 20x slower than fp32 on the 14M benchmark, and nothing said so. The detector reads the CPU's flags
(``/proc/cpuinfo``), not PyTorch's dispatch level: ``ATEN_CPU_CAPABILITY=avx2`` changes which ATen kernels run but
neither hides AVX512-BF16 from oneDNN nor from this check. ``ADAPTIVE_LM_CPUINFO=FILE`` reads another machine's
``/proc/cpuinfo`` instead (how the tests show the message on any machine).
"""

from __future__ import annotations

import os
import platform
import time
from functools import lru_cache

import torch

NATIVE = {  # flag names as /proc/cpuinfo spells them (x86 "flags", Arm "Features")
    torch.bfloat16: {"avx512_bf16", "amx_bf16", "bf16"},
    torch.float16: {"avx512_fp16", "amx_fp16", "asimdhp", "fphp"},
}


def _cpuinfo() -> str:
    path = os.environ.get("ADAPTIVE_LM_CPUINFO", "/proc/cpuinfo")
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The instruction-set flags of the first CPU listed."""
    text = _cpuinfo() if cpuinfo is None else cpuinfo
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return set(value.split())
    return set()


def cpu_model(cpuinfo: str | None = None) -> str:
    text = _cpuinfo() if cpuinfo is None else cpuinfo
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("model name", "cpu model", "hardware"):
            return value.strip()
    return platform.processor() or platform.machine()


def native_half(dtype: torch.dtype, cpuinfo: str | None = None) -> bool:
    """Whether the CPU computes ``dtype`` (bf16/fp16) matmuls natively rather than by emulation."""
    return bool(NATIVE.get(dtype, set()) & cpu_flags(cpuinfo))


def isa_summary(cpuinfo: str | None = None) -> str:
    """The instruction sets that matter for our kernels, e.g. ``avx2 avx512f avx512_bf16``."""
    flags = cpu_flags(cpuinfo)
    keep = ["avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16", "asimd", "sve", "bf16"]
    return " ".join(f for f in keep if f in flags) or "unknown"


@lru_cache(maxsize=4)
def measured_slowdown(dtype: torch.dtype, n: int = 384, reps: int = 6) -> float:
    """How many times slower a (n x n) @ (n x n) matmul runs in ``dtype`` than in fp32 on this CPU (best of reps)."""

    def best(dt: torch.dtype) -> float:
        a, b = torch.randn(n, n, generator=torch.Generator().manual_seed(0)).to(dt), torch.ones(n, n, dtype=dt)
        torch.mm(a, b)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - t0)
        return min(times)

    return best(dtype) / max(best(torch.float32), 1e-9)


def half_precision_notice(
    dtype: torch.dtype, cpuinfo: str | None = None, flag: str | None = None, work: str = "run"
) -> str | None:
    """One line for ``--bf16``/``--fp16`` (or the ``flag`` given, e.g. ``--amp``) on a CPU without native support
    (None when it has it); ``work``: what to do in fp32 instead ("train", "run")."""
    if native_half(dtype, cpuinfo):
        return None
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    need = "AVX512-BF16 or AMX" if dtype == torch.bfloat16 else "AVX512-FP16 or AMX-FP16"
    ratio = measured_slowdown(dtype)
    return (
        f"note: this CPU ({cpu_model(cpuinfo)}; {isa_summary(cpuinfo)}) has no native {name} ({need}): {name} is "
        f"emulated here: a {name} matmul takes {ratio:.1f}x as long as fp32 (measured now); drop {flag or '--' + name} "
        f"and {work} in fp32"
    )


def describe() -> dict[str, str]:
    """The machine, for benchmark records: CPU model and ISA, PyTorch's kernel level, threads, GPU."""
    out = {
        "cpu": cpu_model(),
        "isa": isa_summary(),
        "aten_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        out["cuda"] = str(torch.version.cuda)
    return out


def total_memory(device: torch.device) -> int | None:
    """Bytes of memory the device has in all (RAM for the CPU), or None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
