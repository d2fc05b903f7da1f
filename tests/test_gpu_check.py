"""benchmarks/gpu_check.py in its dry mode: the GPU self-check runs end to end on the CPU (plain kernels) and passes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_dry_run_passes_prints_the_table_and_writes_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    cmd = [sys.executable, str(SCRIPT), "--dry-run", "--quick", "--out", str(out), "--workdir", str(tmp_path / "w")]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # the dry mode even on a GPU machine
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    table = proc.stdout
    assert "| check" in table and "| status" in table and "kernels: attention" in table
    assert "FAIL" not in table.replace("0 FAIL", "")
    doc = json.loads(out.read_text())
    records = doc["records"]
    assert doc["mode"] == "dry-quick" and doc["counts"].get("FAIL", 0) == 0
    assert len(records) >= 15 and {r["status"] for r in records} <= {"PASS", "SKIP"}
    by_name = {r["name"]: r for r in records}
    # what only a GPU can show is SKIP with a reason, never PASS
    for name in ("env: GPU, attention kernels, bf16", "recipe: host syncs per step", "recipe: top kernels of one step"):
        assert by_name[name]["status"] == "SKIP" and by_name[name]["note"], by_name[name]
    # the parts that run on the CPU did run: comparisons, training, the world-1 group (gloo), the recipe model
    for name in ("kernels: cross_entropy_sum value + grads", "model: 2 layers fp64, device vs CPU", "trainer: fp32",
                 "trainer: 8 updates == 4 + resume", "distributed: world-1 group (subprocess)",
                 "recipe: tokens/s, MFU, memory", "generate: tokens/s with/without cache"):  # fmt: skip
        assert by_name[name]["status"] == "PASS", by_name[name]
    assert by_name["trainer: 8 updates == 4 + resume"]["figures"]["bitwise"] is True


def test_a_failing_check_fails_the_run_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    """An exception in one check is that check's FAIL (with the message); the table, the JSON and the exit code
    say so."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(SCRIPT.parent))

    def broken(ctx):
        raise RuntimeError("boom")

    monkeypatch.setattr(
        gpu_check, "CHECKS", [("env", "env: machine", gpu_check.check_machine), ("x", "broken", broken)]
    )
    out = tmp_path / "r.json"
    rc = gpu_check.main(["--dry-run", "--quick", "--out", str(out), "--workdir", str(tmp_path / "w")])
    assert rc == 1
    text = capsys.readouterr().out
    assert "broken" in text and "FAIL" in text and "RuntimeError: boom" in text
    records = json.loads(out.read_text())["records"]
    assert [r["status"] for r in records] == ["PASS", "FAIL"]
