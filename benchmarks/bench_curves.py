"""Do our loss curves match fairseq's? The training benchmark's configurations over several seeds, side by side.

    python benchmarks/bench_curves.py --fairseq-bin ~/fairseq-venv/bin [--configs small,medium] [--seeds 1,2,3]
        [--same-init]

Why seeds: from a fresh initialisation, dropout masks and initial weights come from different random number
generators in the two programs, so one seed each cannot tell a real difference from luck (on the small
configuration, our own runs at seeds 1 and 2 end 0.2 bits apart at update 120). Each variant runs every seed;
the table shows, per logged interval, the mean per-token training loss (bits) and its spread (min-max) over
seeds, and the last row says whether our mean is within fairseq's seed-to-seed range. ``--same-init`` starts every
run from fairseq's own initial weights, leaving the dropout masks as the only difference (the batches and their
order are fairseq's in both). Without dropout, continuing a fairseq checkpoint is matched exactly (not
statistically) by ``tests/test_train.py``.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from bench_train import CONFIGS, flags, last_losses
from common import FIXTURE, REPO, machine, run, save


def fairseq_init(fairseq_bin: str, c: dict, save_dir: str) -> list[str]:
    """fairseq's initial weights for config ``c`` (one update at lr 1e-30) and the flags that start from them."""
    cmd = [f"{fairseq_bin}/fairseq-train"] + flags(c, 1, save_dir)
    cmd.remove("--no-save")
    for flag, value in (("--lr", "1e-30"), ("--warmup-init-lr", "1e-30"), ("--min-lr", "1e-30")):
        cmd[cmd.index(flag) + 1] = value
    cmd[cmd.index("--stop-min-lr") + 1] = "1e-31"
    run(cmd, env={"OMP_NUM_THREADS": "2"})
    ckpt = f"{save_dir}/checkpoint_last.pt"
    return ["--restore-file", ckpt, "--reset-optimizer", "--reset-lr-scheduler", "--reset-dataloader", "--reset-meters"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fairseq-bin", default=None, help="folder with fairseq-train (a separate venv)")
    ap.add_argument("--configs", default="small,medium")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--variants", default="ours fp32,ours bf16", help="comma list of: ours fp32, ours bf16")
    ap.add_argument(
        "--same-init",
        action="store_true",
        help="every run starts from fairseq's own initial weights (a 1-update run at lr 1e-30), so only the "
        "dropout random numbers differ between the programs",
    )
    args = ap.parse_args()
    if not FIXTURE.exists():
        sys.exit(f"needs {FIXTURE}")
    seeds = [int(s) for s in args.seeds.split(",")]
    ours = [sys.executable, "-m", "adaptive_lm", "train"]
    variants = [(v, ours, ["--bf16"] if "bf16" in v else []) for v in args.variants.split(",") if v]
    if args.fairseq_bin:
        variants.append(("fairseq fp32", [f"{args.fairseq_bin}/fairseq-train"], []))
    out: dict = {"machine": machine(), "argv": sys.argv, "configs": {}}
    for name in args.configs.split(","):
        c = CONFIGS[name]
        curves: dict[str, list[list[float]]] = {v[0]: [] for v in variants}
        init: list[str] = []
        if args.same_init:
            if not args.fairseq_bin:
                sys.exit("--same-init needs --fairseq-bin (fairseq makes the initial weights)")
            init = fairseq_init(args.fairseq_bin, c, f"/tmp/curves-init-{name}")
        for seed in seeds:
            for label, exe, extra in variants:  # alternate implementations within each seed
                cmd = exe + flags(c, c["updates"], f"/tmp/curves-{name}") + extra + init
                cmd[cmd.index("--seed") + 1] = str(seed)
                r = run(cmd, env={"OMP_NUM_THREADS": "2"})
                curves[label].append(last_losses(r["stdout"] + r["stderr"]))
        n = min(len(x) for runs in curves.values() for x in runs)
        print(f"\n{name}: per-token training loss (bits) at each log interval, mean [min-max] over seeds {seeds}")
        labels = list(curves)
        print("update | " + " | ".join(f"{lab:>22}" for lab in labels))
        summary = {}
        for i in range(n):
            cells = []
            for lab in labels:
                vals = [run_[i] for run_ in curves[lab]]
                cells.append(f"{statistics.mean(vals):7.3f} [{min(vals):6.3f}-{max(vals):6.3f}]")
            print(f"{(i + 1) * 10:6d} | " + " | ".join(f"{cell:>22}" for cell in cells))
        for lab in labels:
            finals = [run_[n - 1] for run_ in curves[lab]]
            summary[lab] = {
                "final_mean": round(statistics.mean(finals), 3),
                "final_min": min(finals),
                "final_max": max(finals),
            }
        if "fairseq fp32" in summary:
            ref = summary["fairseq fp32"]
            for lab in labels[:-1]:
                s = summary[lab]
                inside = ref["final_min"] <= s["final_mean"] <= ref["final_max"]
                overlap = s["final_min"] <= ref["final_max"] and ref["final_min"] <= s["final_max"]
                s["mean_minus_fairseq_mean"] = round(s["final_mean"] - ref["final_mean"], 3)
                s["mean_inside_fairseq_range"] = inside
                s["ranges_overlap"] = overlap
                print(
                    f"{lab}: final mean {s['final_mean']:.3f} vs fairseq {ref['final_mean']:.3f} "
                    f"({s['mean_minus_fairseq_mean']:+.3f} bits); inside fairseq's seed range: {inside}; "
                    f"ranges overlap: {overlap}"
                )
        out["configs"][name] = {"seeds": seeds, "same_init": args.same_init, "curves": curves, "summary": summary}
    path = save("curves_same_init" if args.same_init else "curves", out)
    print(f"wrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
