"""kNN-LM on the shared fixture: what the datastore costs next to ``adaptive-lm eval``, flat vs IVF-PQ, and what the
interpolation buys (LM-only vs kNN-LM perplexity, lambda, k and temperature sweeps), with time and disk per million
keys and the rates that project to WikiText-103 (``docs/knn-lm.md``).

    python benchmarks/bench_knn.py [--repeats 3] [--work /tmp/adaptive-lm-bench-knn]

Datastore: the fixture's train split (245,569 tokens, WikiText-2 test: the text the model was trained on, as in
the paper), keys ``last_ffn_input`` (128 dims). Evaluation: its valid split (217,646 tokens). Model: the fixture's
0.9M-parameter fairseq-trained LM (T=256, context window 0). Writes ``benchmarks/results/knn.json``.

Store-vs-eval cost: the two commands run alternately ``--repeats`` times on the same split with the same settings;
compared are their own loop times ("Evaluated ... in Xs" / "stored ... in Xs", model loading excluded, the same for
both) and whole-process wall times; best of the repeats (the machine is shared: run-to-run spread is large).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common import FIXTURE, machine, run, save, table

MODEL = FIXTURE / "model" / "checkpoint_best.pt"
DATA = FIXTURE / "data-bin"
KS = (1, 8, 32, 128, 512, 1024)
TEMPS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0)
WIKI103_KEYS = 103_225_485  # knnlm's datastore size for the released model (--tokens-per-sample 1536, full blocks)
WIKI103_DIM = 1024
WIKI103_TEST = 245_569  # tokens of WikiText-103 test (valid: 217,646)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "adaptive_lm", *args]


def loop_seconds(text: str, pattern: str) -> float:
    return float(re.search(pattern, text).group(1))


def store_vs_eval(work: Path, repeats: int) -> dict:
    """Alternate eval and knn-store on the train split; best-of loop seconds and walls."""
    common = [str(DATA), "--path", str(MODEL), "--gen-subset", "train", "--no-progress-bar"]
    rows: dict[str, list[dict]] = {"eval": [], "store": [], "store_fp16": []}
    for _ in range(repeats):
        r = run(cli("eval", *common))
        rows["eval"].append(
            {"loop": loop_seconds(r["stdout"], r"tokens in ([\d.]+)s"), "wall": r["wall"], "rss": r["rss_mib"]}
        )
        for name, extra in (("store", []), ("store_fp16", ["--fp16-keys"])):
            r = run(cli("knn-store", *common, "--dstore", str(work / name), "--overwrite", *extra))
            rows[name].append(
                {"loop": loop_seconds(r["stdout"], r"tokens in ([\d.]+)s"), "wall": r["wall"], "rss": r["rss_mib"]}
            )
    best = {k: {m: min(x[m] for x in v) for m in ("loop", "wall", "rss")} for k, v in rows.items()}
    out = {"runs": rows, "best": best}
    for name in ("store", "store_fp16"):
        out[f"{name}_overhead_loop"] = best[name]["loop"] / best["eval"]["loop"] - 1
        out[f"{name}_overhead_wall"] = best[name]["wall"] / best["eval"]["wall"] - 1
    return out


def build_indexes(work: Path) -> dict:
    """The flat and the IVF-PQ index, each in its own folder sharing the store's files (hard links)."""
    res = {}
    for kind in ("flat", "ivfpq"):
        d = work / kind
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        for f in ("keys.npy", "vals.npy", "lm_logprobs.npy"):
            os.link(work / "store" / f, d / f)
        shutil.copy(work / "store" / "manifest.json", d / "manifest.json")
        r = run(cli("knn-index", str(d), "--index", kind, "--no-progress-bar"))
        meta = json.loads((d / "index.json").read_text())
        meta["wall"] = r["wall"]
        meta["rss_mib"] = r["rss_mib"]
        meta["stdout"] = r["stdout"].strip().splitlines()
        res[kind] = meta
    return res


