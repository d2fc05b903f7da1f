"""``AdaptiveInput`` / ``AdaptiveSoftmax`` as standalone modules against fairseq's own modules, over 37 generated
configurations (tests/parity/modules/, made by fairseq with tests/parity/make_fairseq_modules.py; committed).

Per configuration: the parameters under fairseq's names and shapes, the initial weights for a seed bit for bit and
the number of random draws made; the embeddings, ``get_log_prob``, the ``adaptive_loss`` sum and the gradients of
every parameter and of the features, in fp32 and fp64, batched (B, T) and flattened; in training mode with a seed,
the dropout and quant-noise masks (torch's kernels: our CPU dropout draws its own masks by design, so
``plain_kernels``). And the bad inputs each module refuses in one message.

Tolerances, from the arithmetic: the sizes here are V <= 48, d <= 24, at most 21 rows. An fp32 logit is a sum of
d <= 24 products rounded at 6e-8 relative; summed in another order (ours applies the untied head as one matrix and
the tail projection as ``x @ P``) it differs by a few 1e-7, and a log-softmax adds the log-sum-exp's rounding: 1e-5
absolute on log-probs (~4 in size) is a 10x margin. The loss sums <= 21 terms of ~4 nats: relative 1e-6. A gradient
entry sums <= 21 rows' products: 1e-5 absolute on entries of size <= ~5. fp64: the same counts at 1.1e-16, so 1e-12.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from adaptive_lm import AdaptiveInput, AdaptiveSoftmax
from adaptive_lm.core.kernels import plain_kernels
from conftest import assert_same_draws

REF = torch.load(Path(__file__).parent / "parity" / "modules" / "reference.pt", weights_only=True)
CASES = REF["references"]
IDS = [f"{i:02d}-{r['config']['kind']}" for i, r in enumerate(CASES)]
TOL = {torch.float32: (1e-5, 1e-6, 1e-5), torch.float64: (1e-12, 1e-12, 1e-12)}  # log-probs, loss (rel), grads


def build(c: dict) -> tuple[AdaptiveInput | None, AdaptiveSoftmax | None]:
    ai = sm = None
    if c["kind"] in ("input", "tied"):
        ai = AdaptiveInput(c["V"], c["pad"], c["idim"], c["factor"], c["odim"], c["cutoff"], c.get("q_noise", 0.0),
                           c.get("qn_block", 8))  # fmt: skip
    if c["kind"] in ("softmax", "tied"):
        sm = AdaptiveSoftmax(c["V"], c["d"], c["cutoff"], c["dropout"], c.get("sm_factor", c["factor"]),
                             adaptive_input=ai, tie_proj=c.get("tie_proj", False))  # fmt: skip
    return ai, sm


def fairseq_layout(ai: AdaptiveInput | None, sm: AdaptiveSoftmax | None, key: str, grad: bool = False) -> torch.Tensor:
    """Our tensor (or its gradient, zeros for none) under fairseq's parameter name, in fairseq's layout."""

    def get(p: torch.Tensor) -> torch.Tensor:
        return (p.grad if p.grad is not None else torch.zeros_like(p)) if grad else p.detach()

    if m := re.fullmatch(r"ai\.embeddings\.(\d+)\.([01])\.weight", key):
        assert ai is not None
        band = int(m.group(1))
        return get(ai.embeddings[band].weight if m.group(2) == "0" else ai.projections[band].weight)
    assert sm is not None
    if key == "sm.head.weight":
        return torch.cat([get(sm.word_weight), get(sm.class_weight)])
    if key in ("sm.head.word_proj.weight", "sm.head.word_proj.1.weight"):
        return get(sm.word_weight)
    if key == "sm.head.word_proj.0.weight":
        assert sm.head_in_proj is not None
        return get(sm.head_in_proj.weight)
    if key == "sm.head.class_proj.weight":
        return get(sm.class_weight)
    m = re.fullmatch(r"sm\.tail\.(\d+)\.([02])\.weight", key)
    assert m, key
    i = int(m.group(1))
    if m.group(2) == "2":
        return get(sm.tail_out[i])
    return get(sm.tail_proj[i]) if sm.tie_proj else get(sm.tail_proj[i]).t()


def load_fairseqs(ai: AdaptiveInput | None, sm: AdaptiveSoftmax | None, weights: dict) -> None:
    with torch.no_grad():
        for k, v in weights.items():
            fairseq_layout(ai, sm, k).copy_(v)  # views of our parameters (the head: see below)
        if sm is not None and "sm.head.weight" in weights:  # the untied head is two of ours
            c0 = sm.cutoff[0]
            sm.word_weight.copy_(weights["sm.head.weight"][:c0])
            sm.class_weight.copy_(weights["sm.head.weight"][c0:])


def params(ai: AdaptiveInput | None, sm: AdaptiveSoftmax | None) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for m in (ai, sm):
        if m is not None:
            seen.update({id(p): p for p in m.parameters()})
    return list(seen.values())


def fresh(r: dict, dtype: torch.dtype = torch.float32, training: bool = False):
    ai, sm = build(r["config"])
    load_fairseqs(ai, sm, r["init"])
    for m in (ai, sm):
        if m is not None:
            m.to(dtype).train(training)
    return ai, sm


@pytest.mark.parametrize("r", CASES, ids=IDS)
def test_names_shapes_and_initial_weights_are_fairseqs_for_a_seed(r):
    """Every fairseq parameter maps to one of ours of the same shape, every one of ours is reached, and a seed gives
    fairseq's weights (fairseq draws each nn.Linear's default init before re-drawing them all: the same count)."""
    torch.manual_seed(r["seed"])
    ai, sm = build(r["config"])
    assert torch.equal(torch.rand(4), r["after_init"]), "a different number of random draws"
    for k, theirs in r["init"].items():
        ours = fairseq_layout(ai, sm, k)
        assert ours.shape == theirs.shape, k
        assert_same_draws(ours, theirs, k)
    reached = {fairseq_layout(ai, sm, k).data_ptr() for k in r["init"] if k != "sm.head.weight"}
    head = {id(sm.word_weight), id(sm.class_weight)} if "sm.head.weight" in r["init"] else set()  # type: ignore
    assert all(p.data_ptr() in reached or id(p) in head for p in params(ai, sm)), "a parameter fairseq lacks"


def _compare_grads(ai, sm, grads: dict, tol: float, what: str) -> None:
    for k, theirs in grads.items():
        ours = fairseq_layout(ai, sm, k, grad=True)
        theirs = torch.zeros_like(ours) if theirs is None else theirs.to(ours.dtype)
        diff = (ours - theirs).abs().max().item() if ours.numel() else 0.0
        assert diff <= tol, (what, k, diff)


@pytest.mark.parametrize("plain", [False, True], ids=["ours", "plain"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("r", CASES, ids=IDS)
def test_outputs_loss_and_gradients_equal_fairseqs(r, dtype, plain):
    c, b, ref = r["config"], r["batch"], r["outputs"]["32" if dtype == torch.float32 else "64"]
    tol_lp, tol_loss, tol_grad = TOL[dtype]
    for flat in (False, True):  # (B, T) and flattened (B * T,) inputs give the same numbers
        ai, sm = fresh(r, dtype)
        tokens, target, x = b["tokens"], b["target"], b["x"].to(dtype).clone().requires_grad_()
        if flat:
            tokens, target, x = tokens.reshape(-1), target.reshape(-1), x.detach().reshape(-1, x.shape[-1])
            x.requires_grad_()
        with plain_kernels(plain):
            if sm is None:
                emb = ai(tokens)
                assert emb.shape == (*tokens.shape, c["odim"]) and emb.dtype == dtype
                diff = (emb.detach().reshape(ref["embeddings"].shape) - ref["embeddings"]).abs().max().item()
                assert diff <= tol_lp, ("embeddings", flat, diff)
                (emb * b["w"].to(dtype).reshape(emb.shape)).sum().backward()
                _compare_grads(ai, sm, ref["grads"], tol_grad, f"flat={flat}")
                continue
            hidden = x + ai(tokens) if ai is not None else x
            with torch.no_grad():
                lp = sm.log_prob(hidden)
                tlp = sm.target_log_prob(hidden, target)
            assert lp.shape == (*target.shape, c["V"])
            want = ref["log_probs"].reshape(lp.shape)
            assert (lp - want).abs().max().item() <= tol_lp, ("log_prob", flat)
            gathered = want.gather(-1, target[..., None])[..., 0]
            assert (tlp - gathered).abs().max().item() <= tol_lp, ("target_log_prob", flat)
            loss = sm.loss(hidden, target, ignore_index=c["pad"], tail_ignore_quirk=True)
            assert abs(loss.item() - ref["loss"].item()) <= tol_loss * abs(ref["loss"].item()) + tol_lp, flat
            exact = sm.loss(hidden.detach(), target, ignore_index=c["pad"])  # without the quirk: -sum log p
            want_exact = -gathered[target != c["pad"]].sum().item()
            assert abs(exact.item() - want_exact) <= tol_loss * abs(want_exact) + tol_lp, flat
            loss.backward()
        assert (x.grad.reshape(ref["grad_x"].shape) - ref["grad_x"]).abs().max().item() <= tol_grad, flat
        _compare_grads(ai, sm, ref["grads"], tol_grad, f"flat={flat}")


TRAIN = [pytest.param(r, id=i, marks=pytest.mark.torch_rng) for r, i in zip(CASES, IDS) if "train" in r]


@pytest.mark.parametrize("r", TRAIN)
def test_training_mode_draws_fairseqs_dropout_and_quant_noise_for_a_seed(r):
    """Training mode, torch's dropout kernel (``plain_kernels``: what CUDA runs): fairseq's input dropout, then each
    tail's dropout on its own rows, in fairseq's order; quant-noise masks and the weights it rewrites."""
    c, b, ref = r["config"], r["batch"], r["train"]
    ai, sm = fresh(r, training=True)
    x = b["x"].clone().requires_grad_()
    with plain_kernels(True):
        torch.manual_seed(r["seed"] + 3)
        if sm is None:
            emb = ai(b["tokens"])
            assert (emb.detach() - ref["embeddings"]).abs().max().item() <= 1e-5
            for k, v in ref["weights_after"].items():  # quant-noise replaced the weights, as fairseq's hook does
                torch.testing.assert_close(fairseq_layout(ai, sm, k), v, atol=1e-6, rtol=0, msg=k)
            (emb * b["w"]).sum().backward()
        else:
            hidden = x + ai(b["tokens"]) if ai is not None else x
            loss = sm.loss(hidden, b["target"], ignore_index=c["pad"], tail_ignore_quirk=True)
            assert abs(loss.item() - ref["loss"].item()) <= 1e-6 * abs(ref["loss"].item()) + 1e-5
            loss.backward()
            assert (x.grad - ref["grad_x"]).abs().max().item() <= 1e-5
            torch.manual_seed(r["seed"] + 4)
            with torch.no_grad():
                hidden = x.detach() + ai(b["tokens"]) if ai is not None else x.detach()
                lp = sm.log_prob(hidden)  # the tails' dropout applies in training mode, as in fairseq's
            assert (lp - ref["log_probs"]).abs().max().item() <= 1e-5
    _compare_grads(ai, sm, ref["grads"], 1e-5, "train")


SOFTMAX = [(r, i) for r, i in zip(CASES, IDS) if r["config"]["kind"] != "input"]


@pytest.mark.parametrize("r", [r for r, _ in SOFTMAX], ids=[i for _, i in SOFTMAX])
def test_bf16_modules_score_in_fp32_within_bf16_rounding(r):
    """bf16 weights and features: the logits carry bf16 rounding (2**-8 relative on the inputs and weights of each
    matmul: features and a tail's projection, then its output), the log-softmax runs in fp32. Against fairseq's
    fp64 numbers, each log-prob is within 4 roundings of the logits' magnitude: 4 * 2**-8 * (1 + max |logit|)."""
    c, b, ref = r["config"], r["batch"], r["outputs"]["64"]
    ai, sm = fresh(r, torch.bfloat16)
    with torch.no_grad():
        hidden = b["x"].bfloat16() + ai(b["tokens"]) if ai is not None else b["x"].bfloat16()
        lp = sm.log_prob(hidden)
        loss = sm.loss(hidden, b["target"], ignore_index=c["pad"], tail_ignore_quirk=True)
    assert lp.dtype == torch.float32 and loss.dtype == torch.float32
    scale = 1 + ref["log_probs"].abs().max().item()
    assert (lp.double() - ref["log_probs"]).abs().max().item() <= 4 * 2**-8 * scale
    n = int((b["target"] != c["pad"]).sum())
    assert abs(loss.item() - ref["loss"].item()) <= 4 * 2**-8 * scale * n


# ---- what fairseq's modules accept or get wrong, and bad inputs --------------------------------------------------
def test_a_tied_softmax_takes_its_tail_widths_from_the_adaptive_input():
    """fairseq's module ignores the softmax's factor when tied (its tails are the input's bands): ours had refused
    any factor whose widths differ, with advice no factor could satisfy (input 16 -> 8 wide bands [16, 8, 4])."""
    ai = AdaptiveInput(100, 1, 16, 2.0, 8, [20, 50])
    sm = AdaptiveSoftmax(100, 8, [20, 50], factor=2.0, adaptive_input=ai)  # its own widths would be [4, 2]
    assert [p.shape for p in sm.tail_proj] == [(8, 8), (8, 4)]
    assert sm.log_prob(torch.randn(3, 8)).shape == (3, 100)
    sm = AdaptiveSoftmax(100, 8, [20, 50], factor=100.0, adaptive_input=ai, tie_proj=True)  # the factor is unused
    assert sm.tail_proj[1] is ai.projections[2].weight


def test_the_loss_refuses_targets_outside_the_vocabulary():
    """``loss`` had counted an id >= V as its last cluster (a number for no word) and failed on a negative id
    inside the cross-entropy kernel; the ignored id may be any value."""
    sm = AdaptiveSoftmax(50, 16, [10, 30])
    h = torch.randn(2, 3, 16)
    for bad, msg in ((50, "from 2 to 50"), (77, "from 2 to 77"), (-1, "from -1 to 5")):
        with pytest.raises(ValueError, match=rf"target ids {msg}: outside the vocabulary \[0, 50\)"):
            sm.loss(h, torch.tensor([[2, 3, 4], [5, 2, bad]]))
    y = torch.tensor([[2, 3, 4], [5, 2, -100]])
    assert torch.isfinite(sm.loss(h, y, ignore_index=-100))
    with pytest.raises(ValueError, match="dtype torch.float32: word ids are integers"):
        sm.loss(h, y.float())


def test_an_ignore_index_among_the_tails_or_past_them_is_ignored_without_the_quirk():
    """The docstring's "over non-ignore_index targets": a target equal to an ignore_index >= cutoff[0] was counted
    as a word (its cluster and its in-cluster term); with the quirk fairseq's arithmetic is kept."""
    torch.manual_seed(0)
    sm = AdaptiveSoftmax(50, 16, [10, 30]).eval()
    h = torch.randn(6, 16)
    y = torch.tensor([3, 12, 35, 40, 12, 49])
    lp = sm.log_prob(h).gather(1, y[:, None])[:, 0].detach()
    for ignore in (12, 40, 50):
        keep = y != ignore
        torch.testing.assert_close(sm.loss(h, y, ignore_index=ignore), -lp[keep].sum(), atol=1e-5, rtol=1e-6)
    z = torch.tensor([3, 12, 35, 40, 50, 49])  # 50 = V: the ignored padding id past the vocabulary
    torch.testing.assert_close(sm.loss(h, z, ignore_index=50), -lp[:4].sum() - lp[5], atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda sm, h: sm.log_prob(torch.randn(2, 3, 8)), r"features of shape \(2, 3, 8\): .* input_dim 16"),
        (lambda sm, h: sm.loss(torch.randn(6, 8), torch.arange(6)), r"features of shape \(6, 8\)"),
        (lambda sm, h: sm.target_log_prob(torch.randn(6, 8), torch.arange(6)), "input_dim 16"),
    ],
)
def test_features_of_another_width_are_named(call, message):
    sm = AdaptiveSoftmax(50, 16, [10, 30])
    with pytest.raises(ValueError, match=message):
        call(sm, None)


