"""Differential tests against real fairseq over 48 generated configurations (tests/parity/, made by fairseq itself
with tests/parity/make_fairseq_parity.py; committed, so every clone runs them).

Per configuration, from fairseq's own checkpoint file: every target log-prob and four full distributions (fp32 and
fp64), one training step's loss and gradient norm with dropout 0 (layer drop and quant-noise draw from the seeded RNG
as in fairseq), and for ten configurations fairseq's initial weights for the seed, bit for bit.

Tolerances, from the arithmetic: fp32 log-probs are sums of O(10) terms of size O(10) through a few layers; each
op rounds at 6e-8 relative, and our kernels order sums differently from fairseq's (fused q/k/v, SDPA, blocked
matmuls), so agreement is a few 1e-6 absolute, asserted at 1e-5. The summed loss (~50 tokens x ~5.5 nats) and the
gradient norm carry the same relative rounding: 1e-6 and 1e-5 relative. In fp64 the same computations agree to
~1e-15 relative per op; 1e-9 leaves room for the O(1e2) ops of a forward and backward without hiding a real
difference (a wrong formula is off by far more than 1e-9), except where an fp64 model computes in fp32 as fairseq
does (gelu, the sinusoidal position table: fp32_inside, fp32_positions).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import adaptive_lm
from adaptive_lm.cli import build_parser
from adaptive_lm.cli.train import train_config
from adaptive_lm.core.dictionary import Dictionary
from adaptive_lm.core.fairseq_format import state_dict_from_fairseq
from adaptive_lm.core.kernels import fast_linears, plain_kernels
from adaptive_lm.core.optim import clip_grad_norm_
from adaptive_lm.training.config import TrainConfig
from adaptive_lm.training.trainer import model_config, seeded_model
from conftest import assert_same_draws

DATA = Path(__file__).parent / "parity" / "data"
REF = torch.load(DATA / "reference.pt", weights_only=True)
CONFIGS = REF["configs"]
DICT = Dictionary.load(DATA / "dict.txt")


def load(c: dict, dtype: torch.dtype, training: bool = False) -> adaptive_lm.LanguageModel:
    overrides = dict(c["load_overrides"])
    if training:
        overrides.update(REF["train_overrides"])  # every dropout 0, as fairseq's reference step
    lm = adaptive_lm.from_pretrained(DATA / c["name"] / "checkpoint.pt", dictionary=DATA / "dict.txt",
                                     overrides=overrides)  # fmt: skip
    lm.model.to(dtype)
    return lm


# ours: our CPU kernels as the trainer and eval run them (fp32 linears on oneDNN); plain: what CUDA runs (on the
# CPU: PyTorch's kernels, MKL linears)
KERNELS = pytest.mark.parametrize("plain", [False, True], ids=["ours", "plain"])
CPU = torch.device("cpu")


@KERNELS
@pytest.mark.parametrize("c", CONFIGS, ids=[c["name"] for c in CONFIGS])
def test_log_probs_equal_fairseqs(c, plain):
    with plain_kernels(plain), fast_linears(CPU):
        _log_probs_equal_fairseqs(c)


def fp32_inside(c: dict) -> bool:
    """fairseq's ``gelu`` runs in fp32 whatever the model's dtype (``F.gelu(x.float()).type_as(x)``; ours too, to
    match), so an fp64 model with it carries fp32 rounding: and that rounding is the CPU's, since PyTorch sends an
    fp32 gelu to oneDNN, whose erf differs by an ulp or two between its AVX2 and AVX-512 code (the reference was
    drawn on AVX-512; ONEDNN_MAX_CPU_ISA=AVX2 shows 1e-7 differences). Those configurations get the fp32 bounds
    in their fp64 pass too."""
    return c["cfg_model"].get("activation_fn") == "gelu"


def fp32_positions(c: dict) -> bool:
    """fairseq computes the sinusoidal position table in fp32 (exp, sin and cos of fp32 arguments, then cast to the
    model's dtype), ours too, so an fp64 model starts from fp32 values of the CPU's math library: Intel's MKL under
    MKL_ENABLE_INSTRUCTIONS=AVX2 gives other last bits than AVX-512 (entries <= 1, off by an ulp or two: <= 1.2e-7).
    Carried through these one- or two-layer models with a gain of O(1), log-probs move by that much (5e-9 to 9e-9
    seen): their fp64 bound becomes 1e-6 (a gain of 8), the loss's 2e-7 relative (1e-6 over ~5 nats a token) and
    the gradient norm's 1e-6; both still far below the fp32 bounds."""
    m = c["cfg_model"]
    return not m.get("decoder_learned_pos") and not m.get("no_token_positional_embeddings")


def _log_probs_equal_fairseqs(c):
    tol64 = 1e-5 if fp32_inside(c) else 1e-6 if fp32_positions(c) else 1e-9
    for dtype, tol, sfx in ((torch.float32, 1e-5, "32"), (torch.float64, tol64, "64")):
        model = load(c, dtype).model
        src, tgt = c["src"], c["tgt"]
        with torch.no_grad():
            lp = model.target_log_probs(src, tgt)
            full = model.log_probs(src)
        mask = tgt != 1
        diff = (lp - c["logprobs" + sfx].to(lp.dtype))[mask].abs().max().item()
        assert diff < tol, (c["name"], sfx, diff)
        rows = torch.stack([full[b, t] for b, t in c["full_pos"]])
        diff = (rows - c["full" + sfx].to(rows.dtype)).abs().max().item()
        assert diff < tol, (c["name"], sfx, "full rows", diff)


def _rng_marks(c: dict) -> list:
    """A training step with quant-noise or LayerDrop draws its masks with torch's bernoulli_ / uniform_ kernels: the
    reference holds the draws of the torch that made it (2.13.0), another torch version draws other masks."""
    flags = c["flags"]
    noisy = any(
        f in flags and float(flags[flags.index(f) + 1]) > 0 for f in ("--quant-noise-pq", "--decoder-layerdrop")
    )
    return [pytest.mark.torch_rng] if noisy else []


STEP_CASES = [pytest.param(c, id=c["name"], marks=_rng_marks(c)) for c in CONFIGS]


@KERNELS
@pytest.mark.parametrize("c", STEP_CASES)
def test_one_training_step_equals_fairseqs(c, plain):
    with plain_kernels(plain), fast_linears(CPU):
        _one_training_step_equals_fairseqs(c)


def _one_training_step_equals_fairseqs(c):
    tol64 = (1e-6, 1e-5) if fp32_inside(c) else (2e-7, 1e-6) if fp32_positions(c) else (1e-9, 1e-9)  # see both
    for dtype, tol_loss, tol_norm, sfx in ((torch.float32, 1e-6, 1e-5, "32"), (torch.float64, *tol64, "64")):
        model = load(c, dtype, training=True).model.train()
        torch.manual_seed(c["train_seed"])  # layer drop and quant-noise draw from it, as in fairseq
        loss = model.loss(c["src"], c["tgt"], tail_ignore_quirk=c["criterion"] == "adaptive_loss")
        assert abs(loss.item() - c["loss" + sfx]) <= tol_loss * abs(c["loss" + sfx]), (c["name"], sfx, loss.item())
        if c[f"abs_after_qn{sfx}"] is not None:  # quant-noise rewrote the weights in the forward, as fairseq's does
            after = sum(p.detach().abs().sum().item() for p in model.parameters())
            assert abs(after - c[f"abs_after_qn{sfx}"]) <= 1e-6 * c[f"abs_after_qn{sfx}"], (c["name"], sfx)
        loss.backward()
        params = list(model.parameters())
        for p in params:
            if p.grad is not None:
                p.grad.div_(c["sample_size"])
        gnorm = clip_grad_norm_(params, 0.0).item()
        assert abs(gnorm - c["gnorm" + sfx]) <= tol_norm * c["gnorm" + sfx], (c["name"], sfx, gnorm)


INIT = [c for c in CONFIGS if c["init"] is not None]


@pytest.mark.parametrize("c", INIT, ids=[c["name"] for c in INIT])
def test_a_seed_gives_fairseqs_initial_weights_bit_for_bit(c):
    """The same fairseq-train flags and seed build the same model with the same draws in the same order."""
    args = ["train", str(DATA), *c["flags"], "--seed", str(c["seed"]), "--tokens-per-sample", "64"]
    cfg = train_config(build_parser().parse_args(args))
    model = seeded_model(model_config(cfg, len(DICT)), DICT, cfg.seed)
    theirs = state_dict_from_fairseq(c["init"], model.cfg)
    ours = model.state_dict()
    assert set(theirs) == set(ours), set(theirs) ^ set(ours)
    for k, v in theirs.items():
        assert_same_draws(ours[k], v, f"{c['name']} {k}")


def test_converting_back_to_fairseq_gives_fairseqs_own_state_dict():
    """``convert --to fairseq`` of each fairseq checkpoint: exactly the keys fairseq's model has once loaded
    (``c["keys"]``, recorded by fairseq after its load-time overrides; fairseq loads strictly) and, where nothing
    was pruned at load, fairseq's own tensors bit for bit. An untied adaptive softmax's head is a plain Linear in
    fairseq, without the tied head's ``_float_tensor`` buffer: writing one made fairseq refuse the file."""
    from adaptive_lm.core.fairseq_format import safe_load, to_fairseq_checkpoint

    for c in CONFIGS:
        lm = load(c, torch.float32)
        ours = to_fairseq_checkpoint(lm.model, lm.cfg, lm.tokens_per_sample)["model"]
        assert set(ours) == set(c["keys"]), (c["name"], set(ours) ^ set(c["keys"]))
        if c["load_overrides"]:
            continue
        real = safe_load(DATA / c["name"] / "checkpoint.pt")["model"]
        for k, v in real.items():
            if not k.endswith("_float_tensor"):  # an uninitialised buffer fairseq never reads
                assert torch.equal(ours[k].to(v.dtype), v), (c["name"], k)


def test_configurations_cover_the_option_space():
    """The generated set really spans the options (the generator asserts it too; this keeps the data honest)."""
    flags = [" ".join(c["flags"]) for c in CONFIGS]
    post = [
        c
        for c in CONFIGS
        if c["cfg_model"]["_name"] == "transformer_lm" and not c["cfg_model"]["decoder_normalize_before"]
    ]
    assert len(CONFIGS) >= 40 and len(post) >= 10
    for opt in ("--character-embeddings", "--adaptive-input", "--adaptive-softmax-cutoff", "--tie-adaptive-weights",
                "--scale-attn", "--scale-fc", "--scale-heads", "--scale-resids", "--decoder-layerdrop",
                "--quant-noise-pq", "--checkpoint-activations", "--layernorm-embedding", "--no-scale-embedding",
                "--add-bos-token", "--share-decoder-input-output-embed", "--decoder-learned-pos",
                "--no-token-positional-embeddings", "--no-decoder-final-norm"):  # fmt: skip
        assert sum(opt in f for f in flags) >= 2, opt
    assert sum(bool(c["load_overrides"]) for c in CONFIGS) >= 3  # decoder_layers_to_keep at load
    assert math.isfinite(sum(c["loss32"] for c in CONFIGS))


PRESETS = __import__("json").loads((DATA / "presets.json").read_text())["presets"]


@pytest.mark.parametrize("arch", sorted(PRESETS))
def test_every_preset_resolves_every_field_as_fairseq_train(arch):
    """``fairseq-train --arch ARCH`` alone (tests/parity/make_fairseq_presets.py recorded what fairseq resolves):
    every field of the model config filled, derived and forced the same way, for all 21 transformer_lm archs."""
    from adaptive_lm.core.config import NORMFORMER, parse_cutoff

    ours = model_config(TrainConfig(arch=arch, tokens_per_sample=64, max_update=1), 267_744).to_dict()
    theirs = dict(PRESETS[arch])
    theirs["max_target_positions"] = theirs["max_target_positions"] or theirs["tokens_per_sample"]  # build_model
    for k, v in theirs.items():
        if k in ("_name", "tokens_per_sample") or k in NORMFORMER:
            continue
        mine = ours[k]
        if k.endswith("_cutoff"):
            v, mine = parse_cutoff(v), parse_cutoff(mine)
        assert mine == v or (isinstance(v, float) and mine == pytest.approx(v)), (arch, k, mine, v)