def valid_queries(lm) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Keys, LM log-probs and targets of every scored token of the valid split, as eval scores them."""
    from adaptive_lm.inference.evaluate import EvalConfig, plan, scored_batches
    from adaptive_lm.inference.knn import KeyCapture

    cfg = EvalConfig(data=str(DATA), gen_subset="valid", progress=False)
    q, lp, t = [], [], []
    t0 = time.time()
    with KeyCapture(lm.model, "last_ffn_input") as cap:
        for b in scored_batches(lm, cfg, plan(lm, cfg), feature_fn=cap):
            q.append(b.features.numpy())
            lp.append(b.logprobs)
            t.append(b.targets)
    return np.concatenate(q), np.concatenate(lp), np.concatenate(t), time.time() - t0


def sweeps(folder: Path, queries, lm_lp, targets, approximate: bool = False, chunk: int = 4096) -> dict:
    """One search at k=1024 over the valid split; p_kNN for every k (prefixes of the best-first list) and every
    temperature; lambda sweeps. Chunked so the (N, 1024) float64 scores never exist for the whole split."""
    from adaptive_lm.inference.knn import KNN, lambda_sweep

    knn = KNN.load(folder, k=max(KS), approximate=approximate)
    lp_k = {k: [] for k in KS}
    lp_t = {T: [] for T in TEMPS}
    t0 = time.time()
    for i in range(0, len(queries), chunk):
        s, v = knn.search(queries[i : i + chunk])  # (n, 1024) scores at T=1, best first
        tg = targets[i : i + chunk]
        for k in KS:
            lp_k[k].append(KNN.log_prob_of(s[:, :k], v[:, :k], tg))
        for T in TEMPS:
            lp_t[T].append(KNN.log_prob_of(s / T, v, tg))
    seconds = time.time() - t0
    lp_k = {k: np.concatenate(x) for k, x in lp_k.items()}
    lp_t = {T: np.concatenate(x) for T, x in lp_t.items()}
    fin = np.isfinite(lm_lp)

    def best(knn_lp):
        sw = lambda_sweep(lm_lp[fin], knn_lp[fin])
        return min(sw, key=lambda r: r[1]), sw

    out = {
        "search_seconds": round(knn.search_seconds, 2),
        "distance_seconds": round(knn.distance_seconds, 2),
        "total_seconds": round(seconds, 2),
        "queries": len(queries),
        "by_k": {},
        "by_temperature": {},
    }
    for k in KS:
        (lam, loss, ppl), sw = best(lp_k[k])
        at25 = next(r for r in sw if abs(r[0] - 0.25) < 1e-9)
        out["by_k"][k] = {
            "hit_rate": float(np.isfinite(lp_k[k]).mean()),
            "ppl_lambda_0.25": at25[2],
            "best_lambda": lam,
            "best_ppl": ppl,
        }
        if k == max(KS):
            out["lambda_sweep_k1024_T1"] = [(lam_, ppl_) for lam_, _, ppl_ in sw if round(lam_ * 100) % 5 == 0]
    for T in TEMPS:
        (lam, loss, ppl), sw = best(lp_t[T])
        at25 = next(r for r in sw if abs(r[0] - 0.25) < 1e-9)
        out["by_temperature"][T] = {"ppl_lambda_0.25": at25[2], "best_lambda": lam, "best_ppl": ppl}
    return out


def ivfpq_scan_rate(n: int = 1_000_000, dim: int = 64, nlist: int = 64, nprobe: int = 32, queries: int = 200) -> dict:
    """How fast IVF-PQ scans 64-byte codes into a k=1024 heap on this CPU: on a 103M-key store each query scans
    nprobe x 25,000 codes, a regime the fixture's short lists (60 keys) never reach. Random data, lists of ~15,600
    codes; the scan cost per code (64 table lookups) does not depend on the key dimension."""
    import faiss

    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    index = faiss.IndexIVFPQ(faiss.IndexFlatL2(dim), dim, nlist, 64, 8)
    index.train(x[:20_000])
    index.add(x)
    index.nprobe = nprobe
    q = rng.standard_normal((queries, dim), dtype=np.float32)
    index.search(q[:10], 1024)
    t0 = time.time()
    index.search(q, 1024)
    seconds = time.time() - t0
    sizes = [index.invlists.list_size(i) for i in range(nlist)]
    scanned = queries * nprobe * float(np.mean(sizes))  # lists are near-equal on random data
    return {
        "codes_per_s": scanned / seconds,
        "seconds": seconds,
        "queries": queries,
        "codes_per_query": scanned / queries,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default="/tmp/adaptive-lm-bench-knn")
    ap.add_argument("--skip-cost", action="store_true", help="skip the store-vs-eval timing")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(os.cpu_count() or 1)

    import adaptive_lm

    result: dict = {"machine": machine(), "cores": os.cpu_count()}
    if not args.skip_cost:
        print("store vs eval on the train split ...", flush=True)
        result["cost"] = store_vs_eval(work, args.repeats)
    elif not (work / "store" / "manifest.json").exists():
        run(cli("knn-store", str(DATA), "--path", str(MODEL), "--dstore", str(work / "store"), "--no-progress-bar"))
    store = json.loads((work / "store" / "manifest.json").read_text())
    n_keys = store["identity"]["count"]
    sizes = {f: (work / "store" / f).stat().st_size for f in ("keys.npy", "vals.npy", "lm_logprobs.npy")}
    print("indexes ...", flush=True)
    result["indexes"] = build_indexes(work)

    lm = adaptive_lm.from_pretrained(MODEL)
    queries, lm_lp, targets, q_seconds = valid_queries(lm)
    lm_loss = float(-lm_lp[np.isfinite(lm_lp)].mean() / math.log(2))
    result["valid"] = {"tokens": len(targets), "lm_ppl": 2**lm_loss, "lm_loss_base2": lm_loss, "model_s": q_seconds}
    result["search"] = {}
    for kind in ("flat", "ivfpq"):
        print(f"search + sweeps, {kind} ...", flush=True)
        result["search"][kind] = sweeps(work / kind, queries, lm_lp, targets)
    print("search + sweeps, ivfpq with the index's own distances ...", flush=True)
    result["search"]["ivfpq_approx"] = sweeps(work / "ivfpq", queries, lm_lp, targets, approximate=True)

    print("adaptive-lm eval --knn (ivfpq, k 1024, lambda 0.25) ...", flush=True)
    r = run(cli("eval", str(DATA), "--path", str(MODEL), "--gen-subset", "valid", "--knn", str(work / "ivfpq")))
    result["cli_eval_knn_ivfpq"] = {"wall": r["wall"], "rss_mib": r["rss_mib"], "stdout": r["stdout"].splitlines()}

    # ---- per-key figures and the rates behind the WikiText-103 projection -------------------------------------
    per_m = 1e6 / n_keys
    ivf, flat = result["indexes"]["ivfpq"], result["indexes"]["flat"]
    s_ivf = result["search"]["ivfpq"]
    codes_scanned = len(queries) * ivf["probe"] * n_keys / ivf["ncentroids"]  # IVF lists visited per query
    dim = store["identity"]["dim"]
    k_search = max(KS)
    result["per_million_keys"] = {
        "store_bytes_fp32": sum(sizes.values()) * per_m,
        "store_bytes_fp16": (sizes["keys.npy"] / 2 + sizes["vals.npy"] + sizes["lm_logprobs.npy"]) * per_m,
        "flat_index_bytes": flat["bytes"] * per_m,
        "ivfpq_index_bytes": ivf["bytes"] * per_m,
        "store_seconds": (result["cost"]["best"]["store"]["loop"] * per_m) if "cost" in result else None,
        "ivfpq_train_seconds_1M_sample_est": ivf["train_seconds"] * 1e6 / ivf["train_sample"],
        "ivfpq_add_seconds": ivf["add_seconds"] * per_m,
        "flat_add_seconds": flat["add_seconds"] * per_m,
    }
    print("IVF-PQ scan rate (synthetic, 1M codes) ...", flush=True)
    result["scan"] = ivfpq_scan_rate()
    result["rates"] = {
        "ivfpq_codes_scanned_per_s_fixture": codes_scanned / max(s_ivf["search_seconds"], 1e-9),
        "ivfpq_codes_scanned_per_s_long_lists": result["scan"]["codes_per_s"],
        "recompute_float64_elements_per_s": len(queries) * k_search * dim / max(s_ivf["distance_seconds"], 1e-9),
        "flat_distance_flops_per_s": 2
        * len(queries)
        * n_keys
        * dim
        / max(result["search"]["flat"]["search_seconds"], 1e-9),
    }
    w_codes = WIKI103_TEST * ivf["probe"] * WIKI103_KEYS / 4096
    w_rec = WIKI103_TEST * 1024 * WIKI103_DIM
    result["wikitext103_projection"] = {
        "keys": WIKI103_KEYS,
        "dim": WIKI103_DIM,
        "keys_fp16_bytes": WIKI103_KEYS * WIKI103_DIM * 2,
        "keys_fp32_bytes": WIKI103_KEYS * WIKI103_DIM * 4,
        "vals_bytes": WIKI103_KEYS * 4,
        "lm_logprobs_bytes": WIKI103_KEYS * 4,
        "ivfpq_index_bytes_est": WIKI103_KEYS * (64 + 8) + 4096 * WIKI103_DIM * 4,
        "test_codes_scanned_per_query": w_codes / WIKI103_TEST,
        "test_search_hours_this_cpu": w_codes / result["rates"]["ivfpq_codes_scanned_per_s_long_lists"] / 3600,
        "test_recompute_hours_this_cpu": w_rec / result["rates"]["recompute_float64_elements_per_s"] / 3600,
        "test_recompute_random_read_bytes": WIKI103_TEST * 1024 * WIKI103_DIM * 2,
    }
    save("knn", result)

    # ---- print --------------------------------------------------------------------------------------------------
    print(f"\nmachine: {result['machine']}")
    if "cost" in result:
        c = result["cost"]
        print("\nstore vs eval, train split (245,569 tokens), best of", args.repeats)
        rows = [
            {"run": k, "loop s": f"{v['loop']:.2f}", "wall s": f"{v['wall']:.2f}", "peak RSS MiB": f"{v['rss']:.0f}"}
            for k, v in c["best"].items()
        ]
        print(table(rows, ["run", "loop s", "wall s", "peak RSS MiB"]))
        print(
            f"store adds {100 * c['store_overhead_loop']:+.1f}% (loop) / {100 * c['store_overhead_wall']:+.1f}% "
            f"(wall) to eval; fp16 keys {100 * c['store_fp16_overhead_loop']:+.1f}% / "
            f"{100 * c['store_fp16_overhead_wall']:+.1f}%"
        )
    print("\nindexes:")
    for kind, m in result["indexes"].items():
        print(
            f"  {kind}: {m['bytes'] / 1e6:.1f} MB ({m['bytes_per_key']} B/key), built in {m['seconds']:.1f}s "
            f"(train {m['train_seconds']:.1f}s, add {m['add_seconds']:.1f}s); {' '.join(m.get('notes', []))}"
        )
    v = result["valid"]
    print(f"\nvalid: {v['tokens']:,} tokens, LM only ppl {v['lm_ppl']:.2f}")
    for kind, s in result["search"].items():
        print(
            f"\n{kind}: search {s['search_seconds']}s, distances {s['distance_seconds']}s for {s['queries']:,} "
            f"queries at k=1024"
        )
        rows = [
            {
                "k": k,
                "target found": f"{100 * x['hit_rate']:.1f}%",
                "ppl λ=0.25": f"{x['ppl_lambda_0.25']:.2f}",
                "best λ": x["best_lambda"],
                "best ppl": f"{x['best_ppl']:.2f}",
            }
            for k, x in s["by_k"].items()
        ]
        print(table(rows, ["k", "target found", "ppl λ=0.25", "best λ", "best ppl"]))
        rows = [
            {
                "T": T,
                "ppl λ=0.25": f"{x['ppl_lambda_0.25']:.2f}",
                "best λ": x["best_lambda"],
                "best ppl": f"{x['best_ppl']:.2f}",
            }
            for T, x in s["by_temperature"].items()
        ]
        print(table(rows, ["T", "ppl λ=0.25", "best λ", "best ppl"]))
        print("λ sweep (k 1024, T 1): " + ", ".join(f"{lam:g}: {ppl:.2f}" for lam, ppl in s["lambda_sweep_k1024_T1"]))
    print("\nadaptive-lm eval --knn (ivfpq):")
    print("\n".join("  " + x for x in result["cli_eval_knn_ivfpq"]["stdout"][-6:]))
    print("\nper million keys:", json.dumps(result["per_million_keys"], indent=1))
    print("rates:", json.dumps(result["rates"], indent=1))
    print("WikiText-103 projection:", json.dumps(result["wikitext103_projection"], indent=1))


if __name__ == "__main__":
    main()
