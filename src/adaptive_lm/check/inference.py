"""Inference checks on the recipe model: evaluation tokens/s with a context window (fp32 and bf16), generation
tokens/s with and without the key/value cache (cached scores checked against a full forward), n-best rescoring
tokens/s against ``lm.score``; and, given ``--fixture DIR``, fairseq-eval-lm's perplexity of that fixture's model.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adaptive_lm.check.context import FAIL, Ctx, Record, fmt, maxdiff, skip, tf32, verdict
from adaptive_lm.core.kernels import plain_kernels
from adaptive_lm.inference import rescore
from adaptive_lm.inference.evaluate import EvalConfig, evaluate
from adaptive_lm.inference.hub import LanguageModel
from adaptive_lm.inference.loading import from_pretrained
from adaptive_lm.training.trainer import Trainer

# fairseq-eval-lm on the fairseq-tiny fixture (valid split, --tokens-per-sample 256):
# context window -> (tokens, loss base 2, perplexity)
FIXTURE_EVAL = {0: (217_646, 8.3184, 319.22), 128: (217_646, 8.3131, 318.04)}
FIXTURE_LAYOUT = ("model/checkpoint_best.pt", "data-bin/dict.txt")


def recipe_lm(ctx: Ctx) -> LanguageModel:
    """The recipe's model for inference, in eval mode: the trainer leaves it in training mode (dropout on), and a
    check run alone (``--only rescore``) had scored with dropout. The trainer sets training mode again each step."""
    r = ctx.recipe()
    t: Trainer = r["trainer"]
    return LanguageModel(t.model, t.dictionary, "recipe", ctx.plan.recipe_T).eval()


def check_eval(ctx: Ctx) -> Record:
    lm = recipe_lm(ctx)
    data = ctx.recipe()["data"]
    C, T = ctx.plan.eval_context, ctx.plan.recipe_T
    figs: dict[str, Any] = dict(device=ctx.where, context_window=C, tokens_per_sample=T)
    with plain_kernels(True), tf32(False):
        for name, bf16 in (("fp32", False), ("bf16", True)):
            cfg = EvalConfig(data=str(data), gen_subset="valid", context_window=C, tokens_per_sample=T, bf16=bf16,
                             progress=False)  # fmt: skip
            ctx.sync()
            res = evaluate(lm, cfg)
            ctx.sync()
            figs[name] = dict(tokens=res.n_tokens, loss_base2=res.loss_base2, seconds=round(res.seconds, 3),
                              tokens_per_s=round(res.n_tokens / max(res.seconds, 1e-9)), plan=res.plan)  # fmt: skip
    f32, b16 = figs["fp32"], figs["bf16"]
    figs["bf16_vs_fp32_loss_diff"] = abs(f32["loss_base2"] - b16["loss_base2"])
    ok = f32["tokens"] > 0 and f32["tokens"] == b16["tokens"] and math.isfinite(f32["loss_base2"])
    ok = ok and figs["bf16_vs_fp32_loss_diff"] < 0.05
    summary = (
        f"{ctx.where} recipe model, window {C}/{T}: {f32['tokens_per_s']:,} tok/s fp32, {b16['tokens_per_s']:,} bf16 "
        f"({f32['tokens']:,} tokens, loss diff {figs['bf16_vs_fp32_loss_diff']:.4f})"
    )
    return Record(verdict(ok), summary, figs, "fp32 without TF32")


def timed_generation(ctx: Ctx, lm: LanguageModel, prompt: torch.Tensor, use_cache: bool) -> tuple[dict, dict]:
    """One greedy generation of ``plan.gen_tokens`` new tokens: (its hypothesis, its figures)."""
    L, N = len(prompt) - 1, ctx.plan.gen_tokens
    ctx.sync()
    t0 = time.perf_counter()
    out = lm.generate([prompt], beam=1, max_len_b=L + N, min_len=L + N, use_cache=use_cache)
    ctx.sync()
    secs = time.perf_counter() - t0
    hyp = out[0][0]
    n_new = len(hyp["tokens"]) - L  # the hypothesis is the prompt + the continuation + </s>
    figs = dict(tokens=n_new, scores=len(hyp["positional_scores"]), seconds=round(secs, 3))
    return hyp, dict(figs, tokens_per_s=round(n_new / secs, 1))


def full_forward_scores(lm: LanguageModel, hyp: dict[str, Any]) -> torch.Tensor:
    """The log-probs of the tokens a hypothesis scores (its last ``len(positional_scores)``: the continuation, or
    the prompt too as fairseq's hub gives them) from one forward over its own output (teacher forcing)."""
    toks = hyp["tokens"].to(lm.device)  # L + N + 1
    src = torch.cat([toks.new_tensor([lm.dictionary.eos()]), toks[:-1]])
    n_gen = len(hyp["positional_scores"])
    with torch.no_grad():
        return lm.model.target_log_probs(src[None], toks[None])[0, -n_gen:]  # n_gen


def check_generate(ctx: Ctx) -> Record:
    lm = recipe_lm(ctx)
    N = ctx.plan.gen_tokens
    prompt = torch.tensor([5, 17, 9, 230, 41, 2])  # 5 words + </s>, as lm.encode gives
    figs: dict[str, Any] = dict(device=ctx.where, new_tokens=N, prompt_tokens=len(prompt) - 1)
    with plain_kernels(True), tf32(False):
        cached, figs["cache"] = timed_generation(ctx, lm, prompt, True)
        uncached, figs["no_cache"] = timed_generation(ctx, lm, prompt, False)
        full = full_forward_scores(lm, cached)
    diff = maxdiff(full, cached["positional_scores"])
    same = torch.equal(cached["tokens"].cpu(), uncached["tokens"].cpu())
    figs.update(cached_scores_vs_full_forward=diff, same_tokens_with_and_without_cache=same)
    c, nc = figs["cache"], figs["no_cache"]
    L = len(prompt) - 1
    shape_ok = c["tokens"] == nc["tokens"] == N + 1 and c["scores"] in (N + 1, L + N + 1)
    ok = diff <= 2e-3 and shape_ok
    summary = (
        f"{ctx.where} recipe model, {N} tokens greedy: {c['tokens_per_s']:,} tok/s cached, {nc['tokens_per_s']:,} "
        f"uncached ({c['tokens_per_s'] / max(nc['tokens_per_s'], 1e-9):.1f}x); cached scores vs full {fmt(diff)}"
    )
    if not ok:
        why = f"cached scores differ from a full forward by {fmt(diff)}" if diff > 2e-3 else ""
        why = why or (
            f"{c['tokens']} / {nc['tokens']} new tokens with / without the cache ({c['scores']} scores), expected "
            f"{N + 1} (scores for them, or for the {L} prompt tokens too)"
        )
        return Record(FAIL, summary, figs, why)
    note = "" if same else "greedy tokens differ with/without the cache (near-ties of a random model; scores checked)"
    return Record(verdict(ok), summary, figs, note)


def random_sentences(lm: LanguageModel, n: int, max_len: int) -> list[str]:
    rng = np.random.default_rng(0)
    top = min(len(lm.dictionary), 5000)
    lengths = rng.integers(5, max_len, n)
    return [" ".join(lm.dictionary[int(i)] for i in rng.integers(4, top, k)) for k in lengths]


def nbest_sentences(lm: LanguageModel, n: int, max_len: int) -> list[str]:
    """``n`` sentences as n-best lists of 4: each list's hypotheses differ from its first in their last 1-3 words,
    so rescoring computes most of them after a shared prefix (``inference.scoring``)."""
    rng = np.random.default_rng(1)
    top = min(len(lm.dictionary), 5000)
    out = []
    for base in random_sentences(lm, -(-n // 4), max_len):
        words = base.split()
        for k in range(4):
            tail = [lm.dictionary[int(i)] for i in rng.integers(4, top, k)]
            out.append(" ".join(words[: len(words) - k] + tail))
    return out[:n]


def timed(ctx: Ctx, fn: Any, *args: Any, **kw: Any) -> tuple[Any, float]:
    ctx.sync()
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    ctx.sync()
    return out, time.perf_counter() - t0


def check_score(ctx: Ctx) -> Record:
    """n-best rescoring: ``adaptive_lm.inference.rescore.sentence_logprobs`` and ``lm.score`` (both computing shared
    prefixes once, target-only softmax) against every hypothesis scored whole (``share_prefixes=False``): speed, and
    the same sums."""
    lm = recipe_lm(ctx)
    n_sent = 256 if ctx.cuda else 32
    sentences = nbest_sentences(lm, n_sent, 60 if ctx.cuda else 30)
    ids = rescore.encode_hypotheses(lm, sentences)
    figs: dict[str, Any] = dict(device=ctx.where, sentences=n_sent)
    with plain_kernels(True), tf32(False):
        lm.score(sentences[:2])  # warm
        scored, secs = timed(ctx, lm.score, sentences)
        hub = np.array([float(s["positional_scores"].double().sum()) for s in scored])
        tokens = sum(len(s["positional_scores"]) for s in scored)
        figs["lm_score"] = dict(tokens=tokens, seconds=round(secs, 3), tokens_per_s=round(tokens / secs))
        whole, secs = timed(ctx, rescore.sentence_logprobs, lm, ids, share_prefixes=False)
        figs["whole"] = dict(tokens=tokens, seconds=round(secs, 3), tokens_per_s=round(tokens / secs))
        lp, secs = timed(ctx, rescore.sentence_logprobs, lm, ids)
    diff = float(max(np.abs(lp - whole).max(), np.abs(hub - whole).max()))
    figs["rescore"] = dict(tokens=tokens, seconds=round(secs, 3), tokens_per_s=round(tokens / secs),
                           max_abs_diff_vs_whole=diff)  # fmt: skip
    ok = bool(np.isfinite(whole).all()) and diff <= 1e-3
    summary = (
        f"{ctx.where} recipe model: lm.score {figs['lm_score']['tokens_per_s']:,} tok/s, rescore "
        f"{figs['rescore']['tokens_per_s']:,} tok/s, each whole {figs['whole']['tokens_per_s']:,} tok/s (sums vs "
        f"whole {fmt(diff)}); {n_sent} hypotheses, lists of 4"
    )
    return Record(verdict(ok), summary, figs, "" if ok else f"shared-prefix sums differ from whole by {fmt(diff)}")


def fixture_eval(ctx: Ctx, lm: LanguageModel, fixture: Path, C: int) -> dict[str, Any]:
    cfg = EvalConfig(data=str(fixture / "data-bin"), gen_subset="valid", context_window=C, tokens_per_sample=256,
                     progress=False)  # fmt: skip
    res = evaluate(lm, cfg)
    n, loss, ppl = FIXTURE_EVAL[C]
    return dict(tokens=res.n_tokens, loss_base2=res.loss_base2, ppl=res.ppl, fairseq_tokens=n, fairseq_loss=loss,
                fairseq_ppl=ppl, tokens_per_s=round(res.n_tokens / max(res.seconds, 1e-9)))  # fmt: skip


def fixture_mismatch(C: int, f: dict[str, Any]) -> str:
    """What differs from fairseq-eval-lm at context window ``C`` ("" when the tokens and the loss agree)."""
    if f["tokens"] == f["fairseq_tokens"] and abs(f["loss_base2"] - f["fairseq_loss"]) <= 1e-3:
        return ""
    return (
        f"cw {C}: {f['tokens']} tokens, loss {f['loss_base2']:.4f} (fairseq {f['fairseq_tokens']}, {f['fairseq_loss']})"
    )


def check_fixture(ctx: Ctx) -> Record:
    """The fairseq-tiny fixture's fairseq-eval-lm perplexity (within 1e-3 bits), when ``--fixture DIR`` names it:
    installed code has no fixture of its own to find."""
    if ctx.cfg.fixture is None:
        return skip("no --fixture DIR given (a fairseq-tiny folder: model/checkpoint_best.pt + data-bin)")
    fixture = Path(ctx.cfg.fixture)
    missing = [x for x in FIXTURE_LAYOUT if not (fixture / x).is_file()]
    if missing:
        return Record(FAIL, f"{fixture}: no {', '.join(missing)}", {"fixture": str(fixture)}, "not a fixture folder")
    if ctx.quick and not ctx.cuda:
        return skip("--quick: 2 x 217,646 tokens on a CPU; run without --quick for the fixture's perplexity")
    lm = from_pretrained(fixture / "model" / "checkpoint_best.pt", device=ctx.device)
    figs: dict[str, Any] = dict(device=ctx.where, fixture=str(fixture))
    with plain_kernels(True), tf32(False):
        for C in FIXTURE_EVAL:
            figs[f"cw{C}"] = fixture_eval(ctx, lm, fixture, C)
    bad = [m for C in FIXTURE_EVAL if (m := fixture_mismatch(C, figs[f"cw{C}"]))]
    a, b = figs["cw0"], figs["cw128"]
    summary = (
        f"{ctx.where}: cw0 loss {a['loss_base2']:.4f} ppl {a['ppl']:.2f}, cw128 {b['loss_base2']:.4f} / "
        f"{b['ppl']:.2f} (fairseq 8.3184 / 319.22, 8.3131 / 318.04), {a['tokens']:,} tokens"
    )
    return Record(verdict(not bad), summary, figs, "; ".join(bad))
