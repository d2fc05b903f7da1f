"""Generation speed side by side with fairseq's hub: beam 5, a batch of 16 prompts, 50 new tokens, CPU.

    python benchmarks/bench_generate.py [--fairseq-python ~/fairseq-venv/bin/python] [--repeats 3] [--larger]

Both tools get the same model file and the same 16 prompts (the first words of WikiText-2 valid sentences, 4-12
words long) in one ``generate`` call: ``lm.generate([lm.encode(p) for p in prompts], beam=5, max_len_a=1,
max_len_b=50, min_len=...)``. ``max_len = W + 50`` (W: the longest prompt + 1) and ``min_len`` equal to it make every
hypothesis run to the limit, so each prompt gets at least 50 new tokens on both sides (the same work whatever the
model prefers). fairseq runs in its own venv, ours in this process (with the key/value cache, and once without it
for comparison); each side's best of ``--repeats`` runs alternating between the tools, the model already loaded
and warm (each fairseq process makes one untimed call first: its first call took 0.36 s against 0.31-0.33 s for
the next ones on the fixture; our runs share one process, so our best run is a warm one).
The returned hypotheses must be identical (tokens) on both sides. ``gflop`` / ``mfu_%`` / ``bound`` (the cached
run): FLOPs as torch's FlopCounterMode counts them, MFU over this machine's fp32 matmul peak, and the speedup over
fairseq at 100% of that peak (``common.roofline``). tokens/s = new tokens of the best hypothesis of
every prompt per second. Models: the shared fixture (0.9M parameters) and, with ``--larger``, bench_eval's
8-layer d512 model (random weights, written as a fairseq checkpoint).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_eval import larger_checkpoint
from bench_rescore import VALID, sentences
from common import FIXTURE, counted_flops, machine, matmul_peak, roofline, save, table

SETTINGS = dict(beam=5, max_len_a=1.0, max_len_b=50)

FAIRSEQ_SCRIPT = r"""
import json, sys, time, torch
folder, ckpt, prompt_file, out_file, threads, repeats, settings = sys.argv[1:8]
torch.set_num_threads(int(threads))
from fairseq.models.transformer_lm import TransformerLanguageModel
prompts = [line.rstrip("\n") for line in open(prompt_file, encoding="utf-8")]
lm = TransformerLanguageModel.from_pretrained(folder, ckpt, data_name_or_path=folder).eval()
kw = json.loads(settings)
lm.generate([lm.encode(p) for p in prompts], **kw)  # untimed warm-up: our side's best run is a warm one too
best, res = None, None
for _ in range(int(repeats)):
    t0 = time.perf_counter()
    res = lm.generate([lm.encode(p) for p in prompts], **kw)
    dt = time.perf_counter() - t0
    best = dt if best is None else min(best, dt)
