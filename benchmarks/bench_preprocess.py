"""Preprocessing throughput and memory on a WikiText-103-sized generated corpus, ours vs fairseq-preprocess.

    python benchmarks/bench_preprocess.py [--tokens 100000000] [--fairseq-bin DIR] [--fairseq-tokens 10000000]

The corpus: Zipfian words over ~267k types (WikiText-103's vocabulary size), lines of WikiText-like lengths
(paragraphs of 20-200 words, blank lines, ``= Heading =`` lines), written once and reused. Both tools binarise
it as the training split with ``--workers 1`` and ``--workers 2``; we report tokens/s (tokens incl. one ``</s>``
per line) and peak RSS. fairseq is slow, so it runs on a prefix of ``--fairseq-tokens`` tokens (the throughput
is per token, so the ratio is fair; ours is also timed on that prefix for a like-for-like line).
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
from pathlib import Path

import numpy as np

from common import run, save, table

TYPES = 267_000


def make_corpus(path: Path, tokens: int, seed: int = 0) -> int:
    """Write about ``tokens`` tokens; returns the exact count (words + one </s> per line)."""
    rng = np.random.default_rng(seed)
    words = np.array([f"w{i}" for i in range(TYPES)])
    p = 1.0 / np.arange(1, TYPES + 1) ** 1.0
    p /= p.sum()
    n, total = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while total < tokens:
            ids = rng.choice(TYPES, size=1_000_000, p=p)
            pos = 0
            out = []
            while pos < len(ids):
                r = rng.random()
                if r < 0.05:
                    out.append("")
                    total += 1
                    continue
                k = int(rng.integers(2, 6)) if r < 0.1 else int(rng.integers(20, 200))
                line = " ".join(words[ids[pos : pos + k]])
                out.append(f" = {line} = " if r < 0.1 else f" {line} ")
                total += k + (2 if r < 0.1 else 0) + 1
                pos += k
            f.write("\n".join(out) + "\n")
            n += len(out)
    return total


def count_tokens(path: Path) -> int:
    total = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            total += len(line.split()) + 1
    return total


def prefix(src: Path, dst: Path, tokens: int) -> int:
    total = 0
    with open(src, encoding="utf-8") as f, open(dst, "w", encoding="utf-8") as g:
        for line in f:
            g.write(line)
            total += len(line.split()) + 1
            if total >= tokens:
                break
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=100_000_000)
    ap.add_argument("--fairseq-bin", default=None)
    ap.add_argument("--fairseq-tokens", type=int, default=10_000_000)
    ap.add_argument("--dir", default="/tmp/bench-preprocess")
    args = ap.parse_args()
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    big = d / f"corpus-{args.tokens}.txt"
    if not big.exists():
        print(f"generating {args.tokens:,} tokens ...", flush=True)
        make_corpus(big, args.tokens)
    n_big = count_tokens(big)
    small = d / f"prefix-{args.fairseq_tokens}.txt"
    n_small = prefix(big, small, args.fairseq_tokens)
    rows = []

    def ours(text: Path, n: int, workers: int, label: str) -> Path:
        out = d / f"ours-{label}-w{workers}"
        shutil.rmtree(out, ignore_errors=True)
        r = run(
            [
                sys.executable,
                "-m",
                "adaptive_lm",
                "preprocess",
                "--only-source",
                "--trainpref",
                str(text),
                "--destdir",
                str(out),
                "--workers",
                str(workers),
                "--no-progress-bar",
            ]
        )
        rows.append(
            {
                "tool": "adaptive-lm",
                "corpus": label,
                "tokens": f"{n:,}",
                "workers": workers,
                "seconds": round(r["wall"], 1),
                "tokens_per_s": round(n / r["wall"]),
                "peak_rss_mib": round(r["rss_mib"]),
            }
        )
        return out

    for w in (1, 2):
        ours(big, n_big, w, "full")
    for w in (1, 2):
        mine = ours(small, n_small, w, "prefix")
        if args.fairseq_bin:
            out = d / f"fairseq-w{w}"
            shutil.rmtree(out, ignore_errors=True)
            r = run(
                [
                    f"{args.fairseq_bin}/fairseq-preprocess",
                    "--only-source",
                    "--trainpref",
                    str(small),
                    "--destdir",
                    str(out),
                    "--workers",
                    str(w),
                    "--dataset-impl",
                    "mmap",
                ]
            )
            same = all(filecmp.cmp(out / f, mine / f, shallow=False) for f in ("dict.txt", "train.bin", "train.idx"))
            rows.append(
                {
                    "tool": "fairseq",
                    "corpus": "prefix",
                    "tokens": f"{n_small:,}",
                    "workers": w,
                    "seconds": round(r["wall"], 1),
                    "tokens_per_s": round(n_small / r["wall"]),
                    "peak_rss_mib": round(r["rss_mib"]),
                    "identical_output": same,
                }
            )
    print(
        table(
            rows, ["tool", "corpus", "tokens", "workers", "seconds", "tokens_per_s", "peak_rss_mib", "identical_output"]
        )
    )
    if args.fairseq_bin:
        for w in (1, 2):
            a = next(r for r in rows if r["tool"] == "adaptive-lm" and r["corpus"] == "prefix" and r["workers"] == w)
            b = next(r for r in rows if r["tool"] == "fairseq" and r["workers"] == w)
            print(f"workers {w}: adaptive-lm / fairseq throughput = {a['tokens_per_s'] / b['tokens_per_s']:.1f}x")
    save("preprocess", {"rows": rows})


if __name__ == "__main__":
    main()
