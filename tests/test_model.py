"""The model against fairseq's numbers, against torch's own adaptive softmax, and its invariants."""

from __future__ import annotations

import contextlib
import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import adaptive_lm
from adaptive_lm import AdaptiveInput, AdaptiveSoftmax, ConfigError, build_model
from adaptive_lm.core import kernels as K
from adaptive_lm.core.fairseq_format import (
    config_from_fairseq,
    load_into,
    safe_load,
    state_dict_from_fairseq,
    state_dict_to_fairseq,
    stored_settings,
)
from adaptive_lm.core.model import TransformerLM


# ---- size ---------------------------------------------------------------------------------------------
def test_wiki103_parameter_count_is_the_papers_247m():
    with torch.device("meta"):
        model = build_model("transformer_lm_wiki103", 267_744)
    assert model.num_parameters() == 246_933_504
    assert model.layer_norm is None  # no final LayerNorm in the wiki103 arch
    assert model.adaptive_softmax.word_weight is model.embed_tokens.embeddings[0].weight
    for i in range(2):
        assert model.adaptive_softmax.tail_out[i] is model.embed_tokens.embeddings[i + 1].weight
        assert model.adaptive_softmax.tail_proj[i] is model.embed_tokens.projections[i + 1].weight


def test_aliases_resolve_to_the_same_preset():
    with torch.device("meta"):
        a = build_model("transformer_lm_baevski_wiki103", 100_000)
        b = build_model("transformer_lm_wiki103", 100_000)
    assert a.cfg == b.cfg
    with torch.device("meta"):
        g = build_model("transformer_lm_gbw", 1000)
    assert g.cfg.decoder_embed_dim == 512 and g.cfg.decoder_layers == 12 and g.adaptive_softmax is None


# ---- parity with real fairseq ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fairseq_tiny():
    from conftest import FAIRSEQ_TINY

    lm = adaptive_lm.from_pretrained(FAIRSEQ_TINY / "model" / "checkpoint_last.pt")
    ref = np.load(FAIRSEQ_TINY / "reference" / "valid_logprobs.npz")
    return lm, ref


def _stream(ref) -> torch.Tensor:
    return torch.tensor(ref["target_ids"], dtype=torch.long)


def test_fixture_features_and_full_rows_match_fairseq(fairseq_tiny):
    lm, ref = fairseq_tiny
    x = torch.tensor(ref["block0_input_ids"])[None]
    with torch.no_grad():
        feats = lm.model(x)[0]
        rows = lm.model.log_probs(x)[0, : len(ref["block0_full_logprobs_first_rows"])]
    assert (feats - torch.tensor(ref["block0_features"])).abs().max() < 1e-5
    assert (rows - torch.tensor(ref["block0_full_logprobs_first_rows"])).abs().max() < 1e-5


