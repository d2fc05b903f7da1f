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
