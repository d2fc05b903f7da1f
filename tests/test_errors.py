"""Bad inputs, interruptions and divergence, through the command line as a user meets them: one ``error:`` line
and exit code 2 (130/143 for signals), never a traceback, and nothing that was there before is overwritten."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from adaptive_lm.cli import main
from adaptive_lm.core.corpus import Corpus

ENV = dict(os.environ, OMP_NUM_THREADS="1")


def run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adaptive_lm", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV)  # fmt: skip


def one_line(r: subprocess.CompletedProcess, *fragments: str, code: int = 2) -> str:
    """The command failed with ``code`` and exactly one ``error:`` line containing ``fragments``, no traceback."""
    assert r.returncode == code, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr + r.stdout, r.stderr[-2000:]
    errors = [x for x in r.stderr.splitlines() if "error:" in x]
    assert len(errors) == 1, r.stderr
    for f in fragments:
        assert f in errors[0], (f, errors[0])
    return errors[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("err")
    c = Corpus(vocab=300, states=6, seed=1)
    c.write(d / "train.txt", 6000)
    c.write(d / "valid.txt", 1500)
    assert main(["preprocess", "--trainpref", str(d / "train.txt"), "--validpref", str(d / "valid.txt"),
                 "--destdir", str(d / "bin"), "--no-progress-bar"]) == 0  # fmt: skip
    return d


def train_args(data: Path, save: Path, *extra: str) -> list[str]:
    return ["train", str(data / "bin"), "--arch", "tiny", "--save-dir", str(save), "--max-tokens", "256",
            "--tokens-per-sample", "32", "--lr", "0.1", "--no-progress-bar", "--log-interval", "1", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def model(data: Path) -> Path:
    """A tiny trained checkpoint (32-token blocks) to evaluate and score."""
    assert main(train_args(data, data / "run", "--max-update", "2")) == 0
    return data / "run" / "checkpoint_last.pt"


# ---- files that are not what they claim ------------------------------------------------------------------------
def test_random_bytes_as_checkpoint(data, tmp_path):
    bad = tmp_path / "model.pt"
    bad.write_bytes(np.random.default_rng(0).bytes(5000))
    line = one_line(
        run("eval", str(data / "bin"), "--path", str(bad), "--gen-subset", "valid"), "not a PyTorch checkpoint"
    )
    assert "weights_only" not in line  # PyTorch's advice to load unsafely is never passed on


def test_truncated_checkpoint(data, model, tmp_path):
    bad = tmp_path / "model.pt"
    bad.write_bytes(model.read_bytes()[:3000])
    one_line(run("score", str(data / "valid.txt"), "--path", str(bad)), "truncated or damaged")


def test_empty_restore_file(data, tmp_path):
    empty = tmp_path / "empty.pt"
    empty.touch()
    one_line(run(*train_args(data, tmp_path / "r", "--max-update", "1", "--restore-file", str(empty))), "empty file")


def test_destdir_that_is_a_file(data, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    r = run("preprocess", "--trainpref", str(data / "train.txt"), "--destdir", str(f))
    one_line(r, "--destdir", "exists and is not a folder")
    assert f.read_text() == "x"


def test_save_dir_that_is_a_file_or_cannot_be_made(data, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    one_line(run(*train_args(data, f, "--max-update", "1")), str(f), "--save-dir is a file")
    assert f.read_text() == "x"
    under_a_file = f / "run"  # its parent is a file: mkdir fails with ENOTDIR
    one_line(
        run(*train_args(data, under_a_file, "--max-update", "1")), str(under_a_file), "cannot create the save folder"
    )


def test_destdir_in_a_read_only_folder(data, tmp_path, monkeypatch, capsys):
    """As a non-root user a read-only parent refuses writing (root may write anyway, so os.access says it here)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == ro else real(p, mode))
    with pytest.raises(SystemExit) as e:
        main(["preprocess", "--trainpref", str(data / "train.txt"), "--destdir", str(ro / "bin")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write there" in err[0] and not (ro / "bin").exists()


def test_empty_index_file(data, tmp_path):
    import shutil

    d = tmp_path / "bin"
    shutil.copytree(data / "bin", d)
    (d / "train.idx").write_bytes(b"")
    one_line(run("train", str(d), "--arch", "tiny", "--save-dir", str(tmp_path / "s"), "--max-tokens", "256",
                 "--tokens-per-sample", "32", "--max-update", "1"), "train.idx", "empty file")  # fmt: skip


def test_bin_with_ids_beyond_the_dictionary(data, tmp_path):
    import shutil

    d = tmp_path / "bin"
    shutil.copytree(data / "bin", d)
    n = (d / "train.bin").stat().st_size
    (d / "train.bin").write_bytes(np.random.default_rng(1).bytes(n))  # same size, random ids
    one_line(run("train", str(d), "--arch", "tiny", "--save-dir", str(tmp_path / "s"), "--max-tokens", "256",
                 "--tokens-per-sample", "32", "--max-update", "1"), "train.bin", "not in the dictionary")  # fmt: skip


# ---- values no flag may take -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["--lr", "abc"], "'abc' is not a number"),
        (["--lr", "-1"], "must be a positive number"),
        (["--update-freq", "0"], "must be a positive number"),
        (["--max-tokens", "-5"], "must be a positive number"),
        (["--dropout", "-0.1"], "must be zero or positive"),
        (["--momentum", "1.5"], "probability"),
        (["--arch", "nope"], "invalid choice"),
        (["--tpu"], "TPUs are not supported"),
        (["--quant-noise-scalar", "0.1"], "quant_noise_scalar = 0.1"),
    ],
)
def test_train_flag_values(data, tmp_path, argv, fragment):
    one_line(run(*train_args(data, tmp_path / "s", "--max-update", "1", *argv)), fragment)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["score", "FILE", "--batch-size", "0"], "must be a positive number"),
        (["eval", "DATA", "--batch-size", "-1"], "must be a positive number"),
        (["generate", "--beam", "0"], "must be a positive number"),
        (["generate", "--temperature", "0"], "must be a positive number"),
        (["generate", "--sampling-topp", "1.5"], "(0, 1]"),
        (["eval", "DATA", "--context-window", "-3"], "zero or positive"),
    ],
)
def test_inference_flag_values(data, model, argv, fragment):
    argv = [str(data / "valid.txt") if a == "FILE" else str(data / "bin") if a == "DATA" else a for a in argv]
    one_line(run(*argv, "--path", str(model)), fragment)


