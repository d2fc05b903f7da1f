"""Generation exactly as fairseq 0.12's hub: the differential set of ``tests/generation/`` (six fairseq-trained models,
112 beam-search cases, seeded sampling, the sampling filter's distributions, ``score`` on raw text through the BPEs),
every case through our kernels and through the plain ones (what CUDA runs).

Tolerances, from the arithmetic: a token's ln p agrees with fairseq's to about 1e-6 (other summation orders, the
incremental attention); fairseq's ``positional_scores`` are differences of float32 *cumulative* scores, and a
cumulative sum near |S| rounds in steps of ulp(S) (7.6e-6 from 64 to 128), so an ln p a few 1e-7 away can move one
cumulative value by one step: 1e-5, or 2 ulp of the largest cumulative score where that is larger. Token choices
must be identical: every case's closest competing candidates are at least ``min_beam_gap`` (1.2e-4) apart.
"""

from __future__ import annotations

import contextlib
import json
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch

import adaptive_lm
from adaptive_lm.core.kernels import plain_kernels
from adaptive_lm.inference.generate import sampling_filter

HERE = Path(__file__).parent / "generation"
REF = json.loads((HERE / "data" / "reference.json").read_text())
KERNELS = ["ours", "plain"]


@cache
def load(model: str, batch_size: int | None = None, max_tokens: int | None = None) -> adaptive_lm.LanguageModel:
    info = REF["models"][model]
    folder = HERE / info["dir"]
    kw = {
        k: (str(folder / v) if k.endswith(("_json", "_bpe", "_model")) else v) for k, v in info["load_kwargs"].items()
    }
    if batch_size is not None:
        kw["batch_size"] = batch_size
    if max_tokens is not None:
        kw["max_tokens"] = max_tokens
    return adaptive_lm.from_pretrained(folder, "model.pt", **kw)


def kernels(name: str):
    return plain_kernels(True) if name == "plain" else contextlib.nullcontext()


def tolerance(positional_scores: list[float]) -> float:
    """1e-5, or 2 float32 ulp of the largest cumulative score of the hypothesis."""
    biggest = max((abs(x) for x in _cumsum(positional_scores)), default=0.0)
    return max(1e-5, 2 * float(np.spacing(np.float32(biggest))))


def _cumsum(xs: list[float]) -> list[float]:
    out, s = [], 0.0
    for x in xs:
        s += x
        out.append(s)
    return out


def assert_same_hypotheses(ours: list[dict], theirs: list[dict], where: str) -> None:
    assert [h["tokens"].tolist() for h in ours] == [h["tokens"] for h in theirs], where
    for i, (h, r) in enumerate(zip(ours, theirs)):
        tol = tolerance(r["positional_scores"])
        got = h["positional_scores"].tolist()
        diffs = [abs(a - b) for a, b in zip(got, r["positional_scores"])]
        worst = max(diffs)
        assert worst <= tol, f"{where} hypothesis {i}: positional scores differ by {worst:.3g} > {tol:.3g}"
        # the score is the fp32 running sum of the positional scores (then divided by a length power, which only
        # shrinks errors): their differences, plus half an ulp of the running sum per addition on either side
        ulp = float(np.spacing(np.float32(max(abs(x) for x in _cumsum(r["positional_scores"])))))
        score_tol = max(tol, sum(diffs) + len(diffs) * ulp)
        assert abs(float(h["score"]) - r["score"]) <= score_tol, f"{where} hypothesis {i}: score {h['score']} vs {r}"


BEAM = [c for c in REF["beam_cases"] if c["ngram_impl"] != "fairseq_cpu"]