def test_every_layers_states_and_the_knn_key_are_fairseqs(fairseq_tiny, fixture_dir):
    """``features(s, all_layers=True)``: fairseq's ``inner_states`` (the embedding's output, then each layer's) and
    ``extract_features``' output; ``KeyCapture(model, "last_ffn_input")``: the last layer's ``fc1`` input, knnlm's
    default key (fairseq's, by the same hook: tests/fixtures/make_fairseq_states.py). Every value within 1e-5."""
    from adaptive_lm.inference.knn.keys import KeyCapture

    lm, _ = fairseq_tiny
    ref = np.load(fixture_dir / "reference" / "states.npz")
    for i, sentence in enumerate(ref["sentences"].tolist()):
        src = torch.tensor(ref[f"src{i}"])[None]  # (1, T): </s> + words
        assert [lm.start_token, *lm.ids(sentence)] == src[0].tolist()
        *inner, final = lm.features(sentence, all_layers=True)
        assert len(inner) == lm.cfg.decoder_layers + 1
        torch.testing.assert_close(torch.stack(inner), torch.tensor(ref[f"inner{i}"]), atol=1e-5, rtol=0)
        torch.testing.assert_close(final, torch.tensor(ref[f"final{i}"]), atol=1e-5, rtol=0)
        with KeyCapture(lm.model, "last_ffn_input") as keys, torch.no_grad():
            lm.model(src)
            torch.testing.assert_close(keys(src)[0], torch.tensor(ref[f"ffn_in{i}"]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("cw", [0, 128])
def test_fixture_token_logprobs_match_fairseq_both_paths(fairseq_tiny, cw):
    lm, ref = fairseq_tiny
    S = _stream(ref)  # first 2048 targets of the valid stream
    X = torch.cat([torch.tensor([2]), S[:-1]])
    expected = torch.tensor(ref[f"logprobs_cw{cw}"])
    tps = 256
    step = tps - cw
    got_t, got_f = [], []
    with torch.no_grad():
        for start in range(0, len(S), step):
            lo = max(0, start - cw)
            src, tgt = X[lo : start + step][None], S[lo : start + step][None]
            keep = slice(start - lo, None)
            got_t.append(lm.model.target_log_probs(src, tgt)[0, keep])
            full = lm.model.log_probs(src)[0]
            got_f.append(full.gather(1, tgt[0, :, None])[:, 0][keep])
    got_t, got_f = torch.cat(got_t).double(), torch.cat(got_f).double()
    assert got_t.shape == expected.shape
    assert (got_t - expected).abs().max() < 1e-5
    assert (got_f - expected).abs().max() < 1e-5


def test_fixture_loss_and_gradient_norms_match_fairseq(fairseq_tiny, fixture_dir):
    """fairseq's ``adaptive_loss`` on one batch (the first 2,048 valid targets as 8 x 256, eval mode) and the L2 norm
    of each parameter's gradient of that sum, from fairseq's own criterion and backward (valid_grad_ref.json)."""
    lm, ref = fairseq_tiny
    grad_ref = json.loads((fixture_dir / "reference" / "valid_grad_ref.json").read_text())
    S = _stream(ref).long()
    X = torch.cat([torch.tensor([2]), S[:-1]])
    model = copy.deepcopy(lm.model).eval()  # the module-scoped model stays without gradients
    loss = model.loss(X.view(8, 256), S.view(8, 256), tail_ignore_quirk=True)  # fairseq's adaptive_loss
    loss.backward()
    assert grad_ref["targets_hit_by_the_tail_ignore_quirk"] > 0  # the quirk is exercised by this batch
    assert abs(loss.item() - grad_ref["loss_sum_nats"]) < 2048 * 1e-5  # the per-token bound above, summed
    grads = copy.deepcopy(model)
    with torch.no_grad():
        for g, p in zip(grads.parameters(), model.parameters()):
            g.copy_(p.grad)
    named = state_dict_to_fairseq(grads, lm.cfg)  # our gradients under fairseq's parameter names
    for name, norm in grad_ref["grad_l2_norm_per_param"].items():
        got = named[name].double().norm().item()
        if name.endswith("k_proj.bias"):  # 0 in exact arithmetic: a key bias adds q.b to all of a query's logits
            assert got < 1e-5 and norm < 1e-5, name
        else:  # each element an fp32 sum over 2,048 positions in another order: ~sqrt(2048) * 2**-24 = 3e-6
            assert abs(got - norm) <= 1e-5 * norm, (name, got, norm)


def test_fixture_settings_come_from_cfg_not_arch(fixture_dir):
    ckpt = safe_load(fixture_dir / "model" / "checkpoint_last.pt")
    cfg = config_from_fairseq(stored_settings(ckpt), 6000)
    assert (cfg.decoder_layers, cfg.decoder_embed_dim, cfg.adaptive_input_cutoff) == (2, 64, (1000, 3000))
    assert cfg.max_target_positions == 256


def test_old_fused_in_proj_layout_loads_identically(fairseq_tiny, fixture_dir):
    lm, ref = fairseq_tiny
    ckpt = safe_load(fixture_dir / "model" / "checkpoint_last.pt")
    sd = dict(ckpt["model"])
    for i in range(2):
        p = f"decoder.layers.{i}.self_attn."
        for kind in ("weight", "bias"):
            sd[p + f"in_proj_{kind}"] = torch.cat([sd.pop(p + f"{n}_proj.{kind}") for n in "qkv"])
    model = TransformerLM(lm.cfg).eval()
    load_into(model, state_dict_from_fairseq(sd, lm.cfg))
    x = torch.tensor(ref["block0_input_ids"])[None]
    with torch.no_grad():
        assert torch.equal(model(x), lm.model(x))


# ---- an independent second reference: torch's AdaptiveLogSoftmaxWithLoss ----------------------------------
def test_untied_adaptive_softmax_equals_torch_reference():
    torch.manual_seed(1)
    V, d, cut = 50, 16, [10, 30]
    ours = AdaptiveSoftmax(V, d, cut, dropout=0.0, factor=4.0)
    ref = torch.nn.AdaptiveLogSoftmaxWithLoss(d, V, cut, div_value=4.0, head_bias=False)
    with torch.no_grad():
        ref.head.weight.copy_(torch.cat([ours.word_weight, ours.class_weight]))
        for i in range(2):
            ref.tail[i][0].weight.copy_(ours.tail_proj[i].t())
            ref.tail[i][1].weight.copy_(ours.tail_out[i])
    x = torch.randn(64, d)
    y = torch.randint(0, V, (64,))
    torch.testing.assert_close(ours.log_prob(x), ref.log_prob(x), atol=1e-6, rtol=0)
    # under autograd too (the full distribution is written in place only without it): the same gradients
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours.log_prob(xa)[:, ::7].sum().backward()
    ref.log_prob(xb)[:, ::7].sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-5, rtol=0)
    out = ref(x, y)
    torch.testing.assert_close(ours.target_log_prob(x, y), out.output, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.loss(x, y, ignore_index=-100) / 64, out.loss, atol=1e-6, rtol=0)


def test_head_and_target_scores_follow_weight_changes_made_through_data():
    """The optimizer updates ``p.data`` (no version counter moves): nothing derived from the weights may be kept
    between calls (a kept [words; clusters] matrix once made validation score with the weights before the update)."""
    torch.manual_seed(2)
    sm = AdaptiveSoftmax(50, 16, [10, 30], factor=4.0).eval()
    x, y = torch.randn(8, 16), torch.randint(0, 50, (8,))

    def fresh() -> torch.Tensor:
        return x @ torch.cat([sm.word_weight, sm.class_weight]).t()

    with torch.no_grad():
        before = sm.target_log_prob(x, y)
        assert torch.equal(sm.head_logits(x), fresh())
        sm.word_weight.data.mul_(2)
        sm.class_weight.data.add_(1)
        assert torch.equal(sm.head_logits(x), fresh())
        after = sm.target_log_prob(x, y)
        assert not torch.equal(before, after)
        torch.testing.assert_close(after, sm.log_prob(x).gather(1, y[:, None])[:, 0], atol=1e-6, rtol=0)
    x.requires_grad_()
    sm.head_logits(x).sum().backward()  # under autograd the concatenated head passes gradients to both parts
    assert sm.word_weight.grad.abs().sum() > 0 and sm.class_weight.grad.abs().sum() > 0


@pytest.mark.parametrize("table", [False, True], ids=["bands", "inference table"])
def test_adaptive_input_refuses_ids_outside_the_vocabulary(table):
    emb = AdaptiveInput(50, 1, 16, 4.0, 16, [10, 30]).eval()
    ok = torch.tensor([[0, 9, 10, 29, 30, 49]])
    block = K.fast_linears(torch.device("cpu"), packed=True) if table else contextlib.nullcontext()
    with torch.no_grad(), block:
        assert K.weights_fixed() == table
        assert emb(ok).shape == (1, 6, 16) and emb(torch.zeros(0, 3, dtype=torch.long)).shape == (0, 3, 16)
        for bad in (50, -1):  # each position must fall in exactly one band: a stray id would leave its row unset
            with pytest.raises(ValueError, match="outside the vocabulary"):
                emb(torch.tensor([[3, bad, 12]]))


def test_adaptive_input_inference_table_gives_the_bands_embeddings_and_is_made_once_per_block(monkeypatch):
    """Inside ``packed_weights`` without gradients a lookup in the whole-vocabulary table (made once per block)
    replaces the per-band route; the rows are the same products, summed in another order: within the fp32
    bound dim * 2**-24 * |e| . |p| (against fp64). Training or gradients: the bands, no table."""
    torch.manual_seed(4)
    emb = AdaptiveInput(50, 1, 16, 2.0, 24, [10, 30]).eval()
    tok = torch.randint(0, 50, (5, 9))
    made: list[int] = []
    table = emb.table
    monkeypatch.setattr(emb, "table", lambda: made.append(1) or table())

    def exact(dtype: torch.dtype, absolute: bool = False) -> torch.Tensor:
        rows = []
        for t in tok.reshape(-1).tolist():
            i = sum(t >= c for c in emb.cutoff[:-1])  # the token's band
            e, p = emb.weights_for_band(i)
            e, p = e[t - ([0, *emb.cutoff][i])].to(dtype), p.to(dtype)
            rows.append(e.abs() @ p.abs().t() if absolute else e @ p.t())
        return torch.stack(rows).view(5, 9, 24)

    with torch.no_grad(), K.fast_linears(torch.device("cpu"), packed=True):
        got, again = emb(tok), emb(tok)
        assert len(made) == 1 and torch.equal(got, again)
        bound = 16 * 2**-24 * exact(torch.float64, absolute=True)  # 16: the widest band's dimension
        assert bool(((got.double() - exact(torch.float64)).abs() <= bound).all())
        emb.train()
        emb(tok)
        emb.eval()
    with K.fast_linears(torch.device("cpu"), packed=True):
        emb(tok)  # with gradients
    with torch.no_grad():
        emb(tok)  # outside the block
    assert len(made) == 1


# ---- invariants -------------------------------------------------------------------------------------------
def test_full_distribution_sums_to_one_and_target_path_agrees():
    model = build_model("tiny", 64, dropout=0.0).eval()
    x = torch.randint(0, 64, (3, 12))
    y = torch.randint(4, 64, (3, 12))
    with torch.no_grad():
        lp = model.log_probs(x)
        assert lp.shape == (3, 12, 64)
        torch.testing.assert_close(lp.logsumexp(-1), torch.zeros(3, 12), atol=1e-5, rtol=0)
        torch.testing.assert_close(model.target_log_probs(x, y), lp.gather(-1, y[..., None])[..., 0], atol=1e-6, rtol=0)


def test_loss_equals_minus_sum_log_prob_without_quirk_and_quirk_drops_cutoff_plus_one():
    model = build_model("tiny", 64).eval()
    x = torch.randint(4, 64, (2, 10))
    y = torch.randint(4, 64, (2, 10))
    y[0, 0], y[0, 1] = 21, 41  # ids cutoff + padding_idx: fairseq's tail ignore-index quirk hits them
    y[1, -1] = 1  # padding is never counted
    with torch.no_grad():
        lp = model.log_probs(x).gather(-1, y[..., None])[..., 0]
        mask = y != 1
        exact = model.loss(x, y, tail_ignore_quirk=False)
        quirk = model.loss(x, y, tail_ignore_quirk=True)
    torch.testing.assert_close(exact, -(lp[mask]).sum(), atol=1e-4, rtol=1e-6)
    sm = model.adaptive_softmax
    feats = model(x)
    with torch.no_grad():
        head = F.log_softmax(sm.head_logits(feats.view(-1, 32)), -1)
        full = model.log_probs(x).view(-1, 64)
        flat = y.reshape(-1)
        dropped = sum(  # the within-cluster terms of every target 21 or 41 (log p(w) - log p(cluster))
            full[r, int(flat[r])] - head[r, 20 + (int(flat[r]) >= 40)]
            for r in range(flat.numel())
            if flat[r] in (21, 41)
        )
    torch.testing.assert_close(quirk, exact + dropped, atol=1e-4, rtol=1e-6)


def test_row_bucketing_changes_neither_loss_nor_gradients(monkeypatch):
    """Training and evaluation pad adaptive-input bands and softmax tails to ``bucket`` sizes on CPU in half
    precision. Forced on here (fp64) to compare exactly with the unpadded computation."""
    buckets = [adaptive_lm.core.kernels.bucket(n) for n in (1, 64, 65, 129, 200, 257, 513)]
    assert buckets == [64, 64, 128, 192, 256, 384, 768]
    cpu = torch.device("cpu")
    assert not adaptive_lm.core.kernels.wants_buckets(cpu, torch.float32)
    assert adaptive_lm.core.kernels.wants_buckets(cpu, torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert adaptive_lm.core.kernels.wants_buckets(cpu, torch.float32)
    torch.manual_seed(0)
    model = build_model(
        "tiny", 300, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, adaptive_softmax_dropout=0.0
    ).double()
    x, y = torch.randint(2, 300, (3, 50)), torch.randint(2, 300, (3, 50))
    model.eval()
    with torch.no_grad():
        unpadded = model.target_log_probs(x, y)  # fp64: no padding
    monkeypatch.setattr(adaptive_lm.core.kernels, "wants_buckets", lambda device, dtype: True)
    with torch.no_grad():
        torch.testing.assert_close(model.target_log_probs(x, y), unpadded, atol=1e-12, rtol=0)
    results = []
    for train in (True, False):
        model.train(train)
        model.zero_grad()
        loss = model.loss(x, y, tail_ignore_quirk=False)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (l_train, g_train), (l_eval, g_eval) = results
    with torch.no_grad():
        exact = -model.target_log_probs(x, y).sum()
    torch.testing.assert_close(l_train, exact, atol=1e-10, rtol=0)
    torch.testing.assert_close(l_eval, exact, atol=1e-10, rtol=0)
    for a, b in zip(g_train, g_eval):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_tied_weights_get_gradient_from_both_sides():
    model = build_model(
        "tiny", 64, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, adaptive_softmax_dropout=0.0
    )
    shared = model.embed_tokens.embeddings[1].weight  # band 1 = tail cluster 0
    assert shared is model.adaptive_softmax.tail_out[0]
    x = torch.tensor([[25, 26, 5, 6]])  # band-1 words on the input side
    y = torch.tensor([[5, 6, 7, 8]])  # head words only: the tail-0 output side is not used
    model.loss(x, y).backward()
    g_in = shared.grad.clone()
    assert g_in[5:7].abs().sum() > 0 and g_in[:5].abs().sum() == 0
    model.zero_grad()
    x2 = torch.tensor([[5, 6, 7, 8]])  # no band-1 input
    y2 = torch.tensor([[25, 26, 5, 6]])  # tail-0 targets: output side
    model.loss(x2, y2).backward()
    g_out = shared.grad.clone()
    assert g_out.abs().sum() > 0
    model.zero_grad()
    model.loss(x, y2).backward()  # both sides at once: gradients accumulate into the one tensor
    assert shared.grad[5:7].abs().sum() > 0 and shared.grad.abs().sum() > g_out.abs().sum() * 0


def test_gradcheck_adaptive_modules_float64():
    torch.manual_seed(0)
    ai = AdaptiveInput(30, 1, 8, 2.0, 6, [10, 20]).double()
    sm = AdaptiveSoftmax(30, 6, [10, 20], dropout=0.0, factor=2.0, adaptive_input=ai, tie_proj=True).double()
    tokens = torch.tensor([[0, 5, 12, 25], [19, 29, 3, 11]])
    target = torch.tensor([[2, 15, 22, 8], [29, 10, 4, 20]])
    w = ai.projections[1].weight

    def f(proj):
        with torch.no_grad():
            w.copy_(proj)
        return sm.loss(ai(tokens), target, ignore_index=-100, tail_ignore_quirk=False)

    # a functional check through the shared tensor: analytic grad vs finite differences
    base = w.detach().clone().requires_grad_(True)
    loss = sm.loss(ai(tokens), target, ignore_index=-100)
    (g,) = torch.autograd.grad(loss, w)
    eps, num = 1e-6, torch.zeros_like(w)
    for idx in np.ndindex(*w.shape):
        orig = base[idx].item()
        p = base.detach().clone()
        p[idx] = orig + eps
        hi = f(p).item()
        p[idx] = orig - eps
        lo = f(p).item()
        num[idx] = (hi - lo) / (2 * eps)
    with torch.no_grad():
        w.copy_(base)
    torch.testing.assert_close(g, num, atol=1e-6, rtol=1e-5)
    assert torch.autograd.gradcheck(
        lambda h: sm.target_log_prob(h, target), (torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True),)
    )


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = build_model(
        "tiny", 64, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, adaptive_softmax_dropout=0.0
    )
    src = torch.randint(4, 64, (4, 16))
    tgt = torch.roll(src, -1, 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(150):
        opt.zero_grad()
        loss = model.loss(src, tgt, tail_ignore_quirk=False) / tgt.numel()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert first > 3.0  # about ln(64) at init
    assert loss.item() < 0.1


# ---- build-time checks ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(adaptive_input_cutoff=(20, 80), adaptive_softmax_cutoff=(20, 80)), "vocabulary size"),
        (dict(adaptive_softmax_cutoff=(20, 30)), "identical cutoffs"),
        (dict(adaptive_softmax_factor=2.0), "equal factors"),
        (dict(decoder_attention_heads=5), "not divisible"),
        (dict(adaptive_input_factor=8.0, adaptive_softmax_factor=8.0), r"bands would be \[32, 4, 0\] wide"),
        # fairseq options refused by name
        (dict(quant_noise_scalar=0.1), "quant_noise_scalar = 0.1: fairseq then swaps every Linear"),
        (dict(base_layers=1), "base_layers = 1: BASE layers"),
        (dict(decoder_xformers_att_config="{'name': 'scaled_dot_product'}"), "xFormers attention"),
        (dict(activation_fn="swish"), "swish is broken"),
        (dict(quant_noise_pq=0.1, quant_noise_pq_block_size=5), "block size that divides"),
        (dict(character_embeddings=True), "tie_adaptive_weights needs the adaptive input's bands"),
    ],
)
def test_bad_configs_say_what_to_change(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_model("tiny", 64, **overrides)


def test_shared_output_embedding_without_a_word_embedding_is_refused_for_its_reason():
    """--arch transformer_lm_gpt3_small (it forces shared embeddings) with --character-embeddings or
    --adaptive-input: fairseq-train fails with an AttributeError; ours said "needs a word embedding as wide as
    decoder_output_dim (16 != 16)" for the first and crashed as fairseq for the second."""
    from adaptive_lm.core.presets import make_config

    small = dict(decoder_embed_dim=16, decoder_input_dim=16, decoder_output_dim=16, decoder_attention_heads=1)
    with pytest.raises(ConfigError, match="--character-embeddings builds none"):
        make_config("transformer_lm_gpt3_small", 64, **small, character_embeddings=True)
    # with --adaptive-input ours failed as fairseq, with a traceback (AttributeError: no attribute 'weight')
    with pytest.raises(ConfigError, match="--adaptive-input builds none"):
        make_config("transformer_lm_gpt3_small", 64, **small, adaptive_input=True, adaptive_input_cutoff=(20,))


def test_target_path_in_small_chunks_equals_one_pass():
    # fp64: chunking only changes which GEMM blocking sums the d=32 products of a logit, so the two paths may differ
    # by about d * 2**-53 * |logit| (~1e-14); an fp32 bound of that form would also hide nothing, but fp64 keeps the
    # check about the chunking logic rather than about one CPU's kernel choice.
    model = build_model("tiny", 64).double().eval()
    x = torch.randint(4, 64, (3, 20))
    y = torch.randint(4, 64, (3, 20))
    with torch.no_grad():
        feats = model(x)
        whole = model.adaptive_softmax.target_log_prob(feats, y)
        chunked = model.adaptive_softmax.target_log_prob(feats, y, chunk_elements=50)  # a couple of rows at a time
    torch.testing.assert_close(chunked, whole, atol=1e-12, rtol=0)


@pytest.mark.parametrize("variant", ["wiki103_tied", "tied_emb_only", "untied", "plain", "plain_shared"])
def test_a_seed_gives_fairseqs_initial_weights_exactly(variant):
    """The same seed gives fairseq's initial weights bit for bit (tests/fixtures/fairseq_init.pt, made by
    tests/fixtures/make_fairseq_init.py with fairseq itself): the same random draws, in the same order."""
    from pathlib import Path

    from conftest import assert_same_draws

    fx = torch.load(Path(__file__).parent / "fixtures" / "fairseq_init.pt", weights_only=True)
    cfg = config_from_fairseq(fx["settings"][variant], 300)
    prefix = f"{variant}/"
    theirs = state_dict_from_fairseq(
        {k[len(prefix) :]: v for k, v in fx["weights"].items() if k.startswith(prefix)}, cfg
    )
    torch.manual_seed(7)  # fairseq-train: set_torch_seed(seed), then build the model
    ours = TransformerLM(cfg).state_dict()
    assert set(theirs) == set(ours)
    for k, v in theirs.items():
        assert_same_draws(ours[k], v, k)


# ---- NormFormer, add_bos_token, relu_dropout ---------------------------------------------------------------
@pytest.mark.parametrize("pre_ln", [True, False])
def test_normformer_layer_is_fairseqs_formula(pre_ln):
    """fairseq 0.12's decoder cannot build these layers (see config.NORMFORMER) but older checkpoints hold them; the
    layer against fairseq's TransformerDecoderLayerBase formulas written out here."""
    torch.manual_seed(0)
    model = build_model("transformer_lm", 50, decoder_embed_dim=16, decoder_layers=1, decoder_attention_heads=4,
                        decoder_ffn_embed_dim=24, decoder_input_dim=16, decoder_output_dim=16, dropout=0.0,
                        decoder_normalize_before=pre_ln, scale_attn=True, scale_fc=True, scale_heads=True,
                        scale_resids=True).double().eval()  # fmt: skip
    layer = model.layers[0]
    with torch.no_grad():
        for p in (layer.c_attn, layer.w_resid, layer.attn_ln.weight, layer.ffn_layernorm.bias):
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    with torch.no_grad():
        got = layer(x)
        h = layer.self_attn_layer_norm(x) if pre_ln else x
        a = layer.self_attn(h)  # includes out_proj: fairseq scales the heads' slices of that output
        a = (a.view(2, 7, 4, 4) * layer.c_attn.view(1, 1, 4, 1)).reshape(2, 7, 16)
        y = x + layer.attn_ln(a)
        y = y if pre_ln else layer.self_attn_layer_norm(y)
        h = layer.final_layer_norm(y) if pre_ln else y
        f = layer.fc2(layer.ffn_layernorm(F.relu(layer.fc1(h))))
        want = layer.w_resid * y + f
        want = want if pre_ln else layer.final_layer_norm(want)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "arch,overrides",
    [
        ("transformer_lm_wiki103", dict(decoder_layers=2, decoder_embed_dim=16, decoder_attention_heads=4,
                                        decoder_ffn_embed_dim=32, decoder_input_dim=16, decoder_output_dim=16,
                                        adaptive_input_cutoff="10,30", adaptive_softmax_cutoff="10,30")),
        ("transformer_lm", dict(decoder_layers=3, decoder_embed_dim=16, decoder_attention_heads=2,
                                decoder_ffn_embed_dim=24, decoder_input_dim=8, decoder_output_dim=12)),
        ("transformer_lm", dict(decoder_layers=1, decoder_embed_dim=16, decoder_attention_heads=4,
                                decoder_ffn_embed_dim=24, decoder_input_dim=16, decoder_output_dim=16,
                                decoder_normalize_before=True, scale_attn=True, scale_fc=True, scale_heads=True,
                                scale_resids=True, activation_fn="gelu")),
    ],
)  # fmt: skip
def test_keep_from_gives_the_later_positions_of_the_full_forward(arch, overrides):
    """Evaluation with a context window asks only for the scored positions (``keep_from``): the last layer then
    computes those alone. Same features as the full forward's, in fp64 to rounding."""
    torch.manual_seed(0)
    model = build_model(arch, 50, dropout=0.0, **overrides).double().eval()
    for layer in model.layers:  # NormFormer's scales away from their neutral initial values
        for p in (layer.c_attn, layer.w_resid):
            if p is not None:
                with torch.no_grad():
                    p.add_(0.3 * torch.randn_like(p))
    src = torch.randint(4, 50, (3, 11))
    src[2, 8:] = model.padding_idx  # a padded row
    with torch.no_grad():
        full = model(src)  # (3, 11, d_out)
        for keep in (1, 6, 10):
            got = model(src, keep_from=keep)
            assert got.shape == (3, 11 - keep, full.shape[-1])
            torch.testing.assert_close(got, full[:, keep:], atol=1e-12, rtol=0)
        with pytest.raises(ValueError, match="keep_from"):
            model(src, cache=model.new_cache(), keep_from=2)


