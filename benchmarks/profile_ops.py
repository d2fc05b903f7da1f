"""Where the time goes, fairseq against ours, operation by operation: one training run and one rescoring pass.

    python benchmarks/profile_ops.py [--fairseq-python ~/fairseq-venv/bin/python] [--updates 40] [--hyps 2000]
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python benchmarks/profile_ops.py

Both programs run under ``torch.profiler`` (CPU, input shapes recorded) in the same environment. Training: bench_train's
``small`` configuration (2 layers d128, fixture data, ``--max-tokens 2048``) for ``--updates`` updates, profiled from
the first update to the end (startup apart: the time of each command line's ``--help`` is its import cost).
Rescoring: ``--hyps`` hypotheses of bench_rescore's n-best lists, the model loaded first; ours ``sentence_logprobs``,
fairseq the hub's ``score``. Every operator's *self* time goes into one category (GEMMs, attention, softmax and
cross-entropy, dropout, layer norm, optimizer, embeddings and indexing, copies, other element-wise); what no operator
accounts for is Python and framework overhead (the trainer, the autograd engine, data collation). The GEMMs are also
listed by shape. The profiler's own cost inflates every figure (fairseq's many small operations most): read the
shares; bench_*.py give the speeds. Results: ``benchmarks/results/breakdown[_avx2].json`` and the printed tables
(ms per update / per 1,000 hypotheses).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_rescore import VALID, make_nbest, sentences
from bench_train import CONFIGS, flags
from common import FIXTURE, machine, save, table

CATEGORIES = [  # (category, substrings of operator names); the first match wins
    ("optimizer", ("Optimizer.step", "NAG.step", "_foreach")),
    ("GEMM", ("_linear_pointwise", "mkldnn_linear_backward_weights", "aten::mm", "aten::addmm", "aten::matmul")),
    ("attention", ("bmm", "scaled_dot_product", "Attention", "aten::_softmax", "softmax_backward")),
    ("softmax/cross-entropy", ("log_softmax", "nll_loss", "aten::exp", "CrossEntropy", "logsumexp", "gather")),
    ("dropout", ("dropout", "Dropout", "bernoulli", "aten::ge", "addcmul")),
    ("layer norm", ("layer_norm",)),
    ("embedding/indexing", ("embedding", "index", "scatter", "nonzero", "masked")),
    ("copies", ("copy_", "aten::cat", "clone", "contiguous", "_to_copy", "to_mkldnn", "to_dense")),
    ("other element-wise", ("aten::",)),
]
NESTED = ("Optimizer.step", "NAG.step")  # scopes whose total (not self) time is the category

PROFILE_FAIRSEQ_TRAIN = r"""
import json, sys, time, torch
from fairseq import trainer
from fairseq_cli import train
out, argv = sys.argv[1], sys.argv[2:]
sys.argv = ["fairseq-train", *argv]
box, step = {}, trainer.Trainer.train_step
def first_update_starts_the_profile(self, *a, **k):
    if "p" not in box:  # from the first update on, as ours
        box["p"] = torch.profiler.profile(record_shapes=True)
        box["p"].__enter__()
        box["t0"] = time.perf_counter()
    return step(self, *a, **k)
trainer.Trainer.train_step = first_update_starts_the_profile
train.cli_main()
box["p"].__exit__(None, None, None)
json.dump({"wall": time.perf_counter() - box["t0"], "ops": ROWS(box["p"])}, open(out, "w"))
"""

PROFILE_FAIRSEQ_SCORE = r"""
import json, sys, time, torch
from fairseq.models.transformer_lm import TransformerLanguageModel
out, folder, ckpt, hyp_file = sys.argv[1:5]
hyps = [line.rstrip("\n") for line in open(hyp_file, encoding="utf-8")]
lm = TransformerLanguageModel.from_pretrained(folder, ckpt, data_name_or_path=folder).eval()
lm.score(hyps[:50])
t0 = time.perf_counter()
with torch.profiler.profile(record_shapes=True) as p:
    lm.score(hyps)
json.dump({"wall": time.perf_counter() - t0, "ops": ROWS(p)}, open(out, "w"))
"""


def ROWS(p) -> list[dict]:  # noqa: N802 (the name the fairseq-side scripts call)
    """One row per operator and input shapes: self and total CPU microseconds, calls."""
    rows = []
    for e in p.key_averages(group_by_input_shape=True):
        rows.append({"name": e.key, "self_us": e.self_cpu_time_total, "total_us": e.cpu_time_total,
                     "count": e.count, "shapes": str(e.input_shapes)})  # fmt: skip
    return rows


ROWS_FN = inspect.getsource(ROWS)  # the same rows from the fairseq side


def categorize(ops: list[dict], wall_s: float, per: float) -> dict[str, float]:
    """Milliseconds per ``per`` units of work, by category, plus what no operator accounts for (Python, framework).
    The optimizer is its step's whole scope; its operators (almost all element-wise) leave "other element-wise"."""
    out = {c: 0.0 for c, _ in CATEGORIES}
    for o in ops:
        if o["name"].startswith(NESTED):
            out["optimizer"] += o["total_us"]
            continue
        cat = next((c for c, keys in CATEGORIES if any(k in o["name"] for k in keys)), None)
        if cat is not None:
            out[cat] += o["self_us"]
    out["other element-wise"] = max(0.0, out["other element-wise"] - out["optimizer"])
    inside = sum(o["self_us"] for o in ops if not o["name"].startswith(NESTED))
    out["Python and framework"] = max(0.0, wall_s * 1e6 - inside)
    return {k: round(v / 1e3 / per, 2) for k, v in out.items()}