@pytest.mark.parametrize("kind", KERNELS)
@pytest.mark.parametrize("case", BEAM, ids=[c["id"] for c in BEAM])
def test_beam_search_equals_fairseqs_hub(case, kind):
    """The same hypotheses in the same order, the same scores: prefix forcing and scoring, 2 x beam candidates,
    </s> finished among the first beam, lenpen, unkpen, min_len, max_len_a/b and the forced </s>, n-gram blocking
    (fairseq's CUDA rule), prompts of different lengths in one batch and in batches of two, add_bos_token, BPEs;
    prompts given as ids without ``</s>`` or with several (batched and checked on their own lengths, as the hub)."""
    lm = load(case["model"], case["load_overrides"].get("batch_size"), case["load_overrides"].get("max_tokens"))
    if case["prompts"] is None:  # given as ids, as fairseq's hub took them (without </s>, with several, ...)
        prompts = [torch.tensor(p) for p in case["prompt_ids"]]
    else:
        prompts = [lm.encode(p) for p in case["prompts"]]
        assert [p.tolist() for p in prompts] == case["prompt_ids"]
    kw = dict(case["generate_kwargs"])
    with kernels(kind):
        out = lm.generate(prompts, **kw)
    for j, (hyps, ref) in enumerate(zip(out, case["hypos"], strict=True)):
        if kw.get("nbest"):  # fairseq's hub ignores nbest and returns every hypothesis; ours keeps the first n
            ref = ref[: kw["nbest"]]
        assert_same_hypotheses(hyps, ref, f"{case['id']} prompt {j}")
        assert [lm.decode(h["tokens"]) for h in hyps] == [r["text"] for r in ref]


CLI_OPTIONS = {"beam", "max_len_b", "max_len_a", "min_len", "lenpen", "unkpen", "temperature", "unnormalized"}
CLI_CASES = [c for c in REF["beam_cases"] if c["prompts"] and not c["load_overrides"]
             and set(c["generate_kwargs"]) <= CLI_OPTIONS][::6]  # fmt: skip


@pytest.mark.parametrize("case", CLI_CASES, ids=[c["id"] for c in CLI_CASES])
def test_the_generate_command_prints_fairseqs_hypotheses(case, capsys):
    """``adaptive-lm generate`` with the case's options as flags (prompts repeated with --prompt, every hypothesis
    with --nbest BEAM and --show-scores): each line is fairseq's score (4 decimals) and text, in order."""
    from adaptive_lm.cli import main

    folder = HERE / REF["models"][case["model"]]["dir"]
    argv = [
        "generate",
        "--path",
        str(folder / "model.pt"),
        "--show-scores",
        "--nbest",
        str(case["generate_kwargs"]["beam"]),
    ]
    for k, v in REF["models"][case["model"]]["load_kwargs"].items():
        argv += ["--" + k.replace("_", "-"), str(folder / v) if k.startswith("gpt2") else str(v)]
    for k, v in case["generate_kwargs"].items():
        argv += ["--" + k.replace("_", "-")] if v is True else ["--" + k.replace("_", "-"), str(v)]
    for p in case["prompts"]:
        argv += ["--prompt", p]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = [f"{h['score']:.4f}\t{h['text']}" for hyps in case["hypos"] for h in hyps]
    assert len(lines) == len(expected) >= 1
    for a, b in zip(lines, expected):
        sa, ta = a.split("\t", 1)
        sb, tb = b.split("\t", 1)
        assert ta == tb and abs(float(sa) - float(sb)) <= 1.5e-4, (a, b)


def test_fairseqs_cpu_ngram_blocker_blocks_nothing_we_block_as_its_cuda_kernel():
    """fairseq 0.12's CPU fallback compares the end of the padded token buffer (fairseq#4709, #5206), so on CPU
    ``no_repeat_ngram_size`` changes nothing: its output equals ours without the option. Ours blocks (the CUDA rule),
    and the n-gram then occurs once at most."""
    cases = [c for c in REF["beam_cases"] if c["ngram_impl"] == "fairseq_cpu"]
    assert cases
    for case in cases:
        lm = load(case["model"], case["load_overrides"].get("batch_size"))
        kw = dict(case["generate_kwargs"])
        n = kw.pop("no_repeat_ngram_size")
        prompts = [lm.encode(p) for p in case["prompts"]]
        for hyps, ref in zip(lm.generate(prompts, **kw), case["hypos"], strict=True):
            assert_same_hypotheses(hyps, ref, f"{case['id']} without the option")
        for hyps in lm.generate(prompts, no_repeat_ngram_size=n, **kw):
            for h in hyps:
                t = h["tokens"].tolist()
                grams = [tuple(t[i : i + n]) for i in range(len(t) - n)]  # the final </s> is forced, not chosen
                assert len(grams) == len(set(grams)), (case["id"], t)


