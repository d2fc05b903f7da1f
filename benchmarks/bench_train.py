"""Training speed side by side: whole-process wall time for the same updates, words/s, peak RSS, MFU.

    python benchmarks/bench_train.py [--fairseq-bin ~/fairseq-venv/bin] [--configs small,medium] [--repeats 2]

Data: the shared fixture's data-bin (WikiText-2 test as training text, made by fairseq-preprocess).
Each configuration runs ours (fp32, and bf16 for ``medium``) and, with ``--fairseq-bin``, fairseq-train with the
same flags, alternating, and prints ours/fairseq ratios. MFU = model FLOPs actually executed per update (counted
by torch's FlopCounterMode on a real batch, forward + backward) x updates / training seconds / the matmul peak
this script measures for that dtype; ``bound``: the speedup over fairseq if those FLOPs ran at 100% of that peak and
nothing else took time (whole-process walls: startup counts against both).
"""

from __future__ import annotations

import argparse
import re
import sys

import torch

from common import FIXTURE, REPO, flop_counter, machine, matmul_peak, roofline, run, save, table

CONFIGS = {
    "small": dict(layers=2, dim=128, ffn=512, heads=4, tps=256, max_tokens=2048, cutoff="2000,8000", updates=300),
    "medium": dict(layers=4, dim=512, ffn=2048, heads=8, tps=512, max_tokens=2048, cutoff="1000,3000", updates=40),
}


def flags(c: dict, updates: int, save_dir: str) -> list[str]:
    return [
        str(FIXTURE / "data-bin"),
        "--task",
        "language_modeling",
        "--arch",
        "transformer_lm_wiki103",
        "--decoder-layers",
        str(c["layers"]),
        "--decoder-embed-dim",
        str(c["dim"]),
        "--decoder-ffn-embed-dim",
        str(c["ffn"]),
        "--decoder-attention-heads",
        str(c["heads"]),
        "--decoder-input-dim",
        str(c["dim"]),
        "--decoder-output-dim",
        str(c["dim"]),
        "--adaptive-input-cutoff",
        c["cutoff"],
        "--adaptive-softmax-cutoff",
        c["cutoff"],
        "--max-update",
        str(updates),
        "--lr",
        "1.0",
        "--t-mult",
        "2",
        "--lr-period-updates",
        "270",
        "--lr-scheduler",
        "cosine",
        "--lr-shrink",
        "0.75",
        "--warmup-updates",
        "30",
        "--warmup-init-lr",
        "1e-07",
        "--stop-min-lr",
        "1e-09",
        "--optimizer",
        "nag",
        "--min-lr",
        "0.0001",
        "--clip-norm",
        "0.1",
        "--criterion",
        "adaptive_loss",
        "--max-tokens",
        str(c["max_tokens"]),
        "--update-freq",
        "1",
        "--tokens-per-sample",
        str(c["tps"]),
        "--seed",
        "1",
        "--sample-break-mode",
        "none",
        "--skip-invalid-size-inputs-valid-test",
        "--ddp-backend=legacy_ddp",
        "--cpu",
        "--num-workers",
        "0",
        "--disable-validation",
        "--no-save",
        "--log-format",
        "simple",
        "--log-interval",
        "10",
        "--save-dir",
        save_dir,
    ]


def last_losses(text: str) -> list[float]:
    """Per-interval training losses (fairseq's epoch-summary "train" line, an epoch average, is left out)."""
    lines = [line for line in text.splitlines() if "train_inner" in line]
    return [float(x) for line in lines for x in re.findall(r"loss[ =]([\d.]+)", line)]