out = [[h["tokens"].tolist() for h in hs] for hs in res]
json.dump({"seconds": best, "hypotheses": out}, open(out_file, "w"))
"""


def prompts(n: int = 16) -> list[str]:
    """The first 4-12 words of the first ``n`` WikiText-2 valid sentences (different lengths: one padded batch)."""
    out = []
    for i, s in enumerate(sentences(VALID, n)):
        words = s.split()
        out.append(" ".join(words[: 4 + (i * 5) % 9]))
    return out


def settings_for(texts: list[str], lm) -> dict:
    width = max(len(lm.encode(t)) for t in texts)  # prompt + </s>: fairseq's src_len (the start symbol replaces </s>)
    return {**SETTINGS, "min_len": int(SETTINGS["max_len_a"] * width + SETTINGS["max_len_b"])}


def ours(lm, texts: list[str], kw: dict, use_cache: bool = True) -> dict:
    t0 = time.perf_counter()
    hyps = lm.generate([lm.encode(p) for p in texts], use_cache=use_cache, **kw)
    return {"seconds": time.perf_counter() - t0, "hypotheses": [[h["tokens"].tolist() for h in hs] for hs in hyps]}


def fairseq(python: str, model: Path, texts: list[str], kw: dict, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        pf, of, script = Path(tmp) / "prompts.txt", Path(tmp) / "out.json", Path(tmp) / "gen.py"
        pf.write_text("\n".join(texts) + "\n", encoding="utf-8")
        script.write_text(FAIRSEQ_SCRIPT)
        cmd = [python, str(script), str(model.parent), model.name, str(pf), str(of), str(torch.get_num_threads())]
        cmd += [str(repeats), json.dumps(kw)]
        p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
        if p.returncode != 0:
            sys.stderr.write(p.stderr[-3000:])
            raise SystemExit(f"fairseq failed ({p.returncode})")
        return json.loads(of.read_text())


def new_tokens(texts: list[str], hyps: list[list[list[int]]], lm) -> int:
    return sum(len(h[0]) - len(lm.encode(t)) for t, h in zip(texts, hyps))  # best hypothesis: minus prompt + </s>


def bench(name: str, model: Path, python: str, repeats: int, peak: float) -> list[dict]:
    import adaptive_lm

    lm = adaptive_lm.from_pretrained(model)
    texts = prompts()
    kw = settings_for(texts, lm)
    best: dict[str, dict] = {}
    for _ in range(repeats):  # alternate, so a slow minute of the machine hits both
        for label, f in (("fairseq hub", lambda: fairseq(python, model, texts, kw, 1)),
                         ("adaptive-lm", lambda: ours(lm, texts, kw)),
                         ("adaptive-lm, no cache", lambda: ours(lm, texts, kw, use_cache=False))):  # fmt: skip
            r = f()
            if label not in best or r["seconds"] < best[label]["seconds"]:
                best[label] = r
    ref = best["fairseq hub"]["hypotheses"]
    flops = counted_flops(lambda: ours(lm, texts, kw))  # the cached run's
    rows = []
    for label, r in best.items():
        if r["hypotheses"] != ref:
            raise SystemExit(f"{name}: {label}'s hypotheses differ from fairseq's")
        n = new_tokens(texts, r["hypotheses"], lm)
        rows.append({"model": name, "run": label, "seconds": round(r["seconds"], 3), "new tokens": n,
                     "tokens/s": round(n / r["seconds"], 1),
                     "vs fairseq": round(best["fairseq hub"]["seconds"] / r["seconds"], 2)})  # fmt: skip
        if label == "adaptive-lm":
            rows[-1].update(roofline(flops, r["seconds"], peak, best["fairseq hub"]["seconds"]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fairseq-python", default=str(Path.home() / "fairseq-venv" / "bin" / "python"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--larger", action="store_true", help="also the 8-layer d512 model")
    args = ap.parse_args()
    from adaptive_lm.core.malloc import keep_freed_memory

    keep_freed_memory()  # what the console script does at start (adaptive-lm generate)
    peak = matmul_peak(torch.float32)
    print(f"fp32 matmul peak: {peak / 1e9:.0f} GFLOP/s")
    rows = bench("fixture (0.9M)", FIXTURE / "model" / "checkpoint_best.pt", args.fairseq_python, args.repeats, peak)
    if args.larger:
        with tempfile.TemporaryDirectory() as tmp:
            path = larger_checkpoint(Path(tmp) / "larger")
            rows += bench("8 layers d512", path, args.fairseq_python, args.repeats, peak)
    cols = ["model", "run", "seconds", "new tokens", "tokens/s", "vs fairseq", "gflop", "mfu_%", "bound"]
    print(table(rows, cols))
    info = machine()
    print(f"machine: {info['cpu']} ({info['isa']}; ATen {info['aten_capability']}), {info['threads']} threads")
    print(f"wrote {save('generate', {'machine': info, 'settings': SETTINGS, 'rows': rows})}")


if __name__ == "__main__":
    main()
