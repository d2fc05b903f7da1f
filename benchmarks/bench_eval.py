"""Evaluation and generation speed: eval tokens/s with and without a context window, side by side with
fairseq-eval-lm on the same model and data, and generation tokens/s with and without the key/value cache.

    python benchmarks/bench_eval.py [--fairseq-bin ~/fairseq-venv/bin]

Models: the shared fixture (fairseq-trained, 0.9M parameters, T=256) and a larger randomly initialised
configuration of the wiki103 shape (8 layers, d=512, T=1024, same dictionary) written as a fairseq checkpoint so
both tools load the same file. Data: the fixture's valid split (217,646 tokens; WikiText-2 valid). Perplexities
are printed next to each other: they must agree. ``gflop`` / ``mfu_%`` / ``bound``: our fp32 run's FLOPs as torch's
FlopCounterMode counts them, their rate over the eval time (from the tool's own tokens/s) against this machine's
fp32 matmul peak, and the speedup over fairseq at 100% of that peak (``common.roofline``).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch

from common import FIXTURE, counted_flops, machine, matmul_peak, roofline, run, save, table

LARGER = dict(
    decoder_layers=8,
    decoder_embed_dim=512,
    decoder_ffn_embed_dim=2048,
    decoder_attention_heads=8,
    adaptive_input_cutoff=(2000, 8000),
    adaptive_softmax_cutoff=(2000, 8000),
    max_target_positions=1024,
)


def larger_checkpoint(dest: Path) -> Path:
    from adaptive_lm import build_model
    from adaptive_lm.core.dictionary import Dictionary
    from adaptive_lm.core.fairseq_format import to_fairseq_checkpoint
    from adaptive_lm.inference.hub import LanguageModel

    path = dest / "model.pt"
    if not path.exists():
        dest.mkdir(parents=True, exist_ok=True)
        d = Dictionary.load(FIXTURE / "model" / "dict.txt")
        torch.manual_seed(0)
        lm = LanguageModel(build_model("transformer_lm_wiki103", len(d), **LARGER), d, "", 1024)
        torch.save(to_fairseq_checkpoint(lm.model, lm.cfg, lm.tokens_per_sample), path)
        d.save(dest / "dict.txt")
    return path


def eval_flops(path: Path, data: Path, tps: int, cw: int) -> float:
    """FLOPs of our fp32 evaluation of the split with the benchmark's flags (``common.counted_flops``)."""
    import adaptive_lm
    from adaptive_lm.inference.evaluate import EvalConfig, evaluate

    lm = adaptive_lm.from_pretrained(path)
    cfg = EvalConfig(data=str(data), gen_subset="valid", context_window=cw, tokens_per_sample=tps, batch_size=8,
                     progress=False)  # fmt: skip
    return counted_flops(lambda: evaluate(lm, cfg))


def parse(text: str) -> tuple[int, float, float]:
    """(tokens, tokens/s, perplexity) from the tool's log. The rate, not the seconds: both tools print the seconds
    to 0.1 s (4% of a 2.5 s evaluation) and the rate to 0.01 token/s, from the same unrounded time."""
    n = int(re.search(r"Evaluated ([\d,]+) tokens", text).group(1).replace(",", ""))
    rate = float(re.search(r"s \(([\d.]+) tokens/s", text).group(1))
    ppl = float(re.search(r"Perplexity: ([\d.]+)", text).group(1))
    return n, rate, ppl


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fairseq-bin", default=None)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--models", default="fixture,larger")
    ap.add_argument("--no-bf16", action="store_true", help="skip our bf16 runs")
    ap.add_argument("--out", default="eval", help="results/NAME.json")
    args = ap.parse_args()
    data = FIXTURE / "data-bin"
    models = {
        "fixture": (FIXTURE / "model" / "checkpoint_best.pt", 256),
        "larger": (larger_checkpoint(Path("/tmp/bench-eval-larger")), 1024),
    }
    rows = []
    models = {k: v for k, v in models.items() if k in args.models.split(",")}
    peak = matmul_peak(torch.float32)
    print(f"fp32 matmul peak: {peak / 1e9:.0f} GFLOP/s")
    for name, (path, tps) in models.items():
        for cw in (0, tps // 2):
            common = [
                str(data),
                "--path",
                str(path),
                "--gen-subset",
                "valid",
                "--cpu",
                "--batch-size",
                "8",
                "--tokens-per-sample",
                str(tps),
                "--context-window",
                str(cw),
            ]
            ours = [sys.executable, "-m", "adaptive_lm", "eval"]
            impls = [("adaptive-lm", ours, [])] + ([] if args.no_bf16 else [("adaptive-lm bf16", ours, ["--bf16"])])
            if args.fairseq_bin:
                impls.append(("fairseq", [f"{args.fairseq_bin}/fairseq-eval-lm"], ["--num-workers", "0"]))
            got = {}
            for _ in range(args.repeats):
                for label, exe, extra in impls:
                    r = run(exe + common + extra, env={"OMP_NUM_THREADS": "2"})
                    n, rate, ppl = parse(r["stdout"] + r["stderr"])
                    if label not in got or r["wall"] < got[label]["process_s"]:
                        got[label] = {
                            "model": name,
                            "context": cw,
                            "impl": label,
                            "tokens": n,
                            "ppl": ppl,
                            "eval_tok_per_s": round(rate),
                            "process_s": round(r["wall"], 1),
                            "peak_rss_mib": round(r["rss_mib"]),
                        }
            flops = eval_flops(path, data, tps, cw)
            for label, row in got.items():
                if "fairseq" in got and label != "fairseq":
                    row["speedup"] = round(row["eval_tok_per_s"] / got["fairseq"]["eval_tok_per_s"], 2)
                if label == "adaptive-lm":
                    base = got["fairseq"]["tokens"] / got["fairseq"]["eval_tok_per_s"] if "fairseq" in got else None
                    row.update(roofline(flops, row["tokens"] / row["eval_tok_per_s"], peak, base))
                rows.append(row)
    cols = ["model", "context", "impl", "tokens", "ppl", "eval_tok_per_s", "process_s", "peak_rss_mib", "speedup",
            "gflop", "mfu_%", "bound"]  # fmt: skip
    print(table(rows, cols))

    # generation: 200 new tokens, greedy, with and without the cache
    import adaptive_lm

    gen_rows = []
    for name, (path, _) in models.items():
        lm = adaptive_lm.from_pretrained(path)
        prompt = [lm.encode("the")]
        for cache in (True, False):
            lm.generate(prompt, beam=1, max_len_b=10, min_len=10, use_cache=cache)
            t0 = time.time()
            h = lm.generate(prompt, beam=1, max_len_b=201, min_len=201, use_cache=cache)[0][0]
            dt = time.time() - t0
            gen_rows.append(
                {
                    "model": name,
                    "kv_cache": cache,
                    "new_tokens": len(h["tokens"]) - 1,
                    "tok_per_s": round((len(h["tokens"]) - 1) / dt, 1),
                }
            )
    print(table(gen_rows, ["model", "kv_cache", "new_tokens", "tok_per_s"]))
    save(args.out, {"machine": machine(), "eval": rows, "generation": gen_rows})


if __name__ == "__main__":
    main()
