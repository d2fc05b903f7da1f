"""The GPU self-check, as it was run before it shipped with the package: ``adaptive-lm check`` (same flags).

adaptive-lm check                    # preferred: installed with the package
python benchmarks/gpu_check.py ...   # this wrapper: the JSON goes to benchmarks/results/ unless --out says else
"""

from __future__ import annotations

import sys
from pathlib import Path

from adaptive_lm.cli import main

RESULTS = Path(__file__).resolve().parent / "results"

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not any(a == "--out" or a.startswith("--out=") for a in argv):
        argv += ["--out", str(RESULTS)]  # gpu_check.json, or gpu_check_dry.json for a dry run
    sys.exit(main(["check", *argv]))