def test_a_checkpoint_with_normformer_weights_loads_them(tmp_path):
    from adaptive_lm.core.dictionary import Dictionary
    from adaptive_lm.core.fairseq_format import to_fairseq_checkpoint

    d = Dictionary.from_counts({f"w{i}": 100 - i for i in range(60)})
    model = build_model("tiny", len(d), scale_attn=True, scale_heads=True).eval()
    ck = to_fairseq_checkpoint(model, model.cfg, 64)
    assert any(k.endswith("attn_ln.weight") for k in ck["model"])
    torch.save(ck, tmp_path / "model.pt")
    d.save(tmp_path / "dict.txt")
    back = adaptive_lm.from_pretrained(tmp_path / "model.pt")
    assert back.cfg.scale_attn and back.cfg.scale_heads and not back.cfg.scale_fc
    x = torch.tensor([[2, 5, 30, 4, 11]])
    with torch.no_grad():
        torch.testing.assert_close(back.model.log_probs(x), model.log_probs(x), atol=1e-6, rtol=0)


def test_relu_dropout_is_the_fallback_of_activation_dropout():
    m = build_model("tiny", 64, activation_dropout=0.0, relu_dropout=0.4)
    assert m.layers[0].act_dropout == 0.4
    m = build_model("tiny", 64, activation_dropout=0.2, relu_dropout=0.4)
    assert m.layers[0].act_dropout == 0.2