def gemm_shapes(ops: list[dict], per: float, top: int = 8) -> list[dict]:
    rows = [o for o in ops if any(k in o["name"] for k in CATEGORIES[1][1])]
    rows.sort(key=lambda o: -o["self_us"])
    return [{"op": o["name"], "shapes": o["shapes"][:90], "calls": round(o["count"] / per, 1),
             "ms": round(o["self_us"] / 1e3 / per, 2)} for o in rows[:top]]  # fmt: skip


def fairseq_run(python: str, script: str, args: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path, out = Path(tmp) / "p.py", Path(tmp) / "out.json"
        path.write_text(ROWS_FN + script)
        p = subprocess.run([python, str(path), str(out), *args], capture_output=True, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "2"})  # fmt: skip
        if p.returncode != 0:
            raise SystemExit(p.stderr[-3000:])
        return json.loads(out.read_text())


def ours_train(updates: int) -> dict:
    """Our trainer in this process, profiled from its first update to its last (startup apart)."""
    import torch

    from adaptive_lm.cli import build_parser
    from adaptive_lm.cli.train import train_config
    from adaptive_lm.training.loop import train

    cfg = train_config(build_parser().parse_args(["train", *flags(CONFIGS["small"], updates, "/tmp/prof-ours")]))
    box: dict = {}

    def on_start(trainer) -> None:
        step = trainer.optimizer.step

        def profiled_step() -> None:
            with torch.profiler.record_function("NAG.step"):
                step()

        trainer.optimizer.step = profiled_step
        box["p"] = torch.profiler.profile(record_shapes=True)
        box["p"].__enter__()
        box["t0"] = time.perf_counter()

    train(cfg, on_start=on_start)
    box["p"].__exit__(None, None, None)
    return {"wall": time.perf_counter() - box["t0"], "ops": ROWS(box["p"])}


def ours_score(hyps: list[str]) -> dict:
    import torch

    import adaptive_lm
    from adaptive_lm.inference.rescore import encode_hypotheses, sentence_logprobs

    lm = adaptive_lm.from_pretrained(FIXTURE / "model" / "checkpoint_best.pt")
    sentence_logprobs(lm, encode_hypotheses(lm, hyps[:50]))
    t0 = time.perf_counter()
    with torch.profiler.profile(record_shapes=True) as p:
        sentence_logprobs(lm, encode_hypotheses(lm, hyps))
    return {"wall": time.perf_counter() - t0, "ops": ROWS(p)}


def startup(python: str) -> dict:
    """Seconds to answer --help: our command line, and fairseq-train's (imports)."""

    def t(cmd: list[str]) -> float:
        t0 = time.perf_counter()
        subprocess.run(cmd, capture_output=True)
        return round(time.perf_counter() - t0, 2)

    fs = str(Path(python).with_name("fairseq-train"))
    return {"adaptive-lm --help": t([sys.executable, "-m", "adaptive_lm", "--help"]),
            "adaptive-lm train --help": t([sys.executable, "-m", "adaptive_lm", "train", "--help"]),
            "fairseq-train --help": t([fs, "--help"])}  # fmt: skip


def main() -> None:
    from adaptive_lm.core.malloc import keep_freed_memory

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fairseq-python", default=str(Path.home() / "fairseq-venv" / "bin" / "python"))
    ap.add_argument("--updates", type=int, default=40)
    ap.add_argument("--hyps", type=int, default=2000)
    args = ap.parse_args()
    keep_freed_memory()  # as the command line runs
    info = machine()
    capped = info["caps"] != "none"
    train_flags = flags(CONFIGS["small"], args.updates, "/tmp/prof-fairseq")
    runs = {"train: fairseq": fairseq_run(args.fairseq_python, PROFILE_FAIRSEQ_TRAIN, train_flags),
            "train: ours": ours_train(args.updates)}  # fmt: skip
    hyps = [r[1] for r in make_nbest(sentences(VALID, args.hyps // 10))]
    with tempfile.TemporaryDirectory() as tmp:
        hf = Path(tmp) / "hyps.txt"
        hf.write_text("\n".join(hyps) + "\n", encoding="utf-8")
        model = FIXTURE / "model" / "checkpoint_best.pt"
        runs["rescore: fairseq"] = fairseq_run(args.fairseq_python, PROFILE_FAIRSEQ_SCORE,
                                               [str(model.parent), model.name, str(hf)])  # fmt: skip
    runs["rescore: ours"] = ours_score(hyps)
    rows, shapes = [], {}
    for name, r in runs.items():
        per = args.updates if name.startswith("train") else len(hyps) / 1000
        unit = "update" if name.startswith("train") else "1,000 hypotheses"
        rows.append({"run": name, "per": unit, "wall ms": round(r["wall"] * 1e3 / per, 1),
                     **categorize(r["ops"], r["wall"], per)})  # fmt: skip
        shapes[name] = gemm_shapes(r["ops"], per)
    print(table(rows, list(rows[0])))
    for name, s in shapes.items():
        print(f"\n{name}: GEMMs by shape (ms per unit)")
        print(table(s, ["op", "shapes", "calls", "ms"]))
    boot = startup(args.fairseq_python)
    print("\nstartup (s):", boot)
    print(f"machine: {info['cpu']} ({info['cpu_id']}), {info['isa']}; caps {info['caps']}; ATen "
          f"{info['aten_capability']}, oneDNN {info['onednn_isa']}")  # fmt: skip
    out = save("breakdown_avx2" if capped else "breakdown", {"machine": info, "rows": rows, "gemm_shapes": shapes,
                                                              "startup": boot, "argv": sys.argv})  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
