"""kNN-LM: the datastore (keys, values, resume after a real kill), FAISS indexes, interpolated evaluation equal to a
brute-force NumPy reference, and a one-line refusal for every bad input."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import adaptive_lm
from adaptive_lm.cli import main
from adaptive_lm.core.data import load_split
from adaptive_lm.core.errors import UserError
from adaptive_lm.core.kernels import fast_linears
from adaptive_lm.inference.evaluate import EvalConfig, context_windows, plan, scored_batches
from adaptive_lm.inference.knn import KNN, first_blocks, interpolate, knn_evaluate, knn_score, knn_summary_lines
from adaptive_lm.inference.knn.keys import KEYTYPES, KeyCapture
from adaptive_lm.inference.knn.records import load_manifest

TPS = "64"  # small blocks keep the stores small: 200 blocks = 12,800 keys


@pytest.fixture(scope="module")
def fx():
    from conftest import FAIRSEQ_TINY

    return FAIRSEQ_TINY


@pytest.fixture(scope="module")
def lm(fx):
    return adaptive_lm.from_pretrained(fx / "model" / "checkpoint_last.pt")


def store_args(fx: Path, dstore: Path, *extra: str) -> list[str]:
    return [
        "knn-store",
        str(fx / "data-bin"),
        "--path",
        str(fx / "model" / "checkpoint_last.pt"),
        "--dstore",
        str(dstore),
        "--tokens-per-sample",
        TPS,
        "--batch-size",
        "16",
        "--no-progress-bar",
        *extra,
    ]


def eval_args(fx: Path, dstore: Path, *extra: str) -> list[str]:
    """``eval --knn`` on continue/data-bin's train split: 1,931 tokens of WikiText-2 with the model's dictionary."""
    return [
        "eval",
        str(fx / "continue" / "data-bin"),
        "--path",
        str(fx / "model" / "checkpoint_last.pt"),
        "--gen-subset",
        "train",
        "--knn",
        str(dstore),
        "--no-progress-bar",
        *extra,
    ]


@pytest.fixture(scope="module")
def raw_store(fx, tmp_path_factory) -> Path:
    """12,800 keys from the first 200 blocks of 64 tokens of the train split (no index: no faiss needed)."""
    d = tmp_path_factory.mktemp("knn") / "store"
    assert main(store_args(fx, d, "--max-blocks", "200")) == 0
    return d


@pytest.fixture(scope="module")
def store(raw_store) -> Path:
    """The same store with a flat index: needs faiss (the [knn] extra, which CI installs)."""
    pytest.importorskip("faiss", reason="the [knn] extra (pip install 'adaptive-lm[knn]')")
    if not (raw_store / "index.faiss").exists():
        assert main(["knn-index", str(raw_store), "--no-progress-bar"]) == 0  # auto: flat below 100k keys
    return raw_store


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def digests(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


# ---- the datastore -------------------------------------------------------------------------------------------
def test_store_holds_every_scored_token_with_evals_scores(fx, lm, raw_store):
    store = raw_store
    m = json.loads((store / "manifest.json").read_text())
    assert m["progress"]["complete"] and m["identity"]["count"] == 12_800 and m["identity"]["dim"] == 64
    keys, vals = np.load(store / "keys.npy"), np.load(store / "vals.npy")
    lp = np.load(store / "lm_logprobs.npy")
    assert keys.dtype == np.float32 and keys.shape == (12_800, 64) and vals.dtype == np.int32
    cfg = EvalConfig(data=str(fx / "data-bin"), gen_subset="train", tokens_per_sample=64, batch_size=16, progress=False)
    p = first_blocks(plan(lm, cfg), 200)
    ref_t, ref_lp = [], []
    for b in scored_batches(lm, cfg, p):
        ref_t.append(b.targets)
        ref_lp.append(b.logprobs)
    assert np.array_equal(vals, np.concatenate(ref_t))  # the values are the scored targets, in stream order
    assert np.array_equal(lp, np.concatenate(ref_lp).astype(np.float32))  # eval's own scores
    # the key is the input of the last layer's feed-forward block: rebuild that block's output from it
    layer = lm.model.layers[-1]
    src = torch.from_numpy(p.dataset.item(0)[0])[None]  # (1, 64)
    with torch.no_grad():
        _, states = lm.model(src, return_all_hiddens=True)
        k = torch.from_numpy(keys[:64])[None]  # (1, 64, 64)
        before_ffn = states[-1] - layer.fc2(torch.relu(layer.fc1(k)))  # the residual stream entering the FFN
        assert torch.allclose(layer.final_layer_norm(before_ffn), k, atol=2e-5)


def test_final_keys_are_the_features_before_the_softmax_and_fp16_keys(fx, lm, tmp_path):
    assert main(store_args(fx, tmp_path / "f", "--max-blocks", "20", "--keytype", "final", "--fp16-keys")) == 0
    keys = np.load(tmp_path / "f" / "keys.npy")
    assert keys.dtype == np.float16 and keys.shape == (1280, 64)
    cfg = EvalConfig(data=str(fx / "data-bin"), gen_subset="train", tokens_per_sample=64, progress=False)
    src = torch.from_numpy(np.stack([first_blocks(plan(lm, cfg), 20).dataset.item(i)[0] for i in range(20)]))
    with torch.no_grad(), fast_linears(lm.device):  # the store's arithmetic (eval's oneDNN linears on CPU)
        feats = lm.model(src).reshape(-1, 64).numpy()  # (20 * 64, 64)
    # the keys are the features rounded to fp16: within half an fp16 step of them, plus fp32 noise (the store runs
    # other batch shapes, whose GEMMs may sum in another order or on the other library)
    half_step = np.spacing(np.abs(feats).astype(np.float16)).astype(np.float32) / 2  # (1280, 64)
    assert np.all(np.abs(keys.astype(np.float32) - feats) <= half_step + 1e-5 * np.maximum(1, np.abs(feats)))
    assert np.mean(keys == feats.astype(np.float16)) > 0.99  # and almost all are the very same fp16 values


@pytest.mark.parametrize("keytype", KEYTYPES)
def test_keys_with_a_context_window_are_the_full_forwards_at_the_scored_positions(fx, lm, keytype):
    """With a context window the last layer runs only from the first scored position on (``keep_from``); the keys
    it yields are the full forward's at the scored positions (fp32 rounding: other GEMM row counts)."""
    cfg = EvalConfig(data=str(fx / "data-bin"), gen_subset="train", tokens_per_sample=64, context_window=40,
                     batch_size=4, progress=False)  # fmt: skip
    p = first_blocks(plan(lm, cfg), 8)
    with KeyCapture(lm.model, keytype) as cap:
        got = [b.features for b in scored_batches(lm, cfg, p, feature_fn=cap)]
        windows = list(context_windows(p.dataset, 40, p.block))
        for i, keys in enumerate(got):
            chunk = windows[4 * i : 4 * i + 4]
            W = max(len(x) for x, _, _ in chunk)
            src = torch.full((len(chunk), W), lm.dictionary.pad(), dtype=torch.long)
            mask = torch.zeros(len(chunk), W, dtype=torch.bool)
            for r, (x, t, start) in enumerate(chunk):
                src[r, : len(x)] = torch.from_numpy(x)
                mask[r, start : start + len(t)] = True
            with torch.no_grad(), fast_linears(lm.device):
                lm.model(src)  # the full forward: every position through every layer
                want = cap(src)[mask]  # (N, k)
            assert i == 0 or min(s for _, _, s in chunk) == 40  # after the first batch: 40 positions of context
            assert keys.shape == want.shape
            torch.testing.assert_close(keys, want, atol=2e-5, rtol=1e-5)
    assert len(got) == 2