def test_add_bos_token_evaluation_drops_the_bos_score(tmp_path):
    """With ``add_bos_token`` every block starts with <s> in source and target (fairseq's MonolingualDataset) and
    eval-lm drops the <s> target's score: checked against the blocks scored one by one."""
    from adaptive_lm.core.data import IndexedWriter
    from adaptive_lm.core.dictionary import Dictionary
    from adaptive_lm.inference.evaluate import EvalConfig, evaluate
    from adaptive_lm.inference.hub import LanguageModel

    d = Dictionary.from_counts({f"w{i}": 100 - i for i in range(60)})
    d.save(tmp_path / "dict.txt")
    rng = np.random.default_rng(0)
    stream = rng.integers(4, len(d), size=50)
    w = IndexedWriter(tmp_path / "test", np.dtype(np.uint16))
    w.add_array(stream, np.array([50]))
    w.finalize()
    torch.manual_seed(0)
    lm = LanguageModel(build_model("tiny", len(d), add_bos_token=True, dropout=0.0).eval(), d, "", 16)
    res = evaluate(lm, EvalConfig(data=str(tmp_path), gen_subset="test", tokens_per_sample=16, progress=False),
                   keep_scores=True)  # fmt: skip
    expect = []
    with torch.no_grad():
        for s in range(0, 50, 16):
            tgt = torch.tensor(stream[s : s + 16])
            src = torch.cat([torch.tensor([2 if s == 0 else int(stream[s - 1])]), tgt[:-1]])
            src, tgt = torch.cat([torch.tensor([0]), src]), torch.cat([torch.tensor([0]), tgt])
            expect.append(lm.model.target_log_probs(src[None], tgt[None])[0, 1:])
    expect = torch.cat(expect).double().numpy()
    assert res.n_tokens == 50 and np.abs(res.scores - expect).max() < 1e-5


