"""Shared test fixtures: the committed fairseq ground truth (tests/fixtures), tiny models, clean global state, and
no skipped test but the GPU-only ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures"
FAIRSEQ_TINY = FIXTURES / "fairseq_tiny"  # made by fixtures/make_fairseq_tiny.sh with fairseq itself

# the model overrides of a plain output layer (no adaptive input or softmax) on the tiny preset, used by several tests
PLAIN_OUTPUT_LAYER = dict(
    adaptive_input=False,
    tie_adaptive_weights=False,
    tie_adaptive_proj=False,
    adaptive_softmax_cutoff=None,
    decoder_output_dim=24,
)

torch.set_num_threads(2)


def pytest_configure(config: pytest.Config) -> None:
    """The session's own cache (downloads, the measured linear-library choices): nothing of the user's ~/.cache is
    read or written, and subprocesses the tests start share the session's choices."""
    import os
    import tempfile

    os.environ.setdefault("ADAPTIVE_LM_CACHE", tempfile.mkdtemp(prefix="adaptive-lm-test-cache-"))


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
    return FAIRSEQ_TINY


def decoded_text(data_bin: Path, split: str, lines: int) -> str:
    """The first ``lines`` lines of a binarised split as WikiText-format text (` w1 w2 ... `, <unk> for the words
    outside the dictionary), exactly as fixtures/make_fairseq_tiny.py decode writes fairseq-preprocess's input."""
    from adaptive_lm.core.data import IndexedDataset
    from adaptive_lm.core.dictionary import Dictionary

    ds = IndexedDataset(data_bin / split)
    symbols = np.array(Dictionary.load(data_bin / "dict.txt").symbols)
    return "".join("".join(f" {w}" for w in symbols[ds[i][:-1]]) + " \n" for i in range(lines))


@pytest.fixture(scope="session")
def wikitext2(tmp_path_factory) -> Path:
    """WikiText-format text made back from the fixture's data-bin (300 train and 200 valid lines): the input of
    fixtures/fairseq_tiny/preprocess/, which fairseq-preprocess made from the same text (no WikiText-2 text is
    committed)."""
    d = tmp_path_factory.mktemp("wikitext2")
    for split, lines in (("train", 300), ("valid", 200)):
        (d / f"{split}.txt").write_text(decoded_text(FAIRSEQ_TINY / "data-bin", split, lines), encoding="utf-8")
    return d


@pytest.fixture(autouse=True)
def _clean_state():
    dtype = torch.get_default_dtype()
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(dtype)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ---- nothing skips except what needs a GPU ---------------------------------------------------------------------
_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail") and "gpu" not in report.keywords:
        _skipped.append(f"{report.nodeid}: {report.longrepr[-1] if isinstance(report.longrepr, tuple) else ''}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A skipped test is a failed run unless the test is marked ``gpu`` (needs a CUDA device): every fixture is
    committed and every extra is part of the dev install, so a skip can only mean something is missing."""
    if _skipped and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter) -> None:
    if _skipped:
        terminalreporter.section("skipped tests not marked gpu (a failure)", red=True)
        for line in _skipped:
            terminalreporter.line(line)