def test_full_blocks_only_drops_the_short_last_block(fx, tmp_path):
    # continue/data-bin/train: 1,931 tokens = 30 blocks of 64 + a short block of 11 (knnlm kept only full blocks)
    base = store_args(fx, tmp_path / "a")
    base[1] = str(fx / "continue" / "data-bin")
    assert main(base) == 0
    assert main([*base, "--full-blocks-only", "--dstore", str(tmp_path / "b")]) == 0
    n_all = json.loads((tmp_path / "a" / "manifest.json").read_text())["identity"]["count"]
    n_full = json.loads((tmp_path / "b" / "manifest.json").read_text())["identity"]["count"]
    assert n_all == 1931 and n_full == 1920
    # the same tokens' keys; the last batches differ in rows (16 blocks against 14), whose GEMMs may run on the other
    # library (measured per size class) and round differently: equal to fp32 accumulation error over d=64 terms
    np.testing.assert_allclose(np.load(tmp_path / "b" / "keys.npy"), np.load(tmp_path / "a" / "keys.npy")[:1920],
                               rtol=1e-5, atol=1e-6)  # fmt: skip


def test_a_store_from_raw_text_holds_the_binarised_splits_keys(fx, tmp_path):
    """knn-store lists --dataset-impl raw (eval's flag) but failed on a missing .bin (its manifest fingerprinted
    data/SPLIT.bin): the split as text gives the binarised split's keys and values."""
    from conftest import decoded_text

    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "train").write_text(decoded_text(fx / "continue" / "data-bin", "train", 48), encoding="utf-8")
    (raw / "dict.txt").write_bytes((fx / "continue" / "data-bin" / "dict.txt").read_bytes())
    base = store_args(fx, tmp_path / "a")
    base[1] = str(fx / "continue" / "data-bin")
    assert main(base) == 0
    text = store_args(fx, tmp_path / "b", "--dataset-impl", "raw")
    text[1] = str(raw)
    assert main(text) == 0
    for f in ("keys.npy", "vals.npy"):
        assert np.array_equal(np.load(tmp_path / "b" / f), np.load(tmp_path / "a" / f)), f


