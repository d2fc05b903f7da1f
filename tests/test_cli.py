"""The console script end to end: help, quickstart, make-corpus (its entropy rate), plots, interruption."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from adaptive_lm.cli import main
from adaptive_lm.cli.quickstart import quickstart
from adaptive_lm.cli.train import train_config
from adaptive_lm.core.corpus import Corpus


def small_bin(tmp_path, tokens: int):
    """A generated corpus of ``tokens`` tokens, binarised into tmp_path/bin."""
    Corpus(vocab=300, states=6, seed=1).write(tmp_path / "train.txt", tokens)
    assert (
        main(
            [
                "preprocess",
                "--trainpref",
                str(tmp_path / "train.txt"),
                "--destdir",
                str(tmp_path / "bin"),
                "--no-progress-bar",
            ]
        )
        == 0
    )
    return tmp_path / "bin"


def tiny_train_args(tmp_path, *extra: str) -> list[str]:
    """`adaptive-lm train` on small_bin's data with the tiny preset, plus ``extra`` flags."""
    return [
        "train",
        str(tmp_path / "bin"),
        "--arch",
        "tiny",
        "--save-dir",
        str(tmp_path / "run"),
        "--max-tokens",
        "256",
        "--tokens-per-sample",
        "32",
        "--no-progress-bar",
        *extra,
    ]


def test_console_script_and_module_list_subcommands():
    for cmd in (["adaptive-lm", "--help"], [sys.executable, "-m", "adaptive_lm", "--help"]):
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        for sub in (
            "train",
            "preprocess",
            "eval",
            "score",
            "generate",
            "convert",
            "download",
            "quickstart",
            "make-corpus",
            "plot",
        ):
            assert sub in out


def test_entropy_rate_is_the_sources_true_cross_entropy():
    c = Corpus(vocab=2000, states=8, seed=3)
    h = c.entropy_rate()
    c.build()
    rng = np.random.default_rng(0)
    K, s, total, n = c.states, c.states, 0.0, 200_000
    for _ in range(n):  # -log p of a long sample under the true source converges to the entropy rate
        s2 = rng.choice(K + 1, p=c.P[s])
        total -= math.log(c.P[s, s2])
        if s2 < K:
            w = rng.choice(len(c.emit[s2]), p=c.emit[s2])
            total -= math.log(c.emit[s2][w])
        s = s2
    assert abs(total / n - h) / h < 0.01