def test_missing_paths(data, model, tmp_path):
    one_line(run("eval", str(tmp_path / "nowhere"), "--path", str(model)), "no such folder")
    one_line(run("eval", str(data / "bin"), "--path", str(tmp_path / "nope.pt")), "no such file")
    one_line(run("score", str(tmp_path / "none.txt"), "--path", str(model)), "no such file")


# ---- combinations that would give silently wrong results --------------------------------------------------------
def test_dictionary_of_another_size(data, model, tmp_path):
    from adaptive_lm.core.dictionary import Dictionary

    Dictionary.from_counts({f"x{i}": 10 for i in range(40)}).save(tmp_path / "dict.txt")
    one_line(run("eval", str(data / "bin"), "--path", str(model), "--dict", str(tmp_path / "dict.txt")),
             "symbols but the model was trained with")  # fmt: skip


def test_blocks_longer_than_the_model(data, model):
    one_line(run("eval", str(data / "bin"), "--path", str(model), "--gen-subset", "valid", "--tokens-per-sample",
                 "1024"), "exceeds the model's 32 positions")  # fmt: skip


def test_folder_without_config(model, tmp_path):
    from adaptive_lm.inference.convert import convert

    folder = convert(str(model), str(tmp_path / "exported"))
    (folder / "config.json").unlink()
    one_line(run("generate", "--path", str(folder), "--prompt", "w1"), "needs config.json")