def _wait_for_progress(path: Path, proc: subprocess.Popen, above: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads(path.read_text())["progress"]["blocks_done"] > above:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.005)
    raise AssertionError(
        f"no progress past block {above} (rc {proc.poll()}): {proc.stderr.read() if proc.stderr else ''}"
    )


def test_store_interrupted_by_sigint_then_sigkill_resumes_to_the_same_bytes(fx, tmp_path):
    """A real interruption: the subprocess gets SIGINT mid-way (saves its progress, exits 130), is restarted and
    killed with SIGKILL mid-way (no chance to save anything), is restarted and finishes; the three files are then
    byte for byte those of an uninterrupted run."""
    extra = ("--max-blocks", "200", "--flush-every", "5", "--batch-size", "8")
    assert main(store_args(fx, tmp_path / "ref", *extra)) == 0
    cmd = [sys.executable, "-m", "adaptive_lm", *store_args(fx, tmp_path / "cut", *extra)]
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    manifest = tmp_path / "cut" / "manifest.json"
    # as started from a terminal: a shell's background job (`cmd &`) inherits SIGINT ignored, and Python then
    # installs no KeyboardInterrupt handler, so the store would finish despite the signal
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    _wait_for_progress(manifest, proc, 0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT and "interrupted" in err and "Traceback" not in err
    first = json.loads(manifest.read_text())["progress"]
    assert not first["complete"] and 0 < first["blocks_done"] < 200

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    _wait_for_progress(manifest, proc, first["blocks_done"] + 8)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    second = json.loads(manifest.read_text())["progress"]
    assert not second["complete"] and first["blocks_done"] < second["blocks_done"] < 200

    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"resumed at block {second['blocks_done']:,}" in r.stdout
    for name in ("keys.npy", "vals.npy", "lm_logprobs.npy"):
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    done, ref = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("cut", "ref"))
    assert done["progress"]["complete"] and done["fingerprint"] == ref["fingerprint"]
    stamps = {f.name: f.stat().st_mtime_ns for f in (tmp_path / "cut").iterdir()}
    assert main(store_args(fx, tmp_path / "cut", *extra)) == 0  # complete: nothing to do
    assert stamps == {f.name: f.stat().st_mtime_ns for f in (tmp_path / "cut").iterdir()}  # nothing rewritten


