"""The paper's seed recipe, unchanged except ``--max-update``, on a generated corpus with V > 60,000 words.

    python benchmarks/bench_recipe.py [--updates 2] [--vocab 70000] [--bf16] [--fairseq-bin DIR]

Prints seconds per update (from the trainer's own timing, first update included) and the whole process's
peak RSS. Reference (DEVELOPERS.md / issue): fairseq needs 350 s and 22.2 GB peak RSS for one such update
(V = 70,000) on this 24 GB machine; the target is at most 12 GB and less time.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

from common import machine, run, save, table

RECIPE = """--task language_modeling {data} --save-dir {save}
  --arch transformer_lm_wiki103 --max-update {updates} --lr 1.0 --t-mult 2 --lr-period-updates 270000
  --lr-scheduler cosine --lr-shrink 0.75 --warmup-updates 16000 --warmup-init-lr 1e-07 --stop-min-lr 1e-09
  --optimizer nag --min-lr 0.0001 --clip-norm 0.1 --criterion adaptive_loss --max-tokens 3072
  --update-freq 3 --tokens-per-sample 3072 --seed 1 --sample-break-mode none
  --skip-invalid-size-inputs-valid-test --ddp-backend=legacy_ddp"""


def make_corpus(path: Path, vocab: int, tokens: int, seed: int = 0) -> None:
    """Every word once (so the dictionary has ``vocab`` types), then Zipfian words in lines of 5-40 words."""
    rng = np.random.default_rng(seed)
    words = np.array([f"w{i}" for i in range(vocab)])
    ranks = np.arange(1, vocab + 1)
    p = 1.0 / ranks**1.05
    p /= p.sum()
    body = words[rng.choice(vocab, size=tokens, p=p)]
    stream = np.concatenate([words, body])
    lines, i = [], 0
    while i < len(stream):
        n = int(rng.integers(5, 40))
        lines.append(" ".join(stream[i : i + n]))
        i += n
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--updates", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=70_000)
    ap.add_argument("--dir", default="/tmp/bench-recipe")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--fairseq-bin", default=None)
    ap.add_argument("--checkpoint-activations", action="store_true", help="ours: recompute activations in backward")
    args = ap.parse_args()
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    data = d / "data-bin"
    if not (data / "train.idx").exists():
        make_corpus(d / "train.txt", args.vocab, 400_000)
        make_corpus(d / "valid.txt", args.vocab, 20_000, seed=1)
        run(
            [
                sys.executable,
                "-m",
                "adaptive_lm",
                "preprocess",
                "--only-source",
                "--trainpref",
                str(d / "train.txt"),
                "--validpref",
                str(d / "valid.txt"),
                "--destdir",
                str(data),
                "--workers",
                "2",
            ]
        )
    V = sum(1 for _ in open(data / "dict.txt")) + 4
    rows = []
    impls = [("ours", [sys.executable, "-m", "adaptive_lm", "train"])]
    if args.fairseq_bin:
        impls.append(("fairseq", [f"{args.fairseq_bin}/fairseq-train"]))
    for name, exe in impls:
        save_dir = d / f"ckpt-{name}"
        flags = RECIPE.format(data=data, save=save_dir, updates=args.updates).split()
        extra = ["--cpu", "--no-save", "--disable-validation", "--log-interval", "1"]
        if name == "ours":
            extra += ["--log-format", "json", "--no-progress-bar"]
        if args.bf16 and name == "ours":
            extra.append("--bf16")
        if args.checkpoint_activations and name == "ours":
            extra.append("--checkpoint-activations")
        r = run(exe + flags + extra, env={"OMP_NUM_THREADS": "2"})
        walls = [json.loads(x)["wall"] for x in r["stdout"].splitlines() if x.startswith("{") and "train_inner" in x]
        per_update = r["wall"] / args.updates
        if walls:
            per_update = walls[-1] / args.updates
        warn = re.findall(r"warning: the paper's recipe .*", r["stdout"])
        rows.append(
            {
                "impl": name
                + (" bf16" if args.bf16 and name == "ours" else " fp32")
                + (" ckpt-act" if args.checkpoint_activations and name == "ours" else ""),
                "vocab": V,
                "updates": args.updates,
                "s_per_update": round(per_update, 1),
                "process_s": round(r["wall"]),
                "peak_rss_gib": round(r["rss_mib"] / 1024, 2),
            }
        )
        if warn:
            print(warn[0])
    print(table(rows, ["impl", "vocab", "updates", "s_per_update", "process_s", "peak_rss_gib"]))
    tag = ("_bf16" if args.bf16 else "") + ("_ckpt" if args.checkpoint_activations else "")
    save("recipe" + tag, {"machine": machine(), "rows": rows})


if __name__ == "__main__":
    main()