def test_unknown_word_rate_is_reported(data, model, tmp_path):
    text = tmp_path / "raw.txt"
    text.write_text("Hello, world! This isn't tokenised.\n")
    r = run("score", str(text), "--path", str(model))
    assert r.returncode == 0 and "are <unk>" in r.stderr and "--tokenizer moses" in r.stderr


# ---- training that goes wrong --------------------------------------------------------------------------------
def test_divergence_stops_with_one_line_and_keeps_the_last_checkpoint(data, tmp_path):
    save = tmp_path / "s"
    assert main(train_args(data, save, "--max-update", "2")) == 0
    good = (save / "checkpoint_last.pt").read_bytes()
    r = run(*train_args(data, save, "--max-update", "50", "--lr", "1e30", "--reset-optimizer",
                        "--reset-lr-scheduler"))  # fmt: skip
    line = one_line(r, "training diverged at update", "--lr", "checkpoint_last.pt")
    assert "OverflowError" not in r.stderr and "not overwritten" in line
    assert (save / "checkpoint_last.pt").read_bytes() == good


def test_a_second_trainer_on_the_same_save_dir_is_refused(data, tmp_path):
    save = tmp_path / "s"
    first = subprocess.Popen([sys.executable, "-m", "adaptive_lm", *train_args(data, save, "--max-update", "100000")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)  # fmt: skip
    try:
        deadline = time.time() + 120
        while not (save / ".lock").exists() and time.time() < deadline:
            time.sleep(0.1)
        r = run(*train_args(data, save, "--max-update", "3"))
        one_line(r, "another trainer holds it", f"pid {first.pid}")
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 143 and not (save / ".lock").exists()  # released on the way out


def test_a_stale_lock_is_taken_over(data, tmp_path):
    import socket

    save = tmp_path / "s"
    save.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (save / ".lock").write_text(f"{socket.gethostname()} {int(dead.stdout)}\n")
    r = run(*train_args(data, save, "--max-update", "1"))
    assert r.returncode == 0 and "no longer running): taking it over" in r.stdout


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_first_without_validation_and_exits_non_zero(data, tmp_path, sig, code):
    save = tmp_path / "s"
    cmd = [sys.executable, "-m", "adaptive_lm", *train_args(data, save, "--max-update", "100000",
                                                             "--validate-interval-updates", "1")]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    seen = 0
    while seen < 3:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()[-2000:]
        seen += line.startswith("train_inner")
    t0 = time.time()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    elapsed = time.time() - t0
    assert proc.returncode == code, err[-2000:]
    after = out.split(f"signal {int(sig)}:", 1)[1]
    assert "valid |" not in after  # no validation between the signal and the exit
    assert "saved checkpoint" in after and f"stopped by signal {int(sig)}" in after
    ck = torch.load(save / "checkpoint_last.pt", weights_only=True)
    assert ck["train_state"]["num_updates"] >= 3
    print(f"signal {int(sig)}: exit {proc.returncode} after {elapsed:.2f}s, update {ck['train_state']['num_updates']}")


def test_a_second_signal_still_leaves_a_checkpoint(data, tmp_path):
    save = tmp_path / "s"
    cmd = [sys.executable, "-m", "adaptive_lm", *train_args(data, save, "--max-update", "100000")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    while not proc.stdout.readline().startswith("train_inner"):
        pass
    proc.send_signal(signal.SIGINT)
    time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    ck = torch.load(save / "checkpoint_last.pt", weights_only=True)
    assert ck["train_state"]["num_updates"] >= 1


def test_failed_preprocess_leaves_the_previous_data_bin_untouched(data, tmp_path):
    import shutil

    d = tmp_path / "bin"
    shutil.copytree(data / "bin", d)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine line\n\xff\xfe not utf-8\n")
    r = run("preprocess", "--trainpref", str(data / "valid.txt"), "--validpref", str(bad), "--destdir", str(d))
    one_line(r, "bad.txt", "UTF-8")
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bin.tmp")]