@pytest.mark.parametrize("kind", KERNELS)
@pytest.mark.parametrize("case", REF["score_cases"], ids=[f"{c['model']}-{c['mode']}" for c in REF["score_cases"]])
def test_score_equals_fairseqs_hub(case, kind):
    """``score`` on raw text (word models, and GPT-2 BPE / SentencePiece text through the BPE): fairseq's tokens
    and positional scores."""
    lm = load(case["model"])
    with kernels(kind):
        got = lm.score(case["sentences"], **case["score_kwargs"])
    for g, r in zip(got, case["results"], strict=True):
        assert g["tokens"].tolist() == r["tokens"]
        torch.testing.assert_close(g["positional_scores"], torch.tensor(r["positional_scores"]), atol=1e-5, rtol=0)
        assert abs(g["score"] - r["score"]) <= 1e-5


SAMPLING = torch.load(HERE / "data" / "sampling.pt", weights_only=True)


@pytest.mark.parametrize("case", REF["sampling_filter_cases"], ids=lambda c: json.dumps(c["generate_kwargs"]))
def test_sampling_filter_gives_fairseqs_distributions(case):
    """top-k, top-p and temperature: the distribution ``torch.multinomial`` receives, on fairseq's own inputs, and
    the candidates its draws map to."""
    kw = case["generate_kwargs"]
    for step in case["steps"]:
        t = SAMPLING[step["key"]]
        lprobs = t["lprobs"]  # (bsz, beam, V), temperature applied
        bsz, beam, _ = lprobs.shape
        if step["step"] == 0:
            lprobs = lprobs[:, ::beam, :].contiguous()
        probs, columns = sampling_filter(lprobs, kw.get("sampling_topk", -1), kw.get("sampling_topp", -1.0))
        # exp is within 1 ulp of the true value in ATen's vectorised kernels (Sleef's u10), and the reference came
        # from another CPU's kernel: the two may differ by 2 ulp (seen on an Intel AVX-512 CPU: 1e-7 relative)
        torch.testing.assert_close(probs.reshape(t["probs"].shape), t["probs"], atol=0, rtol=2 * 2**-23)
        drawn = t["drawn"].view(bsz, -1)  # (bsz, beam) column of each draw
        picked = drawn if columns is None else torch.gather(columns.expand(bsz, beam, -1), 2, drawn[..., None])[..., 0]
        assert torch.equal(picked, t["cand_indices"])


@pytest.mark.torch_rng  # torch.multinomial's draws for a seed are those of the torch that made the reference (2.13)
@pytest.mark.parametrize("case", REF["sampling_generate_cases"], ids=lambda c: f"{c['model']}-seed{c['seed']}")
def test_seeded_sampling_draws_fairseqs_tokens(case):
    """After ``torch.manual_seed(s)`` (here: ``seed=s``) fairseq's draws: the same multinomial calls on the same
    distributions, and the one draw of the hub's DataLoader before them."""
    lm = load(case["model"])
    kw = case["generate_kwargs"]
    out = lm.generate([lm.encode(p) for p in case["prompts"]], seed=case["seed"], **kw)
    for hyps, ref in zip(out, case["hypos"], strict=True):
        assert_same_hypotheses(hyps, ref, f"{case['model']} seed {case['seed']}")
    torch.manual_seed(case["seed"])
    assert (
        lm.sample(case["prompts"], **{k: v for k, v in kw.items() if k != "beam"}, beam=kw["beam"])
        == case["sample_texts"]
    )


