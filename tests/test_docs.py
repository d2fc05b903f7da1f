"""Docs that run (issue 25): every Python and shell block of README.md and docs/*.md is executed on the committed
fixtures, and ``import adaptive_lm`` gives the public submodules lazily.

How a page runs: its fenced ```python blocks with ``exec`` (a fresh namespace each), its ```bash / ```sh blocks with
bash, in order, in one working folder laid out like the root of a clone (``tests/`` and ``src/`` linked,
``benchmarks/*.py`` copied so that a script finds ``../shared`` beside that folder, as in a checkout). Shell variables
carry from one shell block to the next, as for a reader who pastes the blocks into one terminal. Each block is one
test (id ``page:line``); a block first runs the earlier blocks of its page that it may build on.

An HTML comment on the line above a block steers it:

* ``<!-- docs-test: skip (REASON) -->``: not run. The reason must be a download, a CUDA GPU or an install. Such a
  block is no test at all (tests/conftest.py fails a run with any skip): ``test_blocks_not_run_are_exactly_these``
  lists them, so adding one is a visible change.
* ``<!-- docs-test: fixture=NAME (why) -->``: ``SETUPS[NAME]`` first lays out the files (and Python names) the block
  names; the parenthesis says what they are.
* ``<!-- docs-test: check=NAME -->``: ``CHECKS[NAME]`` then asserts what the block's comments promise.
* ``<!-- docs-test: output -->`` above a plain ``` block: it is the output of the block before it; each of its lines
  must be a line of what that block printed. ``output (numbers vary)``: every number and every run of spaces is a
  wildcard (times, and figures computed on other data than the doc's).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from adaptive_lm.core.data import IndexedDataset, IndexedWriter
from conftest import FAIRSEQ_TINY, decoded_text

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RUNNABLE = {"python": "python", "bash": "shell", "sh": "shell"}
NOT_CODE = {"", "text"}  # diagrams, printed output, file excerpts
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
NOTE = re.compile(r"^\s*<!--\s*docs-test:\s*(.*?)\s*-->\s*$")
NOT_RUN_BECAUSE = re.compile(r"(downloads|needs a CUDA GPU|installs packages)\b")

QUICKSTART_REASON = (
    "installs packages: .ci/run runs these commands; the quickstart's 300 updates take a minute, "
    "tests/test_cli.py runs it with 20 updates"
)
# the blocks not run, by page and reason: adding one must change this list
EXPECTED_NOT_RUN = Counter(
    {
        ("README.md", QUICKSTART_REASON): 1,
        ("README.md", "downloads the released wiki103 model"): 2,
        ("docs/knn-lm.md", "downloads the released wiki103 model"): 1,
        ("docs/rescoring.md", "installs packages: the [dev] extra the tests run with includes [asr]"): 1,
        ("docs/rescoring.md", "downloads facebook/wav2vec2-base-960h; needs transformers and soundfile"): 1,
        ("docs/rescoring.md", "downloads openai/whisper-small; needs transformers"): 1,
        ("docs/wikitext103.md", "downloads the released wiki103 model"): 1,
    }
)


@dataclass
class Block:
    page: str  # relative to the repository
    line: int  # of the opening fence
    lang: str
    code: str
    note: str  # the docs-test comment above it, or ""
    expected: list[tuple[str, bool]] = field(default_factory=list)  # (output block, numbers vary)

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"

    def setting(self, key: str) -> str | None:
        m = re.search(rf"(?:^|\s){key}=(\S+)", self.note)
        return m.group(1) if m else None

    @property
    def not_run_because(self) -> str | None:
        m = re.fullmatch(r"skip \((.+)\)", self.note)
        return m.group(1) if m else None


def _comment_above(lines: list[str], i: int) -> str:
    """The last non-blank text above line ``i``, joined into one line if it ends an HTML comment of several lines."""
    j = next((j for j in range(i - 1, -1, -1) if lines[j].strip()), None)
    if j is None:
        return ""
    start = j
    if lines[j].rstrip().endswith("-->"):
        start = next((k for k in range(j, -1, -1) if "<!--" in lines[k]), j)
    return " ".join(line.strip() for line in lines[start : j + 1])


def read_blocks(path: Path) -> list[Block]:
    """The fenced blocks of a markdown page, each with the docs-test comment on the last non-blank line above it;
    an ``output`` block is attached to the runnable block before it."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang = m.groups()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        assert end is not None, f"{path}:{i + 1}: unclosed code block"
        code = "\n".join(line[len(indent) :] for line in lines[i + 1 : end]) + "\n"
        note = NOTE.match(_comment_above(lines, i))
        out.append(Block(str(path.relative_to(REPO)), i + 1, lang, code, note.group(1) if note else ""))
        i = end + 1
    for k, b in enumerate(out):
        if b.note.startswith("output"):
            assert b.lang in NOT_CODE and b.note in ("output", "output (numbers vary)"), f"{b.id}: {b.note!r}"
            runs = [a for a in out[:k] if a.lang in RUNNABLE]
            assert runs, f"{b.id}: an output block with no block before it"
            runs[-1].expected.append((b.code, b.note.endswith("(numbers vary)")))
    return out


