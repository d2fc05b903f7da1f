"""N-best rescoring speed: ``adaptive_lm.inference.rescore`` against fairseq's hub ``score()`` on the same hypotheses.

    python benchmarks/bench_rescore.py [--fairseq-python ~/fairseq-venv/bin/python] [--larger] [--repeats 3]

Hypotheses: the first 1,000 sentences of 8-40 words of WikiText-2 valid, 10 hypotheses each (10,000), made like
an n-best list: word-level edits of the sentence (substitutions by a word of the same text, deletions,
insertions, swaps of neighbours), the sentence itself in about half of the lists, a synthetic first-pass score
that prefers fewer edits but is noisy, each list sorted by it (``make_nbest``; ``--write-tsv FILE`` only writes
them, as a rescoring input with a reference column, for trying ``adaptive-lm rescore``).

Ours runs in this process (``encode_hypotheses`` + ``sentence_logprobs``: length-sorted batches, target-only
softmax, fp32 linears on oneDNN as the command runs them), and again with PyTorch's default MKL linears (the row
``adaptive-lm, MKL linears``: MKL takes its AVX2 path on AMD CPUs). fairseq runs in its own venv, as a user
would call it:
``TransformerLanguageModel.from_pretrained(folder, checkpoint).score(list_of_10000_strings)`` (the hub batches
the list itself). Both time scoring only (tokenisation included), the model already loaded and warm (each fairseq
process makes one untimed call first; our runs share one process), best of ``--repeats`` runs that alternate
between the tools; the scores (sums of the positional scores, natural log) must agree within
1e-4. Models: the shared fixture (fairseq-trained, 0.9M parameters) and, with ``--larger``, bench_eval's random
8-layer d512 model written as a fairseq checkpoint. ``gflop`` / ``mfu_%`` / ``bound``: our run's FLOPs as torch's
FlopCounterMode counts them, their rate over this machine's measured fp32 matmul peak, and the speedup over fairseq
that those FLOPs would give at 100% of the peak (``common.roofline``).

``--fusion`` also times pyctcdecode decoding with ``adaptive_lm.inference.fusion`` on synthetic CTC posteriors (one
ambiguous letter per word): cached states against recomputing every prefix, batched per step or not.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import FIXTURE, SHARED, counted_flops, machine, matmul_peak, roofline, save, table

VALID = SHARED / "data" / "wikitext-2" / "valid.txt"
FAIRSEQ, MKL = "fairseq hub score()", "adaptive-lm, MKL linears"

FAIRSEQ_SCRIPT = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[5]))
from fairseq.models.transformer_lm import TransformerLanguageModel
folder, ckpt, hyp_file, out_file, threads, repeats = sys.argv[1:7]
hyps = [line.rstrip("\n") for line in open(hyp_file, encoding="utf-8")]
lm = TransformerLanguageModel.from_pretrained(folder, ckpt, data_name_or_path=folder)
lm.eval()
lm.score(hyps)  # untimed warm-up: our side's best run is a warm one too
best, res = None, None
for _ in range(int(repeats)):
    t0 = time.perf_counter()
    res = lm.score(hyps)
    dt = time.perf_counter() - t0
    best = dt if best is None else min(best, dt)
scores = [float(r["positional_scores"].double().sum()) for r in res]
n_tok = sum(len(r["positional_scores"]) for r in res)
json.dump({"seconds": best, "tokens": n_tok, "scores": scores}, open(out_file, "w"))
"""


def sentences(path: Path, n: int, lo: int = 8, hi: int = 40) -> list[str]:
    """The first ``n`` sentences of ``lo``-``hi`` words (WikiText paragraphs split after `` .``; headings skipped)."""
    out: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue
        for s in re.split(r"(?<= \.) ", line):
            if lo <= len(s.split()) <= hi:
                out.append(s)
                if len(out) == n:
                    return out
    return out


