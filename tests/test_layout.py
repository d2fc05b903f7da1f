"""The package's rules that a reader relies on (docs/architecture.md), checked on the source itself: the library never
prints and never parses command lines (only ``adaptive_lm.cli`` does), the layers import downward only (the
import-linter contracts in pyproject.toml, when import-linter is installed: ``.ci/run`` runs ``lint-imports`` too), no
function is longer than a reader can hold, and ``adaptive-lm --help`` does not import torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "adaptive_lm"
LIBRARY = [p for p in SRC.rglob("*.py") if "cli" not in p.relative_to(SRC).parts and p.name != "__main__.py"]
MAX_FUNCTION, MAX_CLASS = 65, 250  # lines, docstrings included ("about 60" and "about 250")


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def test_the_library_never_prints_and_never_parses_argv():
    offenders = []
    for path in LIBRARY:
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                offenders.append(f"{path.relative_to(SRC)}:{node.lineno} print(")
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(SRC)}:{node.lineno} imports {n}" for n in names
                          if n == "argparse" or n.startswith("adaptive_lm.cli")]  # fmt: skip
    assert not offenders, "\n".join(offenders)


def test_no_function_or_class_is_longer_than_a_reader_can_hold():
    long = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(_tree(path)):
            limit = MAX_CLASS if isinstance(node, ast.ClassDef) else MAX_FUNCTION
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                n = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if n > limit:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name}: {n} lines")
    assert not long, "\n".join(long)


def test_the_import_contracts_hold():
    """import-linter (the [dev] extra) checks the layers: 0 cycles, nothing imports the command line."""
    run = "from importlinter.cli import lint_imports_command; lint_imports_command()"
    r = subprocess.run([sys.executable, "-c", run], capture_output=True, text=True, cwd=SRC.parents[1], timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]


def test_help_answers_without_importing_torch():
    code = (
        "import sys\nfrom adaptive_lm.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("NO-TORCH"), r.stdout[-500:]
