"""Shared test fixtures: paths to the fairseq ground truth in ../shared, tiny models, clean global state."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIXTURE = SHARED / "fixtures" / "fairseq-tiny"
WIKITEXT2 = SHARED / "data" / "wikitext-2"

torch.set_num_threads(2)


def need(path: Path) -> Path:
    """Skip (with the reason shown by -ra) when the shared ground truth is absent."""
    if not path.exists():
        pytest.skip(f"needs {path} (the shared fairseq fixtures / data next to the repo checkout)")
    return path


def assert_same_draws(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    """Initial weights drawn by fairseq (committed, made on AVX2/AVX-512 machines) against ours for the same seed.

    Bit for bit wherever ATen runs its vectorised kernels (AVX2 and AVX-512 give identical bits). Under
    ATEN_CPU_CAPABILITY=default ATen's scalar kernels map the *same* random bits to values through differently
    rounded arithmetic -- fairseq itself draws these values there (checked: make_fairseq_init.py run under
    ATEN_CPU_CAPABILITY=default differs from the committed file in 99 of 212 tensors, and matches ours bit for bit
    under the same setting) -- so a wrong draw order (an O(std) change)
    is still caught while the rounding is allowed for: uniform_ is a + (b - a) * u, which rounds once more or less
    (< 2 eps * max|v|); normal_ is Box-Muller, std * sqrt(-2 ln u1) * cos(2 pi u2), where the radius reaches
    sqrt(2 ln 2**24) = 5.8 and log, cos and the 2 pi product each differ by an ulp or two: at most about
    5.8 * (2 pi + 2) + 12 = 60 eps * std, and max|v| > std for any tensor of 16+ draws (the vectorised path).
    """
    if torch.backends.cpu.get_cpu_capability() != "DEFAULT":
        assert torch.equal(ours, theirs), what
        return
    bound = 64 * torch.finfo(theirs.dtype).eps * float(theirs.abs().max())
    torch.testing.assert_close(ours, theirs, rtol=0, atol=bound, msg=lambda m: f"{what}: {m}")


@pytest.fixture
def fixture_dir() -> Path:
    return need(FIXTURE)


@pytest.fixture
def wikitext2() -> Path:
    return need(WIKITEXT2)


@pytest.fixture(autouse=True)
def _clean_state():
    dtype = torch.get_default_dtype()
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(dtype)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