def test_the_cache_gives_what_recomputing_gives():
    """With the key/value cache every step costs one position; recomputing the whole prefix gives the same tokens
    and scores (the incremental attention is the same arithmetic in another order)."""
    for model in ("wiki_tied", "spm"):
        lm = load(model)
        prompts = [lm.encode(p) for p in ("The first", "It was in the")]
        a = lm.generate(prompts, beam=4, max_len_b=20)
        b = lm.generate(prompts, beam=4, max_len_b=20, use_cache=False)
        for ha, hb in zip(a, b, strict=True):
            assert [h["tokens"].tolist() for h in ha] == [h["tokens"].tolist() for h in hb]
            for x, y in zip(ha, hb):
                torch.testing.assert_close(x["positional_scores"], y["positional_scores"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("model", ["wiki_tied", "postln", "untied", "bos"])
def test_prompts_prefilled_at_once_give_what_stepping_through_them_gives(model):
    """The positions every prompt of a batch forces run in one pass on one row per prompt (``prefill``) instead of
    one step per position on every beam row: the same hypotheses, the same scores up to summation order, for beam
    search (with n-gram blocking and an unknown-word penalty) and seeded sampling; and the model runs S - 1 fewer
    times, S being the shortest prompt's forced positions."""
    lm = load(model)
    prompts = [lm.encode(p) for p in ("It was in the early years of", "The first of the", "In 1996 , the band was")]
    S = min(len(p) for p in prompts) - 1  # steps 0 .. S - 1 force a prompt word in every sentence (encode adds </s>)
    calls = []
    hook = lm.model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        for kw in (
            dict(beam=4),
            dict(beam=3, no_repeat_ngram_size=2, unkpen=1.0, lenpen=0.7),
            dict(beam=3, sampling=True, sampling_topk=8, seed=3),
        ):
            calls.clear()
            a = lm.generate(prompts, max_len_b=12, **kw)
            n_prefilled = len(calls)
            calls.clear()
            b = lm.generate(prompts, max_len_b=12, prefill=False, **kw)
            assert n_prefilled == len(calls) - (S - 1), (model, kw)
            for ha, hb in zip(a, b, strict=True):
                assert [h["tokens"].tolist() for h in ha] == [h["tokens"].tolist() for h in hb], (model, kw)
                for x, y in zip(ha, hb):
                    torch.testing.assert_close(x["positional_scores"], y["positional_scores"], atol=1e-5, rtol=0)
                    torch.testing.assert_close(x["score"], y["score"], atol=1e-5, rtol=0)
    finally:
        hook.remove()


@pytest.mark.parametrize("unkpen", [0.0, 0.5])
def test_nan_log_probs_become_minus_inf_as_fairseqs_rule(unkpen):
    """fairseq: ``lprobs[lprobs != lprobs] = -inf`` before the pad / unk / length rules; we look for a NaN through
    the row sums (ln p is never +inf), so a NaN anywhere, and only NaN, must come out as -inf, the rest unchanged."""
    from adaptive_lm.inference.generate import GenerationConfig, Special, _Batch

    lm = load("wiki_tied")
    d = lm.dictionary
    sp = Special(bos=d.eos(), eos=d.eos(), pad=d.pad(), unk=d.unk())
    batch = _Batch(lm.model, GenerationConfig(beam=2, unkpen=unkpen), sp, torch.full((1, 1), d.pad()), 20)
    V = len(d)
    g = torch.Generator().manual_seed(0)
    for where in ([(0, 7)], [(1, V - 1), (0, d.unk()), (1, 9)], []):
        lp = torch.log_softmax(torch.randn(2, V, generator=g), dim=-1)  # (rows, V)
        for r, c in where:
            lp[r, c] = float("nan")
        want = lp.clone()
        want[want.isnan()] = -float("inf")
        want[:, sp.pad] = -float("inf")
        want[:, sp.unk] -= unkpen
        got = batch._constrained(lp.clone(), step=5)
        assert not got.isnan().any()
        torch.testing.assert_close(got, want, rtol=0, atol=0)