def make_nbest(refs: list[str], per: int = 10, seed: int = 0) -> list[tuple[str, str, float, str]]:
    """(utterance id, hypothesis, first-pass score, reference) rows: ``per`` distinct hypotheses per sentence."""
    rng = random.Random(seed)
    vocab = sorted({w for s in refs for w in s.split()})
    rows = []
    for u, ref in enumerate(refs):
        words = ref.split()
        hyps: dict[str, int] = {}
        if rng.random() < 0.5:
            hyps[ref] = 0
        while len(hyps) < per:
            h, edits = list(words), rng.randint(1, 4)
            for _ in range(edits):
                op, i = rng.random(), rng.randrange(len(h))
                if op < 0.45:
                    h[i] = rng.choice(vocab)
                elif op < 0.65 and len(h) > 2:
                    del h[i]
                elif op < 0.85:
                    h.insert(i, rng.choice(vocab))
                elif i + 1 < len(h):
                    h[i], h[i + 1] = h[i + 1], h[i]
            hyps.setdefault(" ".join(h), edits)
        scored = [(text, round(-2.0 * e + rng.gauss(0, 2.5), 4)) for text, e in hyps.items()]
        scored.sort(key=lambda x: -x[1])
        rows += [(f"utt{u:04d}", text, s, ref) for text, s in scored]
    return rows


def ours(lm, hyps: list[str], onednn: bool = True) -> dict:
    """One timed pass: encode (dictionary lookups) and score, the model already loaded. ``onednn=False``: with
    PyTorch's default (MKL) linears, to show what ``kernels.FastLinears`` brings on this CPU."""
    from adaptive_lm.core.kernels import FastLinears
    from adaptive_lm.inference.rescore import encode_hypotheses, sentence_logprobs

    saved = FastLinears._ok
    FastLinears._ok = None if onednn else False
    try:
        t0 = time.perf_counter()
        ids = encode_hypotheses(lm, hyps)
        scores = sentence_logprobs(lm, ids)
        secs = time.perf_counter() - t0
    finally:
        FastLinears._ok = saved
    return {"seconds": secs, "tokens": sum(len(x) for x in ids), "scores": scores.tolist()}


def best_of(a: dict | None, b: dict) -> dict:
    return b if a is None or b["seconds"] < a["seconds"] else a


def hub_ready(path: Path, dest: Path) -> Path:
    """A copy of a checkpoint written by ``adaptive_lm.inference.convert`` that fairseq's hub can ``score()`` with.

    Why: our converter writes the cfg sections a model needs (model, task, criterion, dataset), which
    fairseq-eval-lm accepts; the hub interface also reads ``cfg.generation``, ``cfg.bpe``, ``cfg.tokenizer``,
    ... The missing sections are taken from the fixture's real fairseq checkpoint (defaults of fairseq-train)."""
    ck = torch.load(path, weights_only=True)
    full = torch.load(FIXTURE / "model" / "checkpoint_best.pt", weights_only=True)["cfg"]
    missing = [k for k in full if k not in ck["cfg"]]
    if not missing:
        return path
    dest.mkdir(parents=True, exist_ok=True)
    ck["cfg"] = {**{k: full[k] for k in missing}, **ck["cfg"]}
    torch.save(ck, dest / "model.pt")
    (dest / "dict.txt").write_bytes((path.parent / "dict.txt").read_bytes())
    return dest / "model.pt"


