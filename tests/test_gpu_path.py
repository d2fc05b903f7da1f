"""What a CUDA run executes, caught on a CPU: the plain kernels (``--kernels plain``, PyTorch's own, as CUDA runs
them), optimizer state following the parameters' device, no host synchronisation inside an update, the stop
decision agreed across processes, one serialisation per save, and ``--compile`` falling back whole."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from adaptive_lm import build_model
from adaptive_lm.cli import main
from adaptive_lm.core.corpus import Corpus
from adaptive_lm.core.optim import NAG
from adaptive_lm.training.checkpoint import optimizer_from_plain, optimizer_to_plain
from adaptive_lm.training.config import TrainConfig
from adaptive_lm.training.data import Prefetcher
from adaptive_lm.training.saving import save
from adaptive_lm.training.trainer import Trainer

ENV = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("gpu")
    Corpus(vocab=300, states=6, seed=3).write(d / "train.txt", 5000)
    Corpus(vocab=300, states=6, seed=4).write(d / "valid.txt", 800)
    assert main(["preprocess", "--trainpref", str(d / "train.txt"), "--validpref", str(d / "valid.txt"),
                 "--destdir", str(d / "bin"), "--no-progress-bar"]) == 0  # fmt: skip
    return d / "bin"


def cfg(data: Path, save: Path, **kw) -> TrainConfig:
    base = dict(data=str(data), save_dir=str(save), arch="tiny", max_tokens=256, tokens_per_sample=32, lr=0.1,
                clip_norm=0.1, max_update=4, cpu=True, progress_bar=False, log_interval=1, kernels="plain")  # fmt: skip
    return TrainConfig(**{**base, **kw})


def test_optimizer_state_follows_the_parameters_device():
    model = build_model("tiny", 64)
    opt = NAG(list(model.parameters()), lr=0.1)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    plain = optimizer_to_plain(opt, model)
    assert all(s["momentum_buffer"].device.type == "cpu" for s in plain["state"].values())  # saved as CPU tensors
    with torch.device("meta"):
        other = build_model("tiny", 64)
    opt2 = NAG(list(other.parameters()), lr=0.1)
    optimizer_from_plain(opt2, other, plain)
    assert {s["momentum_buffer"].device.type for s in opt2.state.values()} == {"meta"}


SYNC_OPS = {"nonzero", "_local_scalar_dense", "masked_select", "is_nonzero", "equal", "unique", "unique2"}


class Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(func.__name__.split(".")[0])
        if func.__name__.startswith("index.Tensor") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []) or []
        ):
            self.seen.append("bool-index")
        return func(*args, **(kwargs or {}))


def test_an_update_on_the_gpu_path_has_no_host_sync_inside(data, tmp_path):
    """With plain kernels (what CUDA runs) and the loader's routes, the forward, backward, all-reduce, scaling,
    clipping and optimizer step of an update run no operation that makes a GPU wait for the host (``nonzero``,
    ``.item()``, boolean indexing, ...); the one sync is the ``tolist`` of the statistics."""
    t = Trainer(cfg(data, tmp_path / "s", update_freq=2))
    groups = [t.batches.epoch_batches(1)[:2]]
    samples = next(iter(Prefetcher(t.train_data, groups, t.device, False, t.model_cfg)))
    assert all("routes" in s for s in samples)
    with Ops() as ops:
        out = t.train_step(samples)
    assert math.isfinite(out["loss"]) and t.state.num_updates == 1
    bad = sorted({o for o in ops.seen if o in SYNC_OPS or o == "bool-index"})
    assert not bad, bad
    assert len(ops.seen) > 100  # the recording saw the update's operations


def test_routes_and_background_loading_change_nothing(data, tmp_path):
    t = Trainer(cfg(data, tmp_path / "s"))
    groups = [t.batches.epoch_batches(1)[i : i + 2] for i in range(0, 6, 2)]
    inline = list(Prefetcher(t.train_data, groups, t.device, False))
    ahead = list(Prefetcher(t.train_data, groups, t.device, True, t.model_cfg))
    for a, b in zip(inline, ahead, strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x["src_tokens"], y["src_tokens"]) and torch.equal(x["target"], y["target"])
    a = Trainer(cfg(data, tmp_path / "a")).train_step(inline[0])
    b = Trainer(cfg(data, tmp_path / "b")).train_step(ahead[0])
    assert a == b  # the same update, to the bit, with the rows found on the CPU


def test_plain_kernels_train_like_ours_without_dropout(data, tmp_path):
    """The GPU path and our CPU kernels are the same arithmetic: with dropout off, the same losses."""
    nodrop = dict(model_overrides=dict(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                                       adaptive_softmax_dropout=0.0), max_update=6, no_save=True)  # fmt: skip
    from adaptive_lm.training.loop import train

    a = train(cfg(data, tmp_path / "a", kernels="plain", **nodrop))
    b = train(cfg(data, tmp_path / "b", kernels="auto", **nodrop))
    for x, y in zip(a["history"], b["history"], strict=True):
        assert abs(x["loss"] - y["loss"]) < 1e-5 and abs(x["gnorm"] - y["gnorm"]) < 1e-5 * max(1, y["gnorm"])


def test_one_serialisation_per_save(data, tmp_path, monkeypatch):
    t = Trainer(cfg(data, tmp_path / "s", save_interval_updates=1, kernels="auto"))
    calls = []
    real = torch.save
    monkeypatch.setattr(torch, "save", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    t.state.num_updates = 1
    save(t, False, 9.0, None)  # checkpoint_1_1.pt, checkpoint_best.pt and checkpoint_last.pt
    names = sorted(p.name for p in (tmp_path / "s").glob("*.pt"))
    assert names == ["checkpoint_1_1.pt", "checkpoint_best.pt", "checkpoint_last.pt"] and len(calls) == 1
    assert len({(tmp_path / "s" / n).stat().st_ino for n in names}) == 1  # hard links to the one file


class _FailingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return x.clone()

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        raise RuntimeError("simulated failure while compiling the backward")


def test_compile_failing_in_the_backward_redoes_the_update_eagerly(data, tmp_path, caplog):
    caplog.set_level("INFO", logger="adaptive_lm")
    eager = Trainer(cfg(data, tmp_path / "e", kernels="auto"))
    batch = [eager.train_data.collate(eager.batches.epoch_batches(1)[0])]
    expected = eager.train_step(batch)
    t = Trainer(cfg(data, tmp_path / "c", kernels="auto"))
    t.forward_model = lambda src, **kw: _FailingBackward.apply(t.model(src, **kw))
    got = t.train_step(batch)
    assert "--compile failed (RuntimeError: simulated failure" in caplog.text
    assert got == expected and t.forward_model is t.model
    for a, b in zip(eager.model.parameters(), t.model.parameters()):
        assert torch.equal(a, b)


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(x) for x in out]


@pytest.mark.slow
def test_a_signal_to_one_process_stops_both_after_the_same_update(data, tmp_path):
    save = tmp_path / "s"
    args = ["-m", "adaptive_lm", "train", str(data), "--arch", "tiny", "--save-dir", str(save), "--max-tokens", "64",
            "--tokens-per-sample", "32", "--max-update", "100000", "--cpu", "--log-interval", "1",
            "--no-progress-bar", "--disable-validation", "--lr", "0.1", "--clip-norm", "0.1"]  # fmt: skip
    proc = subprocess.Popen([*TORCHRUN, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    seen = 0
    while seen < 3:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()[-3000:]
        seen += line.startswith("train_inner")
    workers = _children(proc.pid)
    assert len(workers) == 2
    t0 = time.time()
    os.kill(workers[-1], signal.SIGTERM)  # one worker only (the other never sees a signal)
    out, err = proc.communicate(timeout=120)
    assert time.time() - t0 < 60 and "Traceback" not in out  # no hang: both left the loop
    assert "stopped by signal 15" in out, err[-3000:]
    done = int(out.split("stopped by signal 15 after update ")[1].split(";")[0])
    ck = torch.load(save / "checkpoint_last.pt", weights_only=True)
    assert ck["train_state"]["num_updates"] == done >= 3
    assert err.count("exitcode  : 143") == 2 or proc.returncode != 0  # both workers exit 143; torchrun reports it


@pytest.mark.slow
def test_processes_that_restored_different_updates_are_refused(data, tmp_path):
    script = tmp_path / "check.py"
    script.write_text(
        "import os, sys\n"
        "from adaptive_lm.training.trainer import Trainer\n"
        "from adaptive_lm.training.saving import check_ranks_agree\n"
        "from adaptive_lm.training.config import TrainConfig\n"
        "from adaptive_lm.core.errors import UserError\n"
        f"t = Trainer(TrainConfig(data={str(data)!r}, save_dir={str(tmp_path / 's')!r}, arch='tiny', max_tokens=64,\n"
        "                         tokens_per_sample=32, max_update=5, cpu=True))\n"
        "t.state.num_updates = int(os.environ['RANK']) * 7  # as if each node read its own disk\n"
        "try:\n"
        "    check_ranks_agree(t, 'its own save dir')\n"
        "except UserError as e:\n"
        "    print('REFUSED', e)\n"
        "import torch.distributed as dist\n"
        "dist.destroy_process_group()\n"
    )
    r = subprocess.run([*TORCHRUN, str(script)], capture_output=True, text=True, timeout=180, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    # both processes refuse (their lines may interleave on the shared stdout)
    assert r.stdout.count("REFUSED") == 2 and "rank 0: 0, rank 1: 7" in r.stdout and "shared disk" in r.stdout