@pytest.mark.parametrize(
    "build,message",
    [
        (
            lambda: AdaptiveInput(50, 12, 16, 4.0, 16, [10, 30]),
            r"padding_idx 12 is not an id of the first band \[0, "
            r"10\)",
        ),  # fmt: skip
        (lambda: AdaptiveInput(50, -11, 16, 4.0, 16, [10, 30]), "padding_idx -11"),
        (
            lambda: AdaptiveInput(50, 1, 12, 2.0, 16, [10, 30], q_noise=0.1, qn_block_size=8),
            r"qn_block_size 8 does not divide the band widths \[12, 6, 3\]",
        ),  # fmt: skip
        (lambda: AdaptiveInput(50, 1, 16, 2.0, 16, [10, 30], q_noise=1.0), r"q_noise 1.0 must be in \[0, 1\)"),
        (lambda: AdaptiveInput(50, 1, 16, 2.0, 16, [10, 30], q_noise=0.1, qn_block_size=0), "qn_block_size 0"),
        (lambda: AdaptiveInput(50, 1, 16, 2.0, 16, 10), "cutoff 10: a list of strictly increasing"),
        (lambda: AdaptiveSoftmax(50, 16, [10, 30], dropout=1.0), r"dropout 1.0 must be in \[0, 1\)"),
        (lambda: AdaptiveSoftmax(50, 16, [10, 30], dropout=-0.1), r"dropout -0.1 must be in \[0, 1\)"),
    ],
)
def test_what_failed_later_or_inside_torch_is_refused_at_construction(build, message):
    """An AssertionError from nn.Embedding (padding row outside band 0), a shape error or a division by zero at the
    first training forward (quant-noise blocks, q_noise 1), an int16 overflow in the dropout kernel (dropout >= 1)."""
    with pytest.raises(ValueError, match=message):
        build()


def test_padding_idx_none_and_negative():
    """None: no padding row (fairseq's init would zero every embedding); a negative index counts from the end of
    band 0, as nn.Embedding's, zeroed in every band that has it (fairseq's init)."""
    torch.manual_seed(0)
    ai = AdaptiveInput(50, None, 8, 2.0, 8, [10, 30])
    assert all(bool((e.weight != 0).all()) for e in ai.embeddings) and ai.embeddings[0].padding_idx is None
    ai = AdaptiveInput(50, -1, 8, 2.0, 8, [10, 30])
    assert ai.embeddings[0].padding_idx == 9
    assert all(bool((e.weight[-1] == 0).all()) for e in ai.embeddings)