def fairseq(python: str, model_path: Path, hyps: list[str], repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        hyp_file, out_file, script = Path(tmp) / "hyps.txt", Path(tmp) / "out.json", Path(tmp) / "score.py"
        hyp_file.write_text("\n".join(hyps) + "\n", encoding="utf-8")
        script.write_text(FAIRSEQ_SCRIPT)
        cmd = [python, str(script), str(model_path.parent), model_path.name, str(hyp_file), str(out_file)]
        cmd += [str(torch.get_num_threads()), str(repeats)]
        p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
        if p.returncode != 0:
            sys.stderr.write(p.stderr[-3000:])
            raise SystemExit(f"fairseq failed ({p.returncode})")
        return json.loads(out_file.read_text())


def ctc_posteriors(text: str, labels: list[str], vocab: dict[str, int], p: float = 0.9) -> np.ndarray:
    """Synthetic CTC log-posteriors spelling ``text`` (a character frame, then a blank frame); in every word one
    letter is ambiguous (0.5 / 0.45) with a letter that spells another dictionary word, so beams branch."""
    index = {c: i for i, c in enumerate(labels)}
    ambiguous: dict[int, tuple[int, int]] = {}
    pos = 0
    for word in text.split(" "):
        alt = next(
            (
                (j, c)
                for j in range(len(word))
                for c in labels[2:]
                if c != word[j] and word[:j] + c + word[j + 1 :] in vocab
            ),
            None,
        )
        if alt:
            ambiguous[pos + alt[0]] = (index[word[alt[0]]], index[alt[1]])
        pos += len(word) + 1
    rows = []
    floor = (1 - p) / (len(labels) - 1)
    for k, ch in enumerate(text):
        row = np.full(len(labels), floor)
        if k in ambiguous:
            a, b = ambiguous[k]
            row[:] = 0.05 / (len(labels) - 2)
            row[a], row[b] = 0.5, 0.45
        else:
            row[index[ch]] = p
        blank = np.full(len(labels), floor)
        blank[0] = p
        rows += [row, blank]
    return np.log(np.array(rows))


def fusion(model_path: Path, utterances: list[str], beam: int, repeats: int) -> list[dict]:
    """Time per utterance of pyctcdecode + our LM: cached states (batched per step / one word per forward) against
    recomputing every prefix (batched / one word per forward, as fairseq's decoder adapter does)."""
    import adaptive_lm
    from adaptive_lm.inference.fusion import FusionLanguageModel, build_fusion_decoder

    lm = adaptive_lm.from_pretrained(model_path)
    labels = ["", " ", *sorted({c for u in utterances for c in u} - {" "})]
    logits = [ctc_posteriors(u, labels, lm.dictionary.indices) for u in utterances]
    out = []
    for name, use_cache, batched in (
        ("cached, batched per step", True, True),
        ("cached, one word per forward", True, False),
        ("recomputing, batched per step", False, True),
        ("recomputing, one word per forward", False, False),
    ):
        flm = FusionLanguageModel(lm, alpha=0.5, beta=1.0, use_cache=use_cache)
        dec = build_fusion_decoder(labels, flm, batched=batched)
        dec.decode_beams(logits[0], beam_width=beam)  # warm-up
        best, texts = None, []
        for _ in range(repeats):
            flm.stats.reset()
            t0 = time.perf_counter()
            texts = [dec.decode_beams(lg, beam_width=beam)[0][0] for lg in logits]
            dt = time.perf_counter() - t0
            best = dt if best is None else min(best, dt)
        n = len(utterances)
        out.append(
            {
                "decoder": name,
                "ms_per_utt": round(1e3 * best / n, 1),
                "forwards_per_utt": round(flm.stats.forwards / n),
                "states_per_utt": round(flm.stats.states / n),
                "positions_per_utt": round(flm.stats.positions / n),
                "sentences_exact": round(float(np.mean([h == u for h, u in zip(texts, utterances)])), 3),
            }
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fairseq-python", default=os.path.expanduser("~/fairseq-venv/bin/python"))
    ap.add_argument("--no-fairseq", action="store_true", help="ours only")
    ap.add_argument("--larger", action="store_true", help="also the random 8-layer d512 model")
    ap.add_argument("--utterances", type=int, default=1000)
    ap.add_argument("--per", type=int, default=10, help="hypotheses per utterance")
    ap.add_argument("--repeats", type=int, default=3, help="best of this many timings (each tool)")
    ap.add_argument("--write-tsv", default=None, help="only write the n-best lists as a TSV with references")
    ap.add_argument("--fusion", action="store_true", help="also time pyctcdecode fusion: cache vs recompute")
    ap.add_argument("--fusion-utterances", type=int, default=20)
    ap.add_argument("--beam", type=int, default=32, help="pyctcdecode beam width for --fusion")
    args = ap.parse_args()
    torch.set_num_threads(2)

    refs = sentences(VALID, args.utterances)
    rows = make_nbest(refs, args.per)
    hyps = [r[1] for r in rows]
    if args.write_tsv:
        with open(args.write_tsv, "w", encoding="utf-8") as f:
            f.write("#id\thypothesis\tam_score\treference\n")
            f.writelines(f"{i}\t{h}\t{s}\t{r}\n" for i, h, s, r in rows)
        print(f"wrote {args.write_tsv}: {len(rows):,} hypotheses of {len(refs):,} utterances (no benchmark run)")
        return
    models = {"fixture": FIXTURE / "model" / "checkpoint_best.pt"}
    if args.larger:
        from bench_eval import larger_checkpoint

        models["larger (8 x d512, random)"] = larger_checkpoint(Path("/tmp/bench-eval-larger"))
    results = []
    peak = matmul_peak(torch.float32)
    print(f"fp32 matmul peak: {peak / 1e9:.0f} GFLOP/s")
    import adaptive_lm
    from adaptive_lm.core.malloc import keep_freed_memory

    keep_freed_memory()  # what the console script does at start
    for name, path in models.items():
        lm = adaptive_lm.from_pretrained(path)
        runs: dict[str, dict] = {}
        for _ in range(args.repeats):  # alternate the tools: the machine's speed drifts
            runs["adaptive-lm"] = best_of(runs.get("adaptive-lm"), ours(lm, hyps))
            runs[MKL] = best_of(runs.get(MKL), ours(lm, hyps, onednn=False))
            if not args.no_fairseq:
                hub_path = hub_ready(path, Path("/tmp/bench-rescore-hub") / path.parent.name)
                runs[FAIRSEQ] = best_of(runs.get(FAIRSEQ), fairseq(args.fairseq_python, hub_path, hyps, 1))
        diff = None
        if FAIRSEQ in runs:
            b = np.asarray(runs[FAIRSEQ]["scores"])
            diff = max(float(np.abs(np.asarray(r["scores"]) - b).max()) for r in runs.values())
        from adaptive_lm.inference.rescore import encode_hypotheses, sentence_logprobs

        flops = counted_flops(lambda lm=lm: sentence_logprobs(lm, encode_hypotheses(lm, hyps)))
        for impl, r in runs.items():
            row = {
                "model": name,
                "impl": impl,
                "hypotheses": len(hyps),
                "tokens": r["tokens"],
                "seconds": round(r["seconds"], 3),
                "hyp_per_s": round(len(hyps) / r["seconds"]),
                "tok_per_s": round(r["tokens"] / r["seconds"]),
            }
            if FAIRSEQ in runs:
                row["speedup"] = round(runs[FAIRSEQ]["seconds"] / r["seconds"], 1)
                row["max_abs_diff"] = f"{diff:.2e}"
            if impl != FAIRSEQ:
                row.update(roofline(flops, r["seconds"], peak, runs.get(FAIRSEQ, {}).get("seconds")))
            results.append(row)
        if diff is not None and diff > 1e-4:
            raise SystemExit(f"{name}: scores differ by {diff:.2e} > 1e-4")
    fusion_rows = []
    if args.fusion:
        torch.set_num_threads(1)  # one-token forwards: a second thread only waits (measured slower)
        plain = [" ".join(w.lower() for w in u.split() if w.isalpha()) for u in sentences(VALID, 2000)]
        lower = [u for u in plain if len(u.split()) >= 8]  # letters and spaces only: a character CTC alphabet
        for name, path in models.items():
            for row in fusion(path, lower[: args.fusion_utterances], args.beam, args.repeats):
                fusion_rows.append({"model": name, **row})
        torch.set_num_threads(2)
    from adaptive_lm.core.hardware import describe

    cols = ["model", "impl", "hypotheses", "tokens", "seconds", "hyp_per_s", "tok_per_s", "speedup", "max_abs_diff",
            "gflop", "mfu_%", "bound"]  # fmt: skip
    print(table(results, cols))
    if fusion_rows:
        print(f"\npyctcdecode shallow fusion, beam {args.beam}, {args.fusion_utterances} utterances, 1 thread:")
        fcols = ["model", "decoder", "ms_per_utt", "forwards_per_utt", "states_per_utt", "positions_per_utt"]
        print(table(fusion_rows, fcols))
    print(f"CPU: {describe()}")
    out = save(
        "rescore_larger" if args.larger else "rescore",
        {
            "command": "python benchmarks/bench_rescore.py " + " ".join(sys.argv[1:]),
            "machine": {**machine(), **describe()},
            "utterances": len(refs),
            "hypotheses_per_utterance": args.per,
            "repeats": args.repeats,
            "rows": results,
            "fusion": fusion_rows,
        },
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
