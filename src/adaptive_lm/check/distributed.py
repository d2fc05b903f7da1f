"""Distributed checks: a world-1 process group (NCCL on CUDA, gloo on a CPU) through the gradient all-reduce and
the trainer, in a child process with torchrun's environment; with >= 2 GPUs a real ``torchrun --nproc_per_node=2``
run against one process with ``--update-freq 2``.

The child is this module run as a program (``python -m adaptive_lm.check.distributed CONFIG_JSON RESULT_JSON``):
a process group is process-wide state, so it gets a process of its own. It writes its figures to RESULT_JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from adaptive_lm.check.config import CheckConfig
from adaptive_lm.check.context import (
    FAIL,
    NO_CUDA,
    Ctx,
    Record,
    final_weights,
    fmt,
    losses_of,
    maxdiff,
    run_training,
    skip,
    verdict,
)
from adaptive_lm.core.files import atomic_write_json
from adaptive_lm.training.config import TrainConfig

CHILD = [sys.executable, "-m", "adaptive_lm.check.distributed"]
TWO_PROCESS_FLAGS = [
    "--arch", "transformer_lm_wiki103", "--decoder-layers", "2", "--decoder-embed-dim", "64",
    "--decoder-ffn-embed-dim", "256", "--decoder-attention-heads", "4", "--dropout", "0", "--attention-dropout", "0",
    "--activation-dropout", "0", "--adaptive-softmax-dropout", "0", "--tokens-per-sample", "64", "--max-tokens", "256",
    "--lr", "0.5", "--warmup-updates", "3", "--warmup-init-lr", "1e-7", "--min-lr", "1e-4", "--clip-norm", "0.1",
    "--log-interval", "1", "--no-progress-bar", "--seed", "3", "--max-update", "6",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def failed_child(what: str, proc: subprocess.CompletedProcess, tail_chars: int = 2500) -> Record:
    """A FAIL carrying the last lines a child process wrote (its traceback)."""
    tail = (proc.stdout[-1500:] + proc.stderr[-tail_chars:]).strip().splitlines()
    return Record(
        FAIL, f"{what} exited {proc.returncode}", {"tail": tail[-30:]}, tail[-1] if tail else "", details=tail[-15:]
    )


def world1_note(ctx: Ctx, r: dict[str, Any], ok: bool) -> str:
    notes = [] if ok else ["see figures"]
    if not r["group_initialised_by_setup_distributed"]:
        notes.append("setup_distributed() makes no group when WORLD_SIZE=1: the check calls init_process_group itself")
    if not ctx.cuda:
        notes.append("gloo on the CPU (NCCL needs CUDA)")
    return "; ".join(notes)


def check_world1_group(ctx: Ctx) -> Record:
    """A child process with torchrun's environment for one process; see ``world1_child``."""
    backend = "nccl" if ctx.cuda else "gloo"
    threads = os.environ.get("OMP_NUM_THREADS", "2")
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
               LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", OMP_NUM_THREADS=threads)  # fmt: skip
    cfg = dataclasses.replace(ctx.cfg, dry_run=not ctx.cuda, workdir=str(ctx.work))
    result = ctx.work / "world1-result.json"
    result.unlink(missing_ok=True)
    cmd = [*CHILD, json.dumps(dataclasses.asdict(cfg)), str(result)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    if proc.returncode != 0 or not result.is_file():
        return failed_child("child", proc)
    r = json.loads(result.read_text())
    r["backend"] = backend
    loss_diff = max(abs(a - b) for a, b in zip(r["losses_group"], r["losses_alone"]))
    r["loss_diff_group_vs_alone"] = loss_diff
    ok = r["reducer_exact"] and r["reducer_zero_filled"] and bool(r["valid_losses"])
    ok = ok and len(r["losses_group"]) == len(r["losses_alone"]) and loss_diff <= (1e-5 if ctx.cuda else 0.0)
    summary = (
        f"{backend} world 1: all-reduce of grads exact {r['reducer_exact']}, {len(r['losses_group'])} updates + "
        f"{len(r['valid_losses'])} validations, losses vs no group {fmt(loss_diff)}"
    )
    return Record(verdict(ok), summary, r, world1_note(ctx, r, ok))


def reducer_figures(device: torch.device) -> dict[str, Any]:
    """``GradReducer`` with small buckets (several are sent during the backward) and one parameter that gets no
    gradient: the reduced gradients equal the plain ones, the unused one is zero-filled."""
    from adaptive_lm.training.distributed import GradReducer

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).to(device)
    unused = torch.nn.Parameter(torch.ones(3, device=device))
    params = [*net.parameters(), unused]
    x = torch.randn(8, 16, device=device)  # batch, features
    net(x).square().sum().backward()
    expected = [p.grad.clone() for p in net.parameters()]
    for p in params:
        p.grad = None
    reducer = GradReducer(params, bucket_bytes=256)
    reducer.arm()
    net(x).square().sum().backward()
    reducer.finish()
    reducer.remove()
    return dict(
        reducer_buckets=len(reducer.buckets),
        reducer_exact=all(torch.equal(p.grad, e) for p, e in zip(net.parameters(), expected)),
        reducer_zero_filled=unused.grad is not None and bool((unused.grad == 0).all()),
    )