def test_quickstart_runs_end_to_end(tmp_path, capsys):
    res = quickstart(str(tmp_path / "qs"), updates=20)
    out = capsys.readouterr().out
    assert (
        "best possible" in out and "next:" in out and (tmp_path / "qs" / "checkpoints" / "checkpoint_last.pt").exists()
    )
    assert res["valid_ppl"] < 12000 and res["best_ppl"] < res["valid_ppl"]  # learned something, above the bound
    assert (tmp_path / "qs" / "curves.png").stat().st_size > 1000
    assert main(["plot", str(tmp_path / "qs" / "checkpoints"), "--output", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert main(["plot", str(tmp_path / "qs" / "checkpoints"), "--output", str(tmp_path / "named")]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'named.png'}"  # it had said 'wrote .../named'
    assert main(["plot", str(tmp_path / "qs" / "checkpoints"), "--output", str(tmp_path / "c.txt")]) == 2
    assert "give a .png, .pdf, .svg file name" in capsys.readouterr().err  # a matplotlib traceback before


def test_an_interrupted_quickstart_says_so_and_the_same_command_resumes(tmp_path):
    """Ctrl-C during quickstart's training had printed 'quickstart done' with perplexity nan and exited 0, and the
    rerun deleted the checkpoints; now: exit 130, one line, and the rerun resumes (then finishes afresh next time)."""
    cmd = [sys.executable, "-m", "adaptive_lm", "quickstart", "--dir", str(tmp_path / "qs")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([*cmd, "--updates", "100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.stdout.readline().startswith("effective tokens per update"):  # the trainer's last line before updates
            time.sleep(3)
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "quickstart done" not in out and "resumes it" in err and "Traceback" not in err
    again = subprocess.run([*cmd, "--updates", "1"], capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "restored" in again.stdout and "quickstart done" in again.stdout
    assert "perplexity nan" not in again.stdout  # --updates 1 after more: trained afresh, not reported unvalidated
    assert (tmp_path / "qs" / ".adaptive-lm-quickstart-done").is_file()


def test_a_quickstart_whose_checkpoint_is_finished_trains_afresh(tmp_path):
    """A folder whose checkpoint already did the updates but has no done-marker (interrupted after training, while
    sampling; made by an older version) had resumed to nothing: no update, no validation, 'validation perplexity
    nan'. It trains afresh: the same perplexity as the first run, seed for seed."""
    first = quickstart(str(tmp_path / "qs"), updates=2)
    (tmp_path / "qs" / ".adaptive-lm-quickstart-done").unlink()
    again = quickstart(str(tmp_path / "qs"), updates=2)
    assert math.isfinite(again["valid_ppl"]) and again["valid_ppl"] == pytest.approx(first["valid_ppl"], rel=1e-6)
    assert again["sample"] == first["sample"]


def test_ctrl_c_while_the_command_loads_torch_is_one_line():
    """Ctrl-C in a command's first second, while its modules and torch are imported (before the command runs), had
    printed Python's traceback. The interrupt is delivered exactly then: an import hook sends SIGINT to the process
    when torch's import starts."""
    code = (
        "import os, signal, sys\n"
        "class Hook:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch':\n"
        "            os.kill(os.getpid(), signal.SIGINT)\n"
        "        return None\n"
        "sys.meta_path.insert(0, Hook())\n"
        "from adaptive_lm.cli import main\n"
        "raise SystemExit(main(['eval', 'nowhere']))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 130, r.stderr
    assert r.stderr.strip() == "adaptive-lm eval: interrupted", r.stderr


def test_make_corpus_cli(tmp_path, capsys):
    assert main(["make-corpus", "--out", str(tmp_path / "c"), "--tokens", "5000", "--vocab", "500"]) == 0
    assert "entropy rate" in capsys.readouterr().out
    assert {p.name for p in (tmp_path / "c").iterdir()} >= {"train.txt", "valid.txt", "test.txt", "ENTROPY.txt"}


def test_sigint_finishes_the_update_saves_and_the_same_command_resumes(tmp_path):
    small_bin(tmp_path, 30_000)
    base = [sys.executable, "-m", "adaptive_lm"]
    base += tiny_train_args(tmp_path, "--lr", "0.1", "--log-interval", "1", "--log-format", "json")
    cmd = base + ["--max-update", "100000"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1")
    )
    seen = 0
    deadline = time.time() + 120
    while time.time() < deadline:
        line = proc.stdout.readline()
        if line.startswith("{") and "train_inner" in line:
            seen += 1
            if seen == 5:
                proc.send_signal(signal.SIGINT)
                break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err  # 128 + SIGINT, so a scheduler sees an interrupted job
    assert "finishing this update" in out and "stopped by signal 2" in out
    ck = torch.load(tmp_path / "run" / "checkpoint_last.pt", weights_only=True)
    done = ck["train_state"]["num_updates"]
    assert done >= 5
    r = subprocess.run(base + ["--max-update", str(done + 2)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    updates = [json.loads(x)["update"] for x in r.stdout.splitlines() if x.startswith("{") and "train_inner" in x]
    assert updates == [done + 1, done + 2]


@pytest.mark.parametrize("flag", ["--bf16", "--fp16"])
def test_mixed_precision_training_runs_and_learns(tmp_path, flag):
    small_bin(tmp_path, 3000)
    extra = ["--max-update", "30", "--lr", "0.5", "--clip-norm", "0.1", "--log-interval", "5", flag]
    assert main(tiny_train_args(tmp_path, *extra)) == 0
    rows = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    losses = [r["loss"] for r in rows if r["split"] == "train_inner"]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_fp16_overflow_skips_the_update_and_lowers_the_scale(tmp_path, caplog):
    from adaptive_lm.cli import build_parser
    from adaptive_lm.training.trainer import Trainer

    caplog.set_level("INFO", logger="adaptive_lm")
    small_bin(tmp_path, 2000)
    args = tiny_train_args(tmp_path, "--max-update", "5", "--fp16")
    trainer = Trainer(train_config(build_parser().parse_args(args)))
    trainer.scaler.scale = 3e38  # any real loss times this overflows float32
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    batch = trainer.train_data.collate(trainer.batches.epoch_batches(1)[0])
    out = trainer.train_step([batch])
    assert out.get("skipped") == 1.0 and trainer.state.num_updates == 0 and trainer.scaler.scale == 1.5e38
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert "fp16 overflow at update 1: skipping it" in caplog.text
    trainer.scaler.scale = 128.0
    out = trainer.train_step([batch])
    assert "skipped" not in out and trainer.state.num_updates == 1 and math.isfinite(out["loss"])


def test_learned_positions_too_few_for_add_bos_token_blocks_is_one_line(tmp_path, capsys):
    """--add-bos-token makes a full block --tokens-per-sample + 1 positions; a learned table sized by
    --tokens-per-sample had failed in the first forward with a traceback (fairseq-train: an IndexError). Now one line
    before training, and the remedy it names trains."""
    small_bin(tmp_path, 3000)
    base = tiny_train_args(tmp_path, "--decoder-learned-pos", "--add-bos-token", "--max-update", "1")
    assert main(base) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "do not fit the 32 learned positions" in err
    assert "--max-target-positions 33" in err
    assert main([*base, "--max-target-positions", "33"]) == 0