def flops_per_update(c: dict, bf16: bool) -> float:
    """Forward + backward FLOPs of one real 2048-token batch of the fixture data through our model."""
    from adaptive_lm import build_model
    from adaptive_lm.core.data import LMDataset, load_split

    ds = LMDataset.from_split(load_split(FIXTURE / "data-bin", "train"), c["tps"], "none")
    n = c["max_tokens"] // c["tps"]
    batch = ds.collate(list(range(n)))
    cut = tuple(int(x) for x in c["cutoff"].split(","))
    model = build_model(
        "transformer_lm_wiki103",
        14152,
        decoder_layers=c["layers"],
        decoder_embed_dim=c["dim"],
        decoder_ffn_embed_dim=c["ffn"],
        decoder_attention_heads=c["heads"],
        adaptive_input_cutoff=cut,
        adaptive_softmax_cutoff=cut,
    )

    def update() -> None:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)
        with ctx:
            loss = model.loss(batch["src_tokens"], batch["target"], tail_ignore_quirk=True)  # as the trainer
        loss.backward()

    # once uncounted: a kernel whose choice is not yet cached on this machine times every candidate on its first
    # call, and the counter would add their FLOPs (medium read 10.3 TFLOP for 40 updates instead of 7.1)
    update()
    with flop_counter() as fc:
        update()
    return float(fc.get_total_flops())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fairseq-bin", default=None, help="folder with fairseq-train (a separate venv)")
    ap.add_argument("--configs", default="small,medium")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--updates", type=int, default=0, help="override the per-config update count")
    ap.add_argument("--checkpoint-activations", action="store_true",
                    help="also run ours with --checkpoint-activations (memory saved, same numbers)")  # fmt: skip
    ap.add_argument("--no-bf16", action="store_true", help="skip our bf16 runs (a CPU without native bf16)")
    ap.add_argument("--out", default="train", help="results/NAME.json")
    args = ap.parse_args()
    if not FIXTURE.exists():
        sys.exit(f"needs {FIXTURE}")
    peaks = {"fp32": matmul_peak(torch.float32)}
    if not args.no_bf16:  # (without native bf16 the probe alone takes minutes)
        peaks["bf16"] = matmul_peak(torch.bfloat16)
    print("matmul peak: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items()))
    rows = []
    ours_bin = [sys.executable, "-m", "adaptive_lm", "train"]
    for name in args.configs.split(","):
        c = CONFIGS[name]
        updates = args.updates or c["updates"]
        variants = [("ours fp32", ours_bin, [])] + ([] if args.no_bf16 else [("ours bf16", ours_bin, ["--bf16"])])
        if args.checkpoint_activations:
            variants.append(("ours fp32 ckpt-act", ours_bin, ["--checkpoint-activations"]))
        if args.fairseq_bin:
            variants.append(("fairseq fp32", [f"{args.fairseq_bin}/fairseq-train"], []))
        results: dict[str, list[dict]] = {v[0]: [] for v in variants}
        for _ in range(args.repeats):
            for label, exe, extra in variants:  # alternate implementations within each repeat
                r = run(exe + flags(c, updates, f"/tmp/bench-{name}") + extra, env={"OMP_NUM_THREADS": "2"})
                r["losses"] = last_losses(r["stdout"] + r["stderr"])
                results[label].append(r)
        tokens = updates * c["max_tokens"]
        base = min(x["wall"] for x in results["fairseq fp32"]) if args.fairseq_bin else None
        for label, rs in results.items():
            best = min(rs, key=lambda x: x["wall"])
            dtype = "bf16" if "bf16" in label else "fp32"
            row = {
                "config": name,
                "run": label,
                "updates": updates,
                "wall_s": round(best["wall"], 1),
                "words_per_s": round(tokens / best["wall"]),
                "peak_rss_mib": round(best["rss_mib"]),
                "final_loss": best["losses"][-1] if best["losses"] else "",
            }
            if label.startswith("ours"):
                f = flops_per_update(c, dtype == "bf16")
                row.update(roofline(f * updates, best["wall"], peaks[dtype], base))
                row["mfu_dtype"] = dtype
            if base:
                row["speedup_vs_fairseq_fp32"] = round(base / best["wall"], 2)
            rows.append(row)
    cols = [
        "config",
        "run",
        "updates",
        "wall_s",
        "words_per_s",
        "peak_rss_mib",
        "final_loss",
        "mfu_%",
        "speedup_vs_fairseq_fp32",
        "bound",
    ]
    print(table(rows, cols))
    print("(wall = whole process, startup and data loading included; MFU over this machine's measured peak)")
    path = save(args.out, {"machine": machine(), "peaks": peaks, "rows": rows, "argv": sys.argv})
    print(f"wrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