ALL = [b for page in PAGES for b in read_blocks(page)]
RUN = [b for b in ALL if b.lang in RUNNABLE and b.not_run_because is None]
NOT_RUN = [b for b in ALL if b.lang in RUNNABLE and b.not_run_because is not None]


# ---- the prepared working folder --------------------------------------------------------------------------------
RECIPE_SHRINK = (
    "--max-update 1 --decoder-layers 1 --decoder-embed-dim 32 --decoder-ffn-embed-dim 64 --decoder-attention-heads 2 "
    "--adaptive-input-cutoff 1000,2000 --adaptive-softmax-cutoff 1000,2000 --tokens-per-sample 64 --max-tokens 512"
)
FUSION_SENTENCE = "the song was released in the united states"
FUSION_LABELS = ["", " ", *"ABCDEFGHIJKLMNOPQRSTUVWXYZ"]  # blank, word boundary, upper-case letters


def _model_files(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(FAIRSEQ_TINY / "model" / "checkpoint_last.pt", folder / "model.pt")
    shutil.copy(FAIRSEQ_TINY / "model" / "dict.txt", folder / "dict.txt")


def setup_tiny(root: Path, work: Path, block: Block) -> dict:
    """``data-bin/x``: the fixture's continuation text (1,931 tokens, the model's dictionary) as train, its first
    8 lines as valid; ``model.pt`` + ``dict.txt``: the fixture model."""
    _model_files(work)
    data = work / "data-bin" / "x"
    data.mkdir(parents=True)
    source = FAIRSEQ_TINY / "continue" / "data-bin"
    shutil.copy(source / "dict.txt", data / "dict.txt")
    for ext in (".bin", ".idx"):
        shutil.copy(source / f"train{ext}", data / f"train{ext}")
    train = IndexedDataset(source / "train")
    lines = [np.asarray(train[i]) for i in range(8)]
    w = IndexedWriter(data / "valid", train.dtype)
    w.add_array(np.concatenate(lines), np.array([len(t) for t in lines]))
    w.finalize()
    return {}


def setup_wikitext103_text(root: Path, work: Path, block: Block) -> dict:
    """``wiki.{train,valid,test}.tokens``: WikiText-format text of the fixture's data-bin (300 train lines; valid
    lines 1-100 and 101-200)."""
    (work / "wiki.train.tokens").write_text(decoded_text(FAIRSEQ_TINY / "data-bin", "train", 300), encoding="utf-8")
    valid = decoded_text(FAIRSEQ_TINY / "data-bin", "valid", 200).splitlines(keepends=True)
    (work / "wiki.valid.tokens").write_text("".join(valid[:100]), encoding="utf-8")
    (work / "wiki.test.tokens").write_text("".join(valid[100:]), encoding="utf-8")
    return {}


def setup_recipe_1_update(root: Path, work: Path, block: Block) -> dict:
    """The recipe on section 1's data-bin for one update of a small model: every ``adaptive-lm`` of the block gets
    RECIPE_SHRINK appended (the last value of a flag wins), which the comment above the block must spell out."""
    assert RECIPE_SHRINK in " ".join(block.note.split()), f"{block.id}: the comment must name the flags appended"
    return {"env": {"DOCS_TEST_APPEND": RECIPE_SHRINK}}


def setup_rescore(root: Path, work: Path, block: Block) -> dict:
    """``../shared/data/wikitext-2/valid.txt`` beside the working folder: the fixture's 400 valid lines."""
    folder = root / "shared" / "data" / "wikitext-2"
    folder.mkdir(parents=True)
    (folder / "valid.txt").write_text(decoded_text(FAIRSEQ_TINY / "data-bin", "valid", 400), encoding="utf-8")
    return {}


def setup_fusion(root: Path, work: Path, block: Block) -> dict:
    """``lm/model.pt``: the fixture model; ``labels``: upper-case CTC labels; ``logits``: (frames, labels)
    log-posteriors spelling FUSION_SENTENCE, each character (p 0.96) then a blank frame."""
    _model_files(work / "lm")
    index = {c: i for i, c in enumerate(FUSION_LABELS)}
    rows = []
    for ch in FUSION_SENTENCE.upper():
        for j in (index[ch], 0):
            p = np.full(len(FUSION_LABELS), 0.04 / (len(FUSION_LABELS) - 1))
            p[j] = 0.96
            rows.append(p)
    return {"ns": {"labels": list(FUSION_LABELS), "logits": np.log(np.array(rows))}}


SETUPS: dict[str, Callable[[Path, Path, Block], dict]] = {
    "tiny": setup_tiny,
    "generation": lambda root, work, block: {},  # tests/generation/models/: the working folder links tests/
    "wikitext103-text": setup_wikitext103_text,
    "recipe-1-update": setup_recipe_1_update,
    "rescore": setup_rescore,
    "fusion": setup_fusion,
}


# ---- what a block's comments promise ----------------------------------------------------------------------------
def check_wiki103_model(ns: dict) -> None:
    """README: the preset's parameter count and the shapes in the comments; ``loss`` is the summed NLL that
    ``target_log_probs`` gives (dropout off so that the two calls see the same model; float32 sum of 4 terms)."""
    model, src, tgt = ns["model"], ns["src"], ns["tgt"]
    assert sum(p.numel() for p in model.parameters()) == 246_933_504
    assert ns["features"].shape == (1, 4, 1024)
    model.eval()
    with torch.no_grad():
        assert model.log_probs(src).shape == (1, 4, 267_744)
        lp = model.target_log_probs(src, tgt)  # (1, 4)
        assert lp.shape == (1, 4)
        torch.testing.assert_close(model.loss(src, tgt), -lp.sum(), rtol=1e-6, atol=0)


def check_rescore_column(ns: dict) -> None:
    """docs/rescoring.md: the Python API gives the lm_logprob column the command wrote (printed with 6 decimals;
    batched with other hypotheses there, so float32 sums of ~12 terms of a few nats differ by a few 1e-6)."""
    np.testing.assert_allclose(ns["ln_p"], [-60.071964, -50.764082], rtol=0, atol=1e-5)
    assert ns["ln_p"].dtype == np.float64


def check_knn_api(ns: dict) -> None:
    """docs/knn-lm.md: ``lm.score(knn=)`` is ``knn_score``, and the lower-level path gives the same interpolated
    scores for the scored positions (all but the final ``</s>``), in float64 vs the hub's float32 rows."""
    from adaptive_lm.inference.knn import knn_score

    r = ns["r"]
    again = knn_score(ns["lm"], "Barack Obama was born in Hawaii .", ns["knn"], lmbda=0.25)
    torch.testing.assert_close(again["positional_scores"], r["positional_scores"], rtol=0, atol=0)
    n = len(r["positional_scores"])
    np.testing.assert_allclose(np.asarray(ns["lp"][:n]), r["positional_scores"].double().numpy(), atol=1e-5)
    assert np.isclose(float(ns["ppl"]), float(np.exp(-r["positional_scores"].double().mean())), rtol=1e-6)


def check_fusion(ns: dict) -> None:
    """docs/rescoring.md: the decoder spells the sentence back in the labels' (upper-case) spelling."""
    assert ns["text"] == FUSION_SENTENCE.upper()
    assert ns["beams"][0][0] == FUSION_SENTENCE.upper()


CHECKS: dict[str, Callable[[dict], None]] = {
    "wiki103-model": check_wiki103_model,
    "rescore-column": check_rescore_column,
    "knn-api": check_knn_api,
    "fusion": check_fusion,
}


# ---- running a page ---------------------------------------------------------------------------------------------
class Page:
    """One page's working folder and the outputs of its blocks run so far."""

    def __init__(self, root: Path) -> None:
        self.root, self.work, self.bin = root, root / "work", root / "bin"
        self.env_file = root / "shell.env"
        self.outputs: dict[int, str] = {}
        self.failed: str | None = None
        self.work.mkdir()
        for name in ("tests", "src"):
            (self.work / name).symlink_to(REPO / name)
        (self.work / "benchmarks").mkdir()
        for script in (REPO / "benchmarks").glob("*.py"):
            shutil.copy(script, self.work / "benchmarks" / script.name)
        self.bin.mkdir()
        for name in ("python", "python3"):
            (self.bin / name).symlink_to(sys.executable)
        cli = self.bin / "adaptive-lm"  # the console script of this interpreter; DOCS_TEST_APPEND: see SETUPS
        cli.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m adaptive_lm "$@" $DOCS_TEST_APPEND\n')
        cli.chmod(0o755)

    def run(self, block: Block) -> str:
        if self.failed:
            raise AssertionError(f"an earlier block of this page failed: {self.failed}")
        try:
            extras = SETUPS[block.setting("fixture")](self.root, self.work, block) if block.setting("fixture") else {}
            out = self._python(block, extras) if RUNNABLE[block.lang] == "python" else self._shell(block, extras)
        except BaseException:
            self.failed = block.id
            raise
        self.outputs[block.line] = out
        return out

    def _python(self, block: Block, extras: dict) -> str:
        ns = {"__name__": "__main__", **extras.get("ns", {})}
        buf, here = io.StringIO(), os.getcwd()
        os.chdir(self.work)
        try:
            with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
                exec(compile(block.code, block.id, "exec"), ns)
        finally:
            os.chdir(here)
        if block.setting("check"):
            CHECKS[block.setting("check")](ns)
        return buf.getvalue()

    def _shell(self, block: Block, extras: dict) -> str:
        script = self.root / f"block{block.line}.sh"
        script.write_text(
            "set -eo pipefail\nset -a\n"  # every assignment exported: the next block sources them
            f'[ -f "{self.env_file}" ] && . "{self.env_file}"\ncd "{self.work}"\n'
            f'{block.code}\nunset DOCS_TEST_APPEND\nexport -p > "{self.env_file}"\n'
        )
        env = {
            **os.environ,
            "PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}",
            "ADAPTIVE_LM_CACHE": str(self.root / "cache"),  # never the user's cache
            **extras.get("env", {}),
        }
        p = subprocess.run(
            ["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600
        )
        assert p.returncode == 0, f"{block.id} exited with {p.returncode}:\n{p.stdout[-4000:]}"
        return p.stdout


@pytest.fixture(scope="session")
def pages(tmp_path_factory) -> dict[str, Page]:
    class Pages(dict):
        def __missing__(self, page: str) -> Page:
            self[page] = Page(tmp_path_factory.mktemp(re.sub(r"\W", "_", page)))
            return self[page]

    return Pages()


def _pattern(line: str, numbers_vary: bool) -> re.Pattern:
    parts = re.split(r"(\d[\d,]*(?:\.\d+)?)", " ".join(line.split()))
    if not numbers_vary:
        return re.compile(re.escape("".join(parts)))
    return re.compile("".join(r"-?[\d,]+(?:\.\d+)?" if k % 2 else re.escape(s) for k, s in enumerate(parts)))


@pytest.mark.parametrize("block", RUN, ids=[b.id for b in RUN])
def test_block_runs(block: Block, pages: dict[str, Page]) -> None:
    page = pages[block.page]
    for earlier in RUN:  # what this block may build on: the files and variables of the page's earlier blocks
        if earlier.page == block.page and earlier.line < block.line and earlier.line not in page.outputs:
            page.run(earlier)
    out = page.run(block)
    printed = [" ".join(line.split()) for line in out.splitlines()]
    for text, numbers_vary in block.expected:
        for line in filter(str.strip, text.splitlines()):
            pat = _pattern(line, numbers_vary)
            assert any(pat.fullmatch(p) for p in printed), f"documented line not printed: {line!r}\n{out[-4000:]}"


def test_every_block_is_known() -> None:
    """A code block in a language this test does not run would be silently untested: only these exist, and every
    docs-test comment names a known setup or check (a typo would otherwise run nothing)."""
    assert {b.lang for b in ALL} <= {*RUNNABLE, *NOT_CODE}, {b.id: b.lang for b in ALL}
    for b in ALL:
        if b.note and not b.note.startswith("output") and b.not_run_because is None:
            assert b.lang in RUNNABLE, f"{b.id}: docs-test comment on a block that does not run"
            assert re.fullmatch(r"((fixture|check)=\S+\s*)+(\(.+\))?", b.note), f"{b.id}: {b.note!r}"
            assert b.setting("fixture") in (None, *SETUPS), f"{b.id}: unknown fixture in {b.note!r}"
            assert b.setting("check") in (None, *CHECKS), f"{b.id}: unknown check in {b.note!r}"
    assert len(RUN) >= 10  # the parser found the blocks (10 when this was written)


def test_blocks_not_run_are_exactly_these() -> None:
    """Only a download, a GPU or an install keeps a block from running, and the list is written down here."""
    for b in NOT_RUN:
        assert NOT_RUN_BECAUSE.match(b.not_run_because), f"{b.id}: not a reason to leave it unrun: {b.note!r}"
    assert Counter((b.page, b.not_run_because) for b in NOT_RUN) == EXPECTED_NOT_RUN


def test_import_adaptive_lm_gives_the_submodules_lazily() -> None:
    """``import adaptive_lm`` imports neither torch nor a submodule; ``adaptive_lm.knn`` etc. are the modules of
    the restructured tree, imported on first use and listed by ``dir``."""
    code = """
import sys
import adaptive_lm
public = {"knn": "knn", "rescore": "rescore", "fusion": "fusion", "generate": "generate", "evaluate": "evaluate",
          "convert": "convert"}
assert "torch" not in sys.modules, "import adaptive_lm imported torch"
loaded = sorted(m for m in sys.modules if m.startswith("adaptive_lm."))
assert not loaded, loaded
for short, name in public.items():
    assert short in dir(adaptive_lm), short
    full = "adaptive_lm.inference." + name
    mod = getattr(adaptive_lm, short)
    assert mod is sys.modules[full], (short, mod)
    assert adaptive_lm.__dict__[short] is mod  # a plain attribute from then on
from adaptive_lm import knn
assert knn.KNN is sys.modules["adaptive_lm.inference.knn"].KNN
print("ok")
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stdout + p.stderr
