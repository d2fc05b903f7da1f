"""Environment checks: the machine (torch, CPU, threads) and the GPU (CUDA, cuDNN, NCCL, fused attention, bf16)."""

from __future__ import annotations

import platform
from typing import Any

import torch

from adaptive_lm.check.context import NO_CUDA, PASS, Ctx, Record, skip, verdict
from adaptive_lm.core import hardware

# datasheet dense bf16 tensor-core peaks (TFLOP/s, no sparsity), by a substring of the device name; first match.
# Shown for reference only: MFU is measured against a matmul timed on the machine (check.recipe).
BF16_PEAK_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0)]


def datasheet_bf16_tflops(name: str) -> float | None:
    for key, tflops in BF16_PEAK_TFLOPS:
        if key.lower() in name.lower():
            return tflops
    return None


def check_machine(ctx: Ctx) -> Record:
    m = hardware.describe()
    figs = {**m, "python": platform.python_version(), "cuda_available": torch.cuda.is_available(), "mode": ctx.mode}
    gpu = f", {m['gpu']} (CUDA {m['cuda']})" if "gpu" in m else ", no CUDA device"
    return Record(PASS, f"torch {torch.__version__}, {m['cpu']} [{m['isa']}], {m['threads']} threads{gpu}", figs)


def sdpa_flags() -> dict[str, Any]:
    flags = dict(
        flash_sdp_enabled=torch.backends.cuda.flash_sdp_enabled(),
        mem_efficient_sdp_enabled=torch.backends.cuda.mem_efficient_sdp_enabled(),
        cudnn_sdp_enabled=torch.backends.cuda.cudnn_sdp_enabled(),
        math_sdp_enabled=torch.backends.cuda.math_sdp_enabled(),
    )
    if hasattr(torch.backends.cuda, "is_flash_attention_available"):
        flags["flash_attention_available"] = torch.backends.cuda.is_flash_attention_available()
    return flags


def nccl_version() -> str:
    try:
        v = torch.cuda.nccl.version()
        return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    except Exception as e:  # noqa: BLE001 - informational
        return f"unavailable ({type(e).__name__})"


def check_gpu_features(ctx: Ctx) -> Record:
    if not ctx.cuda:
        return skip(NO_CUDA, sdpa_flags=sdpa_flags())
    props = torch.cuda.get_device_properties(0)
    figs = dict(gpu=props.name, gpus=torch.cuda.device_count(), memory_gib=round(props.total_memory / 2**30, 1),
                capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version(), nccl=nccl_version(),
                bf16_supported=torch.cuda.is_bf16_supported(),
                datasheet_bf16_peak_tflops=datasheet_bf16_tflops(props.name), **sdpa_flags())  # fmt: skip
    fused = figs.get("flash_attention_available", True) or figs["mem_efficient_sdp_enabled"]
    ok = figs["bf16_supported"] and fused
    why = "" if ok else "no bf16 support" if not figs["bf16_supported"] else "no fused attention kernel"
    summary = (
        f"{props.name} {figs['memory_gib']} GiB sm{props.major}{props.minor} x{figs['gpus']}, CUDA {figs['cuda']}, "
        f"flash {figs.get('flash_attention_available', '?')}, bf16 {figs['bf16_supported']}"
    )
    return Record(verdict(ok), summary, figs, why)