def test_a_reordered_key_value_cache_decodes_what_the_reordered_histories_give():
    """Beam search reorders the cache rows between steps (rows repeated, dropped, fewer rows when sentences end), and
    ``LayerCache`` applies a reorder lazily, at the layer's next append; two reorders before an append compose; a
    reorder that moves at most half the rows copies those in place, the others gather all rows. Each row's features
    must be those of a full forward over the row's history as reordered, in fp64 to rounding."""
    torch.manual_seed(0)
    model = build_model("tiny", 50, dropout=0.0).double().eval()
    g = torch.Generator().manual_seed(1)
    rows, steps = 6, 9
    tokens = torch.randint(4, 50, (rows, steps), generator=g)
    hist = tokens[:, :0]
    reorders = {  # before step t: the rows kept, in order (a list: several reorders before that step's append)
        2: [torch.tensor([1, 1, 0, 3, 5, 2])],
        3: [torch.tensor([0, 1, 2, 3, 5, 5])],  # one row moves: copied in place (``flush``'s partial path)
        4: [torch.tensor([5, 4, 3, 2, 1, 0]), torch.tensor([0, 0, 2, 2, 4, 4])],
        5: [torch.tensor([0, 4, 2, 1, 4, 5])],  # two rows swap sources: both read before either is written
        6: [torch.tensor([3, 0, 1, 4])],  # two rows' sentences ended
        7: [torch.tensor([0, 1, 3, 3])],
        8: [torch.tensor([2, 2, 0])],
    }
    cache = model.new_cache(steps + 1)
    with torch.no_grad():
        for t in range(steps):
            for order in reorders.get(t, []):
                for layer in cache:
                    layer.reorder(order)
                hist = hist[order]
            step_tokens = tokens[: hist.shape[0], t : t + 1]  # (rows now, 1)
            hist = torch.cat([hist, step_tokens], dim=1)
            pos = torch.full_like(step_tokens, t + model.padding_idx + 1)
            got = model(step_tokens, cache=cache, positions=pos)[:, -1]  # (rows now, d)
            want = model(hist)[:, -1]
            torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
        assert all(layer["k"].shape[:3] == (3, layer["k"].shape[1], steps) for layer in cache)


def test_a_band_factor_of_a_module_that_is_off_is_ignored_as_fairseq_ignores_it():
    """fairseq reads adaptive_input_factor / adaptive_softmax_factor only when that module is built, so a checkpoint
    with a zero factor and the module off loads there; the size check had refused it whatever the module."""
    small = dict(decoder_layers=1, decoder_embed_dim=8, decoder_ffn_embed_dim=8, decoder_attention_heads=1)
    plain = build_model("transformer_lm", 50, **small, adaptive_input_factor=0.0, adaptive_softmax_factor=-1.0)
    assert plain.adaptive_softmax is None and not plain.cfg.adaptive_input
    with pytest.raises(ConfigError, match="adaptive_input_factor 0.0 must be positive"):
        build_model("tiny", 50, adaptive_input=True, adaptive_input_cutoff=(20,), adaptive_input_factor=0.0)
    with pytest.raises(ConfigError, match="adaptive_softmax_factor 0.0 must be positive"):
        build_model("tiny", 50, adaptive_softmax_cutoff=(20,), adaptive_softmax_factor=0.0)
