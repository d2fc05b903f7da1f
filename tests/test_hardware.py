"""Honest precision: a CPU without native bf16/fp16 is detected from its flags and the user is told, with the
slowdown measured on the spot. ``ATEN_CPU_CAPABILITY=avx2`` changes PyTorch's kernels, not the CPU's flags, so
these tests feed the detector another machine's /proc/cpuinfo (``ADAPTIVE_LM_CPUINFO``) instead, and the CLI test
caps oneDNN at AVX2 (``ONEDNN_MAX_CPU_ISA``) so that its bf16 matmuls really are emulated and the measured slowdown
is the AVX2 machine's (59x on an AVX512-BF16 EPYC capped so; 0.3x uncapped)."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from adaptive_lm.core.corpus import Corpus
from adaptive_lm.core.hardware import cpu_flags, cpu_model, half_precision_notice, isa_summary, native_half

EPYC_AVX2 = """processor	: 0
vendor_id	: AuthenticAMD
model name	: AMD EPYC 7B12 64-Core Processor
flags		: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr sse sse2 ht syscall avx f16c avx2 fma bmi1 bmi2 sha_ni
"""
SAPPHIRE_RAPIDS = """model name	: Intel(R) Xeon(R) Platinum 8480+
flags		: fpu sse sse2 avx avx2 fma avx512f avx512bw avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8
"""
GRAVITON3 = """processor	: 0
BogoMIPS	: 2100.00
Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm sve bf16 i8mm
CPU implementer	: 0x41
"""


def test_flags_and_native_half_from_cpuinfo():
    assert not native_half(torch.bfloat16, EPYC_AVX2) and not native_half(torch.float16, EPYC_AVX2)
    assert native_half(torch.bfloat16, SAPPHIRE_RAPIDS) and native_half(torch.float16, SAPPHIRE_RAPIDS)
    assert native_half(torch.bfloat16, GRAVITON3) and native_half(torch.float16, GRAVITON3)
    assert "avx2" in cpu_flags(EPYC_AVX2) and cpu_model(EPYC_AVX2) == "AMD EPYC 7B12 64-Core Processor"
    assert isa_summary(SAPPHIRE_RAPIDS) == "avx2 fma avx512f avx512_bf16 avx512_fp16 amx_bf16"


def test_the_notice_names_the_cpu_and_the_measured_slowdown():
    note = half_precision_notice(torch.bfloat16, EPYC_AVX2)
    assert (
        note is not None and "AMD EPYC 7B12" in note and "bf16 is emulated here" in note and "x as long as fp32" in note
    )
    assert half_precision_notice(torch.bfloat16, SAPPHIRE_RAPIDS) is None
    assert note.endswith("drop --bf16 and run in fp32")  # generate, eval, score: not "train"
    amp = half_precision_notice(torch.float16, EPYC_AVX2, flag="--amp", work="train")
    assert amp is not None and amp.endswith("drop --amp and train in fp32")  # it had said --fp16 to an --amp run


def test_train_and_eval_say_it_at_the_start(tmp_path):
    Corpus(vocab=200, states=4, seed=1).write(tmp_path / "train.txt", 2000)
    info = tmp_path / "cpuinfo"
    info.write_text(EPYC_AVX2)
    env = dict(os.environ, ADAPTIVE_LM_CPUINFO=str(info), ONEDNN_MAX_CPU_ISA="AVX2", OMP_NUM_THREADS="1")
    cli = [sys.executable, "-m", "adaptive_lm"]
    subprocess.run([*cli, "preprocess", "--trainpref", str(tmp_path / "train.txt"), "--destdir",
                    str(tmp_path / "bin")], check=True, capture_output=True, env=env)  # fmt: skip
    r = subprocess.run([*cli, "train", str(tmp_path / "bin"), "--arch", "tiny", "--max-tokens", "128",
                        "--tokens-per-sample", "32", "--max-update", "1", "--bf16", "--save-dir", str(tmp_path / "s")],
                       capture_output=True, text=True, env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    first = r.stdout.splitlines()[0]
    assert "has no native bf16" in first and "drop --bf16 and train in fp32" in first
    assert float(first.split("takes ")[1].split("x as long")[0]) > 2  # emulated bf16 is slower than fp32
    model = str(tmp_path / "s" / "checkpoint_last.pt")
    r = subprocess.run([*cli, "eval", str(tmp_path / "bin"), "--path", model, "--gen-subset", "train", "--bf16",
                        "--quiet"], capture_output=True, text=True, env=env)  # fmt: skip
    assert r.returncode == 0 and "has no native bf16" in r.stderr, r.stderr


def test_keep_freed_memory_sets_glibc_and_respects_the_users_own_setting(monkeypatch):
    """The allocator setting every command applies: taken on glibc Linux (this suite's platform), left alone when the
    user chose glibc's thresholds themselves (their environment wins)."""
    import platform

    from adaptive_lm.core.malloc import keep_freed_memory

    assert keep_freed_memory() is (platform.libc_ver()[0] == "glibc")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert keep_freed_memory() is False