def test_store_stopped_by_sigterm_saves_like_ctrl_c_and_resumes(fx, tmp_path):
    """SIGTERM (kill, timeout, a batch scheduler) takes the interruption path of Ctrl-C: progress saved, one line,
    exit 143; it had killed the process at once, losing up to --flush-every batches."""
    extra = ("--max-blocks", "200", "--flush-every", "4", "--batch-size", "8")
    assert main(store_args(fx, tmp_path / "ref", *extra)) == 0
    cmd = [sys.executable, "-m", "adaptive_lm", *store_args(fx, tmp_path / "cut", *extra)]
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    manifest = tmp_path / "cut" / "manifest.json"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    _wait_for_progress(manifest, proc, 0)
    seen = json.loads(manifest.read_text())["progress"]["blocks_done"]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and "interrupted" in err and "Traceback" not in err
    saved = json.loads(manifest.read_text())["progress"]
    assert not saved["complete"] and seen <= saved["blocks_done"] < 200
    assert main(store_args(fx, tmp_path / "cut", *extra)) == 0
    for name in ("keys.npy", "vals.npy", "lm_logprobs.npy"):
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name


def test_truncated_store_files_are_refused_by_name(fx, tmp_path, capsys):
    """A truncated keys or values file: a complete store is refused by eval and knn-index (numpy had failed to map
    it, or an index was built over a short file), an incomplete one when resumed (its missing rows would have stayed
    zeros)."""
    extra = ("--max-blocks", "40", "--flush-every", "2", "--batch-size", "8")
    assert main(store_args(fx, tmp_path / "s", *extra)) == 0
    for name in ("keys.npy", "vals.npy"):
        f = tmp_path / "s" / name
        good = f.read_bytes()
        f.write_bytes(good[: len(good) // 2])
        with pytest.raises(UserError, match=f"{name}: .* bytes where its .* rows take"):
            load_manifest(tmp_path / "s")
        f.write_bytes(good)
    m = tmp_path / "s" / "manifest.json"
    record = json.loads(m.read_text())
    record["progress"]["complete"], record["progress"]["blocks_done"] = False, 8
    m.write_text(json.dumps(record))
    keys = tmp_path / "s" / "keys.npy"
    keys.write_bytes(keys.read_bytes()[:4096])
    assert main(store_args(fx, tmp_path / "s", *extra)) == 2
    assert "keys.npy" in capsys.readouterr().err


# ---- interpolated evaluation: exactness --------------------------------------------------------------------------
def hooked_batches(lm, cfg: EvalConfig, blocks: int) -> list:
    """Eval's first ``blocks`` blocks, their queries taken independently: a hook of the test's own on the last
    fc1's input (knnlm's key), not the library's key path."""
    got: list[torch.Tensor] = []
    h = lm.model.layers[-1].fc1.register_forward_pre_hook(lambda m, a: got.append(a[0]))
    try:
        return list(scored_batches(lm, cfg, first_blocks(plan(lm, cfg), blocks), lambda src: got.pop()))
    finally:
        h.remove()


def brute_force(keys, vals, queries, lm_lp, targets, k, lmbda, temperature, sim, metric=None):
    """The kNN-LM formula written out: every distance, top k (by ``metric``, default ``sim``), softmax of ``sim``,
    probability mass of the target's value."""
    K, Q = keys.astype(np.float64), queries.astype(np.float64)

    def similarity(how):
        if how == "l2":
            return -((Q * Q).sum(1)[:, None] + (K * K).sum(1)[None, :] - 2 * Q @ K.T)  # (n, N) -|q - k|^2
        return Q @ K.T

    score, rank = similarity(sim) / temperature, similarity(metric or sim)
    kth = -np.partition(-rank, k - 1, axis=1)[:, k - 1]  # the k-th best rank of every query
    top = np.empty((len(Q), k), dtype=np.int64)
    for r in range(len(Q)):  # all keys at least as near as the k-th, nearest first, equal ranks: earlier key first
        cand = np.flatnonzero(rank[r] >= kth[r])
        top[r] = cand[np.lexsort((cand, -rank[r, cand]))][:k]
    s = np.take_along_axis(score, top, 1)
    p = np.exp(s - s.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p_knn = (p * (vals[top] == targets[:, None])).sum(1)
    with np.errstate(divide="ignore"):
        return np.log(lmbda * p_knn + (1 - lmbda) * np.exp(lm_lp))


@pytest.mark.parametrize("sim,temperature,k", [("l2", 1.0, 32), ("l2", 20.0, 256), ("ip", 10.0, 64)])
def test_interpolated_logprobs_equal_a_bruteforce_reference(fx, lm, store, sim, temperature, k, tmp_path):
    if sim == "ip":  # neighbours by inner product need an inner-product index (an L2 one finds L2 neighbours)
        shutil.copytree(store, tmp_path / "ip")
        store = tmp_path / "ip"
        assert main(["knn-index", str(store), "--index", "flat", "--metric", "ip", "--overwrite"]) == 0
    cfg = EvalConfig(data=str(fx / "data-bin"), gen_subset="valid", tokens_per_sample=64, batch_size=16, progress=False)
    res = knn_evaluate(
        lm, cfg, store, k=k, lmbda=0.25, temperature=temperature, sim=sim, max_blocks=40, keep_scores=True
    )
    assert res.n_tokens == 2560 and res.k_used == k
    # queries taken independently: a hook of the test's own on the last fc1, over eval's blocks
    batches = hooked_batches(lm, cfg, 40)
    queries = torch.cat([b.features for b in batches]).numpy()
    lm_ref = np.concatenate([b.logprobs for b in batches])
    assert np.array_equal(res.lm_scores, lm_ref) and np.array_equal(
        res.targets, np.concatenate([b.targets for b in batches])
    )
    ref = brute_force(
        np.load(store / "keys.npy"),
        np.load(store / "vals.npy"),
        queries,
        lm_ref,
        res.targets,
        k,
        0.25,
        temperature,
        sim,
    )
    worst = float(np.abs(res.scores - ref).max())
    print(f"worst |interpolated - reference| ({sim}, T={temperature}, k={k}): {worst:.3g}")
    assert worst < 1e-5
    assert 0 < res.hit_rate < 1 and np.isneginf(res.knn_scores).any()  # some targets are never among the neighbours
    lines = knn_summary_lines(res)
    assert lines[-1].startswith("Loss (base 2): ") and "lambda sweep" in lines[4]
    loss = -res.scores.mean() / math.log(2)
    assert abs(res.loss_base2 - loss) < 1e-12 and abs(res.sweep[0][1] - res.lm_loss_base2) < 1e-12


def test_eos_blocks_exact_search_through_tied_keys_and_another_metric(fx, lm, tmp_path):
    """--sample-break-mode eos: a block per line, rows padded in a batch. Pads are never keys, values or queries,
    and the store does not depend on the batch size. Every line's first key is the same context (</s> at position
    0): ~100 keys equal to float32 noise, which FAISS ranks its own way; with an inner-product index the flat search
    gave every line's first token some of them, not the best (its float64 re-rank saw only k + 16 candidates). And
    --knn-sim other than the index's metric re-ranked those candidates by the other similarity (ln p off by 5): the
    neighbours are the metric's k nearest, weighted by --knn-sim (docs/knn-lm.md, knnlm's --knn-sim-func)."""
    pytest.importorskip("faiss", reason="the [knn] extra (pip install 'adaptive-lm[knn]')")
    extra = ("--sample-break-mode", "eos", "--max-blocks", "300")
    assert main(store_args(fx, tmp_path / "a", *extra)) == 0
    assert main([*store_args(fx, tmp_path / "b", *extra), "--batch-size", "5"]) == 0
    lines = load_split(fx / "data-bin", "train")
    kept = [np.asarray(lines[i], dtype=np.int64) for i in range(400) if len(lines[i]) <= 256]  # the model's positions
    want = np.concatenate(kept[:300])  # the first 300 lines that fit, each with its </s>
    keys, vals = np.load(tmp_path / "a" / "keys.npy"), np.load(tmp_path / "a" / "vals.npy")
    assert len(want) == 16_384 and np.array_equal(vals, want)
    assert np.array_equal(np.load(tmp_path / "b" / "vals.npy"), want)
    np.testing.assert_allclose(np.load(tmp_path / "b" / "keys.npy"), keys, rtol=1e-5, atol=2e-6)  # fp32 GEMM noise
    cfg = EvalConfig(data=str(fx / "data-bin"), gen_subset="valid", sample_break_mode="eos", batch_size=16,
                     progress=False)  # fmt: skip
    batches = hooked_batches(lm, cfg, 40)
    queries = torch.cat([b.features for b in batches]).numpy()
    lm_ref, targets = np.concatenate([b.logprobs for b in batches]), np.concatenate([b.targets for b in batches])
    assert len(targets) == 1477 and (targets != lm.dictionary.pad()).all()
    worst = {}
    for metric, sim, temperature in [("l2", "l2", 5.0), ("ip", "ip", 10.0), ("l2", "ip", 10.0), ("ip", "l2", 5.0)]:
        assert main(["knn-index", str(tmp_path / "a"), "--index", "flat", "--metric", metric, "--overwrite"]) == 0
        res = knn_evaluate(lm, cfg, tmp_path / "a", k=32, lmbda=0.25, temperature=temperature, sim=sim,
                           max_blocks=40, keep_scores=True)  # fmt: skip
        assert np.array_equal(res.targets, targets) and np.array_equal(res.lm_scores, lm_ref)
        ref = brute_force(keys, vals, queries, lm_ref, targets, 32, 0.25, temperature, sim, metric)
        worst[metric, sim] = float(np.abs(res.scores - ref).max())
    assert max(worst.values()) < 1e-9, worst  # float64 both: the same neighbours


def test_cli_eval_with_knn_prints_both_perplexities(fx, store, capsys):
    assert main(eval_args(fx, store, "--tokens-per-sample", "64", "--k", "16", "--lmbda", "0.1")) == 0
    out = capsys.readouterr().out
    assert "LM only: Loss (base 2): " in out and "lambda sweep" in out and "best lambda" in out
    assert "Evaluated 1,931 tokens" in out and out.strip().splitlines()[-1].endswith("(kNN-LM, lambda 0.1, k 16)")


def test_python_api_knn_score_is_lm_score_interpolated(lm, store):
    knn = KNN.load(store, k=32)
    sents = ["the game was released in 2010 .", "he was born in the north of england , and died in 1900 ."]
    base = lm.score(sents)
    zero = knn_score(lm, sents, knn, lmbda=0.0)
    for a, b in zip(base, zero):  # lmbda 0: the LM's own scores, exactly
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(b["positional_scores"], b["lm_positional_scores"])
        # kNN batches in input order, score by length with shared prefixes: other GEMM shapes, whose fp32 rounding
        # differs on some CPUs (Intel's MKL under the AVX2 cap: ~1e-6), within the parity tests' 1e-5
        torch.testing.assert_close(b["lm_positional_scores"], a["positional_scores"], atol=1e-5, rtol=0)
    mixed = knn_score(lm, sents, knn, lmbda=0.25)
    via_score = lm.score(sents, knn=knn, lmbda=0.25)  # the same through LanguageModel.score
    for a, b in zip(mixed, via_score):
        assert torch.equal(a["positional_scores"], b["positional_scores"])
    for a, b in zip(base, mixed):
        want = interpolate(a["positional_scores"].double().numpy(), b["knn_positional_scores"].numpy(), 0.25)
        assert np.allclose(b["positional_scores"].numpy(), want, atol=1e-6)
    # the same through log_probs on captured queries; a tensor in gives a tensor out
    one = knn_score(lm, sents[0], knn, lmbda=0.25)
    with knn.capture(lm.model) as cap, torch.no_grad():
        ids = lm.encode(sents[0])
        src = torch.cat([torch.tensor([lm.dictionary.eos()]), ids[:-1]])[None]
        lm.model(src)
        q = cap(src)[0, :-1]  # (7, 64): the position after the last word is not scored
    lp = knn.log_probs(q, base[0]["positional_scores"], ids[:-1], 0.25)
    assert torch.is_tensor(lp) and torch.allclose(lp.float(), one["positional_scores"], atol=1e-6)
    with pytest.raises(UserError, match="8 queries but 7 targets"):
        knn.knn_log_probs(torch.zeros(8, 64), ids[:-1])
    # after a context: the kNN-LM's scores (all three kinds) at the sentence's positions of the concatenation
    ctx = lm.score(sents[1], knn=knn, lmbda=0.25, context=sents[0])
    whole = lm.score(sents[0] + "\n" + sents[1], knn=knn, lmbda=0.25, replace_newline_with_eos=True)
    n = len(ctx["tokens"])
    for name in ("positional_scores", "lm_positional_scores", "knn_positional_scores"):
        assert ctx[name].shape == (n,) and torch.equal(ctx[name], whole[name][-n:])


def test_ivfpq_index_clamps_for_a_small_store_and_approximate_distances(fx, store, tmp_path, capsys):
    d = tmp_path / "s"
    shutil.copytree(store, d)
    args = ["knn-index", str(d), "--index", "ivfpq", "--code-size", "12", "--overwrite", "--no-progress-bar"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "--ncentroids 4096 needs 159,744 training keys" in out and "using 328 centroids" in out
    assert "--code-size 12 does not divide the key dimension 64: using 8 bytes" in out
    meta = json.loads((d / "index.json").read_text())
    assert meta["type"] == "ivfpq" and meta["ncentroids"] == 328 and meta["bytes"] > 0 and meta["seconds"] > 0
    assert json.loads((d / "manifest.json").read_text())["index"]["type"] == "ivfpq"
    assert main(eval_args(fx, d, "--tokens-per-sample", "64", "--k", "8", "--knn-approx-dists", "--quiet")) == 0
    assert "Perplexity" in capsys.readouterr().out


# ---- bad input: one line each, exit code 2, nothing overwritten ---------------------------------------------------
def test_missing_and_partial_datastores_are_refused(fx, store, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(eval_args(fx, empty)) == 2
    assert "manifest.json: missing" in one_error_line(capsys)
    part = tmp_path / "part"
    shutil.copytree(store, part)
    m = json.loads((part / "manifest.json").read_text())
    m["progress"].update(complete=False, blocks_done=96, tokens_done=6144)
    (part / "manifest.json").write_text(json.dumps(m))
    before = digests(part)
    for argv in (eval_args(fx, part), ["knn-index", str(part), "--overwrite"]):
        assert main(argv) == 2
        err = one_error_line(capsys)
        assert "incomplete (6,144 of 12,800 tokens" in err and "rerun the same adaptive-lm knn-store" in err
    assert digests(part) == before
    (part / "index.faiss").unlink()
    m["progress"]["complete"] = True
    (part / "manifest.json").write_text(json.dumps(m))
    assert main(eval_args(fx, part)) == 2
    assert "index.faiss: missing: build the index first with adaptive-lm knn-index" in one_error_line(capsys)


def _save_model(lm: adaptive_lm.LanguageModel, folder: Path) -> Path:
    from adaptive_lm.core.fairseq_format import to_fairseq_checkpoint

    folder.mkdir(parents=True, exist_ok=True)
    torch.save(to_fairseq_checkpoint(lm.model, lm.cfg, lm.tokens_per_sample), folder / "model.pt")
    lm.dictionary.save(folder / "dict.txt")
    return folder / "model.pt"


def test_other_model_dimension_dictionary_and_settings_are_refused(fx, lm, store, tmp_path, capsys):
    before = digests(store)
    # a model of another width
    small = adaptive_lm.build_model(
        "transformer_lm_wiki103",
        len(lm.dictionary),
        decoder_layers=1,
        decoder_embed_dim=32,
        decoder_ffn_embed_dim=64,
        decoder_attention_heads=2,
        decoder_input_dim=32,
        decoder_output_dim=32,
        adaptive_input_cutoff=(1000, 3000),
        adaptive_softmax_cutoff=(1000, 3000),
        max_target_positions=256,
    )
    path = _save_model(adaptive_lm.LanguageModel(small, lm.dictionary, "", 256), tmp_path / "small")
    argv = eval_args(fx, store)
    argv[argv.index("--path") + 1] = str(path)
    assert main(argv) == 2
    err = one_error_line(capsys)
    assert "keys have 64 dimensions, this model's last_ffn_input has 32" in err and "manifest.json" in err
    # the same architecture, other weights
    other = adaptive_lm.from_pretrained(fx / "model" / "checkpoint_last.pt")
    with torch.no_grad():
        other.model.layers[0].fc1.weight.mul_(1.01)
    path = _save_model(other, tmp_path / "other")
    argv[argv.index("--path") + 1] = str(path)
    assert main(argv) == 2
    assert "the datastore was made with another model" in one_error_line(capsys)
    s_argv = store_args(fx, store, "--max-blocks", "200")
    s_argv[s_argv.index("--path") + 1] = str(path)
    assert main(s_argv) == 2
    err = one_error_line(capsys)
    assert "made with model weights" in err and "--overwrite" in err
    # other settings
    assert main(store_args(fx, store, "--max-blocks", "200", "--context-window", "32")) == 2
    assert "context window 0, not 32 (--context-window)" in one_error_line(capsys)
    # another dictionary of the same size (two words swapped)
    lines = (fx / "model" / "dict.txt").read_text().splitlines()
    lines[10], lines[11] = lines[11], lines[10]
    (tmp_path / "dict.txt").write_text("\n".join(lines) + "\n")
    assert main([*eval_args(fx, store), "--dict", str(tmp_path / "dict.txt")]) == 2
    assert "the datastore was made with dictionary" in one_error_line(capsys)
    assert digests(store) == before  # nothing was touched


def test_index_of_another_store_is_refused(fx, store, tmp_path, capsys):
    other = tmp_path / "other"
    assert main(store_args(fx, other, "--max-blocks", "100")) == 0
    assert main(["knn-index", str(other), "--no-progress-bar"]) == 0
    mine = tmp_path / "mine"
    shutil.copytree(store, mine)
    assert main(["knn-index", str(mine)]) == 2
    assert "index.faiss: exists (flat (l2, exact)); pass --overwrite" in one_error_line(capsys)
    shutil.copy(other / "index.faiss", mine / "index.faiss")  # the index alone
    assert main(eval_args(fx, mine)) == 2
    assert "not the index recorded in" in one_error_line(capsys)
    shutil.copy(other / "index.json", mine / "index.json")  # with its record
    assert main(eval_args(fx, mine)) == 2
    err = one_error_line(capsys)
    assert "built on another datastore" in err and f"knn-index {mine} --overwrite" in err


def test_without_faiss_one_line_says_how_to_install_it(store, monkeypatch, capsys, fx):
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` raises ImportError
    before = digests(store)
    assert main(["knn-index", str(store), "--overwrite"]) == 2
    assert "knn-index needs faiss: pip install 'adaptive-lm[knn]'" in one_error_line(capsys)
    assert main(eval_args(fx, store)) == 2
    assert "needs faiss: pip install 'adaptive-lm[knn]'" in one_error_line(capsys)
    assert digests(store) == before


def test_bad_input_in_a_subprocess_is_one_line_without_traceback(raw_store, tmp_path):
    store = raw_store
    code = "import sys; sys.modules['faiss'] = None; from adaptive_lm.cli import main; sys.exit(main(sys.argv[1:]))"
    r = subprocess.run(
        [sys.executable, "-c", code, "knn-index", str(store), "--overwrite"], capture_output=True, text=True
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert (
        r.stderr.strip()
        == "adaptive-lm knn-index: error: adaptive-lm knn-index needs faiss: pip install 'adaptive-lm[knn]'"
    )
    (tmp_path / "empty").mkdir()
    r = subprocess.run(
        [sys.executable, "-m", "adaptive_lm", "knn-index", str(tmp_path / "empty")], capture_output=True, text=True
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "is not a kNN datastore (make one with adaptive-lm knn-store)" in r.stderr


def test_bad_flag_values_fail_at_parse_time(raw_store, capsys):
    store = raw_store
    for argv in (
        ["knn-index", str(store), "--ncentroids", "0"],
        ["knn-index", str(store / "nope")],
        ["eval", str(store), "--path", str(store), "--knn", str(store), "--lmbda", "1.5"],
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        one_error_line(capsys)


def test_api_refuses_bad_arguments(store):
    with pytest.raises(UserError, match="temperature must be positive"):
        KNN.load(store, temperature=0)
    with pytest.raises(UserError, match="index measures l2"):
        KNN.load(store, sim="ip", approximate=True)
