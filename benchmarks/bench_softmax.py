"""The output layer alone, forward + backward: our AdaptiveSoftmax vs torch.nn.AdaptiveLogSoftmaxWithLoss vs a full
softmax, at the WikiText-103 sizes (V = 267,744, d = 1024, cutoffs 20000,60000, factor 4).

    python benchmarks/bench_softmax.py [--tokens 2048] [--bf16]

Targets are drawn from a Zipf distribution over the vocabulary ids (ids are frequency-sorted, as in fairseq's
dictionary), so the band occupancy resembles real text (~80-85% of tokens in the head).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from adaptive_lm import AdaptiveSoftmax
from common import machine, save, table

V, D, CUT = 267_744, 1024, [20000, 60000]


def timeit(fn, n: int = 8) -> float:
    fn()
    t0 = time.time()
    for _ in range(n):
        fn()
    return (time.time() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--bf16", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    N = args.tokens
    p = 1.0 / torch.arange(1, V + 1, dtype=torch.float64) ** 1.0
    target = torch.multinomial(p / p.sum(), N, replacement=True)
    x = torch.randn(N, D, requires_grad=True)
    ours = AdaptiveSoftmax(V, D, CUT, dropout=0.0, factor=4.0)
    ref = torch.nn.AdaptiveLogSoftmaxWithLoss(D, V, CUT, div_value=4.0, head_bias=False)
    full = torch.nn.Linear(D, V, bias=False)
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16)

    def run_ours():
        with amp:
            loss = ours.loss(x, target, ignore_index=-100)
        loss.backward()

    def run_ref():
        with amp:
            loss = ref(x, target).loss * N
        loss.backward()

    def run_full():
        with amp:
            loss = F.cross_entropy(full(x).float(), target, reduction="sum")
        loss.backward()

    rows = []
    base = None
    layers = [
        ("full softmax", run_full),
        ("torch AdaptiveLogSoftmaxWithLoss", run_ref),
        ("adaptive_lm AdaptiveSoftmax", run_ours),
    ]
    if args.bf16:  # torch's module fails under bf16 autocast (index_copy_ of bf16 rows into an fp32 output)
        layers.pop(1)
    for name, fn in layers:
        t = timeit(fn)
        base = base or t
        rows.append(
            {
                "layer": name,
                "tokens": N,
                "ms_fwd_bwd": round(1000 * t, 1),
                "tokens_per_s": round(N / t),
                "vs_full": round(base / t, 2),
            }
        )
    head = (target < CUT[0]).double().mean().item()
    print(
        f"V={V:,} d={D} cutoffs {CUT} | {100 * head:.1f}% of targets in the head | "
        f"{'bf16 autocast' if args.bf16 else 'fp32'}"
    )
    print(table(rows, ["layer", "tokens", "ms_fwd_bwd", "tokens_per_s", "vs_full"]))
    save("softmax" + ("_bf16" if args.bf16 else ""), {"machine": machine(), "rows": rows, "head_fraction": head})


if __name__ == "__main__":
    main()