def world1_child(ctx: Ctx) -> dict[str, Any]:
    """In the child, with RANK=0 WORLD_SIZE=1 set: the trainer alone, then a process group (NCCL on CUDA) through
    ``GradReducer`` and through the trainer (all-reduce of statistics, rank agreement, validation)."""
    import torch.distributed as dist

    from adaptive_lm.training.distributed import setup_distributed

    def cfg_of(name: str) -> TrainConfig:
        n = 2 if ctx.quick else 4
        return ctx.small_cfg(ctx.work / f"world1-{name}", max_update=n, validate_interval_updates=n // 2, no_save=True)

    alone, _, _ = run_training(ctx, cfg_of("alone"))
    _, _, device = setup_distributed(cpu=not ctx.cuda)
    made = dist.is_initialized()
    if not made:
        dist.init_process_group(backend="nccl" if ctx.cuda else "gloo")
    reducer = reducer_figures(device)
    grouped, log, _ = run_training(ctx, cfg_of("group"))  # destroys the group at the end
    return dict(group_initialised_by_setup_distributed=made, **reducer, losses_alone=losses_of(alone),
                losses_group=losses_of(grouped), valid_losses=grouped["valid_losses"],
                world_line=[x for x in log.splitlines() if "world " in x][:1])  # fmt: skip


def check_two_processes(ctx: Ctx) -> Record:
    """``torchrun --nproc_per_node=2`` against one process with ``--update-freq 2``: the same losses and weights."""
    n_gpu = torch.cuda.device_count() if ctx.cuda else 0
    if n_gpu < 2:
        why = NO_CUDA if not ctx.cuda else f"needs >= 2 GPUs ({n_gpu} here)"
        return skip(why + "; tests/test_train.py::test_two_processes_follow_one_process_with_update_freq_2 runs it "
                    "with gloo on the CPU")  # fmt: skip
    data, V, cut = ctx.corpus()
    flags = [*TWO_PROCESS_FLAGS, "--adaptive-input-cutoff", f"{cut[0]},{cut[1]}"]
    flags += ["--adaptive-softmax-cutoff", f"{cut[0]},{cut[1]}"]
    runs = {}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    for name, launcher, uf in (("one", [sys.executable], "2"), ("two", torchrun, "1")):
        save = ctx.work / f"ddp-{name}"
        shutil.rmtree(save, ignore_errors=True)
        cmd = [*launcher, "-m", "adaptive_lm", "train", str(data), *flags, "--update-freq", uf, "--save-dir", str(save)]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        if proc.returncode != 0:
            return failed_child(f"{name} process(es)", proc)
        lines = [json.loads(x) for x in (save / "metrics.jsonl").read_text().splitlines()]
        runs[name] = ([x["loss"] for x in lines if x["split"] == "train_inner"], final_weights(save), proc.stdout)
    (l1, w1, _), (l2, w2, out2) = runs["one"], runs["two"]
    loss_diff = max(abs(a - b) for a, b in zip(l1, l2)) if len(l1) == len(l2) == 6 else float("inf")
    w_diff = max(maxdiff(w1[k], w2[k]) for k in w1)
    ok = loss_diff < 2e-3 and w_diff < 1e-5 and "world 2" in out2
    figs = dict(losses_one=l1, losses_two=l2, max_loss_diff=loss_diff, max_weight_diff=w_diff)
    return Record(verdict(ok), f"nccl x2 vs 1 x update-freq 2: losses {fmt(loss_diff)}, weights {fmt(w_diff)}", figs)


def child_main(argv: list[str]) -> int:
    """``python -m adaptive_lm.check.distributed CONFIG_JSON RESULT_JSON``: ``world1_child`` with the parent's
    settings; its figures go to RESULT_JSON (an exception: a traceback on stderr and exit 1)."""
    config_json, result_path = argv
    ctx = Ctx(CheckConfig(**json.loads(config_json)))
    atomic_write_json(Path(result_path), world1_child(ctx))
    return 0


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
