"""Makes the differential-test reference data in tests/parity/data/ by running real fairseq.

fairseq is never a dependency of the project: this script only runs it, from a separate environment.

Run from the repository root with the Python that has fairseq installed (fairseq-fixed 0.12.3.1, torch CPU):

    ~/fairseq-venv/bin/python tests/parity/make_fairseq_parity.py

It deletes and rewrites tests/parity/data/ from scratch; every random draw is seeded, so two runs write identical
files. What it writes (see tests/parity/README.md):

* dict.txt        a 256-symbol fairseq Dictionary built from wikitext-2 valid.txt (Dictionary.finalize, padding 8)
* cNN/checkpoint.pt  one fairseq checkpoint per configuration, written by fairseq.trainer.Trainer.save_checkpoint
                  from a model built exactly as fairseq-train builds it, then perturbed (nothing at its init value)
* reference.pt    per configuration: flags, seeds, the batch, fairseq's log-probs (float32 and float64), one
                  training step's loss and gradient norm, the initial weights of some, state-dict key names, ...
                  Plain containers and CPU tensors only: torch.load(..., weights_only=True) reads it.
* configs.json    the same configurations in human-readable form, plus what fairseq refused and why.

Configurations: 14 hand-picked ones, then 34 picked greedily (most unmet coverage needs per parameter) from a pool of
candidates drawn with numpy.random.default_rng(DRAW_SEED); a pick that fairseq refuses (or crashes on) is logged and
the next one is taken. Some known-bad combinations are tried once each ("probes").
"""

import contextlib
import io
import json
import logging
import os
import re
import shutil
import sys
import time
import traceback
import warnings
from collections import Counter, OrderedDict
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore")
logging.disable(logging.INFO)  # fairseq logs every build/load/save at INFO

import fairseq  # noqa: E402
from fairseq import checkpoint_utils, options, tasks, utils  # noqa: E402
from fairseq.data import Dictionary  # noqa: E402
from fairseq.dataclass.utils import convert_namespace_to_omegaconf  # noqa: E402
from fairseq.tokenizer import tokenize_line  # noqa: E402
from fairseq.trainer import Trainer  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DATA = "tests/parity/data"  # relative to the repo root: stored as cfg.task.data in every checkpoint
WIKI = REPO.parent / "shared" / "data" / "wikitext-2"
N_RANDOM = 34  # configurations picked from the random pool, on top of the hand-picked ones
DRAW_SEED = 20240531
POOL, SMALL = 600, 6_000  # candidates drawn; parameter budget of a pick once every coverage need is met
OVERHEAD = 4_000  # a checkpoint's fixed size (its cfg, ~16 kB) in float32 parameters, for the greedy pick
DICT_LINES, DICT_NWORDS = 2000, 250  # nwords counts the 4 specials: 246 words + 6 madeupwords = 256 symbols
B, T, SHORT = 3, 20, 13
ROW_STARTS = [0, 20, 52]  # stream offsets of the rows; the short last row crosses a line end (</s> mid-row)
FULL_POS = [[0, 0], [0, -1], [1, 5], [2, 3]]  # -1: last column (T-1, or T with a bos)
DROPOUT0 = {"dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0, "relu_dropout": 0.0,
            "adaptive_softmax_dropout": 0.0}  # fmt: skip
PRESETS = ["transformer_lm_wiki103", "transformer_lm_big", "transformer_lm_gbw", "transformer_lm_gpt",
           "transformer_lm_gpt2_tiny", "transformer_lm_gpt3_small"]  # fmt: skip
ACTS = ["relu", "gelu", "gelu_fast", "gelu_accurate", "tanh", "linear"]
FILTERS = ["[(1, 4), (2, 8), (3, 8)]", "[(1, 4), (2, 4)]", "[(1, 8), (3, 4)]", "[(2, 6), (4, 6)]"]

torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------------------- inputs
def build_dictionary():
    d = Dictionary()
    with open(WIKI / "valid.txt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i >= DICT_LINES:
                break
            for w in tokenize_line(line):
                d.add_symbol(w)
    d.finalize(threshold=-1, nwords=DICT_NWORDS, padding_factor=8)
    assert 250 <= len(d) <= 400, len(d)
    d.save(f"{DATA}/dict.txt")
    return Dictionary.load(f"{DATA}/dict.txt")  # what setup_task will read


def build_batch(d):
    """tgt: B rows of consecutive stream tokens; src: the same positions shifted right by one (row 0 from </s>).

    The stream: the paragraphs of test.txt (not blank, not "= heading =") with at most 36% <unk> under this
    256-symbol dictionary, in file order, each encoded with </s> appended."""
    stream = []
    with open(WIKI / "test.txt", encoding="utf-8") as f:
        for line in f:
            if not line.strip() or line.strip().startswith("="):
                continue
            ids = d.encode_line(line, add_if_not_exist=False, append_eos=True).long().tolist()
            if ids.count(d.unk()) <= 0.36 * len(ids):
                stream += ids
            if len(stream) > ROW_STARTS[-1] + SHORT:
                break
    prev = [d.eos()] + stream
    src = torch.full((B, T), d.pad(), dtype=torch.long)
    tgt = torch.full((B, T), d.pad(), dtype=torch.long)
    for b, start in enumerate(ROW_STARTS):
        n = SHORT if b == B - 1 else T
        tgt[b, :n] = torch.tensor(stream[start : start + n])
        src[b, :n] = torch.tensor(prev[start : start + n])
    assert tgt[-1].eq(d.eos()).any() and src[-1, 1:].eq(d.eos()).any()
    return src, tgt


def with_bos(src, tgt, d):
    """MonolingualDataset with add_bos_token: source = [bos] + source, target = [bos] + target (then padded)."""
    bos = torch.full((src.size(0), 1), d.bos(), dtype=torch.long)
    return torch.cat([bos, src], 1), torch.cat([bos, tgt], 1)


# --------------------------------------------------------------------------------------------------- configurations
def eff_dims(s):
    """decoder_input_dim / decoder_output_dim as fairseq will resolve them."""
    if s["arch"] == "transformer_lm_gpt3_small":
        return s["E"], s["E"]
    default = 512 if s["arch"] == "transformer_lm" else s["E"]
    return s["in_dim"] or default, s["out_dim"] or default


def cutoffs(rng, V, nb, first=(4, 120)):
    c0 = int(rng.integers(*first))
    if nb == 2:
        return [c0]
    return [c0, int(rng.integers(c0 + 4, V - 8))]


def draw(rng, V):
    """One random configuration (a spec dict), fixed up for the constraints fairseq is known to impose.

    Quant-noise block divisibility is left to fairseq on purpose: such draws fail to build and are logged."""
    ch = lambda xs, p=None: xs[int(rng.choice(len(xs), p=p))]  # noqa: E731
    s = {}
    s["arch"] = "transformer_lm" if rng.random() < 0.8 else ch(PRESETS)
    s["pre_ln"] = s["arch"] != "transformer_lm" or rng.random() < 0.5
    s["L"] = ch([1, 2, 3], [0.45, 0.4, 0.15])
    s["E"] = ch([8, 16, 24, 32], [0.5, 0.3, 0.1, 0.1])
    s["H"] = ch([h for h in (1, 2, 4, 8) if s["E"] % h == 0 and s["E"] // h >= 2])
    s["F"] = ch([16, 32, 48])
    s["in_dim"] = s["out_dim"] = None
    if s["arch"] != "transformer_lm" or rng.random() < 0.97:  # unset (512) input dim is hand-picked, see HAND
        s["in_dim"] = s["E"] if rng.random() < 0.7 else ch([d for d in (8, 16, 24, 32) if d != s["E"]])
        s["out_dim"] = s["E"] if rng.random() < 0.7 else ch([d for d in (8, 16, 24, 32) if d != s["E"]])
    s["pos"] = ch(["sin", "learned", "none"], [0.45, 0.35, 0.2])
    s["act"] = ch(ACTS) if rng.random() < 0.9 else None  # None: the preset's (or transformer_lm's relu) default
    s["inp"] = ch(["embed", "adaptive", "char"], [0.45, 0.3, 0.25])
    s["out"] = ch(["full", "shared", "adaptive"], [0.3, 0.25, 0.45])
    s["qn"] = ch([0.0, 0.1, 0.25], [0.55, 0.25, 0.2])
    s["qn_block"] = ch([4, 8])
    s["tie"] = s["inp"] == "adaptive" and s["out"] == "adaptive" and rng.random() < 0.5
    s["tie_proj"] = s["out"] == "adaptive" and rng.random() < 0.4
    s["ai_nb"], s["ai_factor"] = ch([2, 3]), ch([2, 4])
    s["as_nb"], s["as_factor"] = ch([2, 3]), ch([2, 4])
    s["ai_cut"] = cutoffs(rng, V, s["ai_nb"])
    s["as_cut"] = cutoffs(rng, V, s["as_nb"])
    s["as_dropout"] = ch([0.0, 0.1, 0.2])
    s["filters"], s["char_dim"], s["highway"] = ch(FILTERS), ch([2, 4]), ch([0, 1, 2])
    probs = {"no_final_norm": 0.3, "ln_emb": 0.3, "no_scale": 0.3, "bos": 0.3, "scale_attn": 0.3, "scale_fc": 0.3,
             "scale_heads": 0.3, "scale_resids": 0.3, "ckpt": 0.2, "offload": 0.08}  # fmt: skip
    for k, p in probs.items():
        s[k] = bool(rng.random() < p)
    s["layerdrop"] = ch([0.0, 0.25, 0.5], [0.5, 0.25, 0.25])
    s["dropout"] = ch([None, 0.0, 0.1, 0.3])  # None: the preset's default
    s["attn_dropout"], s["act_dropout"] = ch([None, 0.0, 0.1]), ch([None, 0.0, 0.1])
    s["keep"] = ch(["0,2", "1,2", "0,1", "2"]) if s["L"] == 3 and rng.random() < 0.5 else None
    s["seed"], s["train_seed"] = int(rng.integers(1, 1000)), int(rng.integers(1, 1000))
    return fix(s)


def fix(s):
    """Known constraints (each is also tried once as a probe, so its error is on record)."""
    a = s["arch"]
    if a == "transformer_lm_wiki103":  # the preset ties adaptive input and softmax (its cutoffs exceed the vocab)
        s.update(inp="adaptive", out="adaptive", tie=True, in_dim=None, out_dim=None)
    if a == "transformer_lm_gpt3_small":  # forces input/output dims and shared embeddings (so no adaptive softmax)
        s["in_dim"] = s["out_dim"] = None
        s.update(out="shared", inp="embed", tie=False)
    i, o = eff_dims(s)
    if s["out"] == "shared":  # output_projection.weight = embed_tokens.weight: needs an nn.Embedding of width o
        s["inp"] = "embed"
        if i != o:
            s["out_dim"] = s["in_dim"] = o if o != 512 else i
    if s["tie"]:  # same cutoffs/factor, input dim == output dim == embed dim (no project_out with tied weights)
        s.update(as_cut=list(s["ai_cut"]), as_factor=s["ai_factor"], as_nb=s["ai_nb"])
        if a not in ("transformer_lm_wiki103", "transformer_lm_gpt3_small"):
            s["in_dim"] = s["out_dim"] = s["E"]
    i, o = eff_dims(s)
    if s["inp"] == "adaptive":  # every band needs a dimension >= 1
        while i // s["ai_factor"] ** (s["ai_nb"] - 1) < 1:
            s["ai_factor"] = 2
            if i // 2 ** (s["ai_nb"] - 1) < 1:
                s["ai_nb"], s["ai_cut"] = 2, s["ai_cut"][:1]
    if s["out"] == "adaptive" and not s["tie"]:
        while o // s["as_factor"] ** (s["as_nb"] - 1) < 1:
            s["as_factor"] = 2
            if o // 2 ** (s["as_nb"] - 1) < 1:
                s["as_nb"], s["as_cut"] = 2, s["as_cut"][:1]
    if s["tie"]:
        s.update(as_cut=list(s["ai_cut"]), as_factor=s["ai_factor"], as_nb=s["ai_nb"])
    if s["keep"] and s["L"] != 3:
        s["keep"] = None
    return s


def flags_of(s):
    f = ["--arch", s["arch"], "--decoder-layers", str(s["L"]), "--decoder-embed-dim", str(s["E"]),
         "--decoder-ffn-embed-dim", str(s["F"]), "--decoder-attention-heads", str(s["H"])]  # fmt: skip
    if s["arch"] == "transformer_lm" and s["pre_ln"]:
        f += ["--decoder-normalize-before"]
    if s["in_dim"]:
        f += ["--decoder-input-dim", str(s["in_dim"])]
    if s["out_dim"]:
        f += ["--decoder-output-dim", str(s["out_dim"])]
    f += {"sin": [], "learned": ["--decoder-learned-pos"], "none": ["--no-token-positional-embeddings"]}[s["pos"]]
    if s["act"]:
        f += ["--activation-fn", s["act"]]
    if s["inp"] == "adaptive":
        f += ["--adaptive-input", "--adaptive-input-cutoff", ",".join(map(str, s["ai_cut"])),
              "--adaptive-input-factor", str(s["ai_factor"])]  # fmt: skip
    elif s["inp"] == "char":
        f += ["--character-embeddings", "--character-filters", s["filters"], "--character-embedding-dim",
              str(s["char_dim"]), "--char-embedder-highway-layers", str(s["highway"])]  # fmt: skip
    if s["out"] == "shared" and s["arch"] != "transformer_lm_gpt3_small":
        f += ["--share-decoder-input-output-embed"]
    elif s["out"] == "adaptive":
        f += ["--adaptive-softmax-cutoff", ",".join(map(str, s["as_cut"])), "--adaptive-softmax-factor",
              str(s["as_factor"]), "--adaptive-softmax-dropout", str(s["as_dropout"])]  # fmt: skip
        if s["tie"] and s["arch"] != "transformer_lm_wiki103":
            f += ["--tie-adaptive-weights"]
        if s["tie_proj"] and s["arch"] != "transformer_lm_wiki103":
            f += ["--tie-adaptive-proj"]
    for k, flag in [("no_final_norm", "--no-decoder-final-norm"), ("ln_emb", "--layernorm-embedding"),
                    ("no_scale", "--no-scale-embedding"), ("bos", "--add-bos-token"), ("scale_attn", "--scale-attn"),
                    ("scale_fc", "--scale-fc"), ("scale_heads", "--scale-heads"), ("scale_resids", "--scale-resids"),
                    ("ckpt", "--checkpoint-activations"), ("offload", "--offload-activations")]:  # fmt: skip
        if s[k]:
            f += [flag]
    if s["layerdrop"]:
        f += ["--decoder-layerdrop", str(s["layerdrop"])]
    if s["qn"]:
        f += ["--quant-noise-pq", str(s["qn"]), "--quant-noise-pq-block-size", str(s["qn_block"])]
    for k, flag in [("dropout", "--dropout"), ("attn_dropout", "--attention-dropout"),
                    ("act_dropout", "--activation-dropout")]:  # fmt: skip
        if s[k] is not None:
            f += [flag, str(s[k])]
    return f + s.get("extra", [])


def base_spec(**kw):
    s = dict(arch="transformer_lm", pre_ln=False, L=2, E=16, H=2, F=32, in_dim=16, out_dim=16, pos="sin", act=None,
             inp="embed", out="full", qn=0.0, qn_block=8, tie=False, tie_proj=False, ai_nb=3, ai_factor=4, as_nb=3,
             as_factor=4, ai_cut=[20, 100], as_cut=[20, 100], as_dropout=0.0, filters=FILTERS[0], char_dim=4,
             highway=2, no_final_norm=False, ln_emb=False, no_scale=False, bos=False, scale_attn=False, scale_fc=False,
             scale_heads=False, scale_resids=False, ckpt=False, offload=False, layerdrop=0.0, dropout=None,
             attn_dropout=None, act_dropout=None, keep=None, seed=7, train_seed=11)  # fmt: skip
    s.update(kw)
    return s


# Hand-picked configurations (always first, in this order).
HAND = [
    # fairseq's transformer_lm as-is: post-LN, explicit tiny dims, full softmax, relu
    base_spec(),
    # the wiki103 recipe shrunk: tied adaptive input/softmax with tied projections, no final norm
    base_spec(arch="transformer_lm_wiki103", pre_ln=True, in_dim=None, out_dim=None, inp="adaptive", out="adaptive",
              tie=True, tie_proj=True, ai_cut=[20, 100], as_cut=[20, 100], seed=3, train_seed=5),
    # gpt3: learned positions, shared embeddings, gelu, by the preset
    base_spec(arch="transformer_lm_gpt3_small", pre_ln=True, E=8, H=2, F=16, in_dim=None, out_dim=None, out="shared",
              seed=13, train_seed=17),
    # layers_to_keep=0,2 at load, trained with layer drop
    base_spec(pre_ln=True, L=3, E=8, H=2, F=16, in_dim=8, out_dim=8, layerdrop=0.5, keep="0,2", out="shared",
              seed=19, train_seed=23),
    # character CNN input (2 highway layers) and an untied adaptive softmax, post-LN
    base_spec(L=1, E=8, H=2, F=16, in_dim=8, out_dim=8, inp="char", out="adaptive", as_cut=[10, 60], as_factor=2,
              act="tanh", seed=29, train_seed=31),
    # NormFormer with every scale, pre-LN, quant noise (block 4), learned positions
    base_spec(pre_ln=True, E=8, H=4, F=16, in_dim=8, out_dim=8, pos="learned", scale_attn=True, scale_fc=True,
              scale_heads=True, scale_resids=True, qn=0.25, qn_block=4, act="gelu", seed=37, train_seed=41),
    # decoder_input_dim left unset (512): adaptive input with a 4-word first band and factor 8 keeps it small
    base_spec(L=1, E=8, H=2, F=16, in_dim=None, out_dim=8, inp="adaptive", ai_cut=[4, 12], ai_factor=8,
              out="adaptive", as_cut=[30], as_factor=2, seed=43, train_seed=47),
    # both dims unset (512/512): char input (ignores the input dim), project_out to 512, and an adaptive softmax
    # with factor 128 (tail width 4): a full 512 x V softmax would weigh 0.5 MB
    base_spec(L=1, E=8, H=1, F=16, in_dim=None, out_dim=None, inp="char", filters=FILTERS[1], char_dim=2, highway=0,
              out="adaptive", as_cut=[4], as_factor=128, pre_ln=True, seed=53, train_seed=59),
    # adaptive-softmax cutoff chosen so that a target id == cutoff + padding_idx (see README, "tail pad quirk")
    base_spec(pre_ln=True, E=8, H=2, in_dim=8, out_dim=8, out="adaptive", as_cut=[12, "AUTO"], as_factor=2,
              seed=61, train_seed=67),
    # every preset once more, at tiny sizes, with options the random draws may not give them
    base_spec(arch="transformer_lm_big", pre_ln=True, L=1, E=8, H=1, F=16, in_dim=None, out_dim=None,
              act="linear", pos="none", seed=71, train_seed=73),
    base_spec(arch="transformer_lm_gbw", pre_ln=True, L=2, E=8, H=2, F=16, in_dim=None, out_dim=None,
              inp="adaptive", ai_cut=[30], ai_factor=2, out="full", seed=79, train_seed=83),
    base_spec(arch="transformer_lm_gpt", pre_ln=True, L=2, E=8, H=2, F=16, in_dim=None, out_dim=None,
              out="shared", bos=True, offload=True, seed=89, train_seed=97),
    base_spec(arch="transformer_lm_gpt2_tiny", pre_ln=True, L=3, E=8, H=1, F=16, in_dim=None, out_dim=None,
              keep="1,2", ln_emb=True, out="shared", seed=101, train_seed=103),
    base_spec(L=3, E=8, H=4, F=16, in_dim=8, out_dim=8, keep="0,1", layerdrop=0.25, ckpt=True, no_final_norm=True,
              seed=107, train_seed=109),
]  # fmt: skip

# Known-bad or unusual combinations, each tried once; what fairseq does is recorded (configs.json, README).
PROBES = {
    "activation swish": base_spec(act="swish"),
    "activation relu_squared": base_spec(act="relu_squared"),
    "--quant-noise-scalar 0.1": base_spec(extra=["--quant-noise-scalar", "0.1"]),
    "--base-layers 1": base_spec(extra=["--base-layers", "1"]),
    "--tpu": base_spec(extra=["--tpu"]),
    "--decoder-xformers-att-config": base_spec(
        extra=["--decoder-xformers-att-config", '{"name": "scaled_dot_product"}']),
    "wiki103 preset with its default cutoffs 20000,60000": base_spec(
        arch="transformer_lm_wiki103", pre_ln=True, in_dim=None, out_dim=None, tie=True, inp="embed", out="full"),
    "tie-adaptive-weights with quant noise": base_spec(
        inp="adaptive", out="adaptive", tie=True, ai_factor=2, as_factor=2, qn=0.1, qn_block=4),
    "tie-adaptive-weights with embed dim != input/output dim": base_spec(
        E=16, in_dim=8, out_dim=8, inp="adaptive", out="adaptive", tie=True, ai_factor=2, as_factor=2),
    "tie-adaptive-weights with different cutoffs": base_spec(
        inp="adaptive", out="adaptive", tie=True, ai_cut=[20, 100], as_cut=[30, 100]),
    "share-decoder-input-output-embed with adaptive input": base_spec(inp="adaptive", out="shared"),
    "share-decoder-input-output-embed with character embeddings": base_spec(inp="char", out="shared"),
    "share-decoder-input-output-embed with input dim != output dim": base_spec(in_dim=8, out_dim=16, out="shared"),
    "adaptive input band of width 0 (input dim 8, factor 4, 3 bands)": base_spec(
        E=8, in_dim=8, out_dim=8, inp="adaptive", ai_factor=4, ai_nb=3),
    "adaptive softmax tail of width 0 (output dim 8, factor 4, 3 bands)": base_spec(
        E=8, in_dim=8, out_dim=8, out="adaptive", as_factor=4, as_nb=3),
    "adaptive softmax cutoff >= vocab size": base_spec(out="adaptive", as_cut=[20, 300]),
    "decreasing adaptive softmax cutoffs": base_spec(out="adaptive", as_cut=[100, 20]),
    "heads not dividing the embed dim": base_spec(E=16, H=3),
    "share-decoder-input-output-embed with an adaptive softmax": base_spec(
        out="adaptive", extra=["--share-decoder-input-output-embed"]),
    "transformer_lm_gpt3_small (shares embeddings) with an adaptive softmax": base_spec(
        arch="transformer_lm_gpt3_small", pre_ln=True, in_dim=None, out_dim=None, out="adaptive"),
    "tie-adaptive-weights with different factors": base_spec(
        inp="adaptive", out="adaptive", tie=True, ai_factor=2, as_factor=4),
    "adaptive_loss without an adaptive softmax": base_spec(crit="adaptive_loss"),
    "adaptive softmax with --criterion cross_entropy": base_spec(out="adaptive", crit="cross_entropy"),
    "adaptive_loss with the default --ddp-backend (pytorch_ddp)": base_spec(out="adaptive", ddp=False),
    "quant noise with a block size (32) not dividing the in-features (16)": base_spec(F=48, qn=0.1, qn_block=32),
}  # fmt: skip


def summary(s):
    i, o = eff_dims(s)
    ln = "pre-LN" if s["pre_ln"] else "post-LN"
    inp = {"embed": "embed", "adaptive": f"adaptive-input{s['ai_cut']}/f{s['ai_factor']}",
           "char": f"char-CNN(hw{s['highway']})"}[s["inp"]]  # fmt: skip
    if s["out"] == "adaptive":
        out = f"adaptive-softmax{s['as_cut']}/f{s['as_factor']}" + (" tied" if s["tie"] else " untied")
        out += " tie-proj" if (s["tie_proj"] or s["arch"] == "transformer_lm_wiki103") and s["tie"] else ""
    else:
        out = {"full": "full-softmax", "shared": "shared-embed-softmax"}[s["out"]]
    on = [k for k in ("no_final_norm", "ln_emb", "no_scale", "bos", "scale_attn", "scale_fc", "scale_heads",
                      "scale_resids", "ckpt", "offload") if s[k]]  # fmt: skip
    if s["layerdrop"]:
        on.append(f"layerdrop{s['layerdrop']}")
    if s["qn"]:
        on.append(f"qn{s['qn']}/b{s['qn_block']}")
    if s["keep"]:
        on.append(f"keep[{s['keep']}]")
    return (f"{s['arch']} {ln} L{s['L']} E{s['E']} H{s['H']} F{s['F']} in{i} out{o} pos:{s['pos']} "
            f"act:{s['act'] or 'default'} | in: {inp} | out: {out} | {' '.join(on) or '-'}")  # fmt: skip


# -------------------------------------------------------------------------------------------------------- pipeline
class Failure(Exception):
    """stage, exception type, first line of its message, and where it was raised (file:line `code`)."""

    def __init__(self, stage, err):
        msg = " ".join(x.strip() for x in str(err).strip().splitlines()[:2])[:300]
        msg = re.sub(r" at 0x[0-9a-f]+", "", msg)
        msg = re.sub(r"^.*?: error: ", "argparse: ", msg)  # parser.error() prefixes the program name
        where = ""
        tb = traceback.extract_tb(err.__traceback__) if err.__traceback__ else []
        if tb and not isinstance(err, SystemExit):
            fr = tb[-1]
            where = f"{re.sub(r'^.*site-packages/', '', fr.filename)}:{fr.lineno} `{fr.line}`"
        self.stage, self.kind, self.msg, self.where = stage, type(err).__name__, msg, where
        super().__init__(self.text())

    def text(self):
        return f"{self.stage}: {self.kind}: {self.msg}" + (f" [{self.where}]" if self.where else "")


@contextlib.contextmanager
def float64_softmax():
    """fairseq.utils.(log_)softmax always compute in float32 (dtype=torch.float32); keep float64 in the float64 pass."""
    saved = utils.log_softmax, utils.softmax
    utils.log_softmax = lambda x, dim, onnx_trace=False: torch.log_softmax(x, dim=dim)
    utils.softmax = lambda x, dim, onnx_trace=False: torch.softmax(x, dim=dim)
    try:
        yield
    finally:
        utils.log_softmax, utils.softmax = saved


def perturb(model, gen):
    """p += 0.1*std(p)*N(0,1); constant tensors (norm weights/biases, NormFormer scales, zero biases) += 0.1*N(0,1)."""
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied parameters are listed once
            if p.numel() == 0:
                continue
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            std = float(p.std()) if p.numel() > 1 else 0.0
            is_scale = p.dim() == 1 and ("norm" in name or "_ln" in name or name.endswith(("c_attn", "w_resid")))
            if std > 0 and not is_scale:
                p.add_(0.1 * std * noise)
            else:
                p.add_(0.1 * noise)


def load(path, overrides):
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([path], arg_overrides=dict(overrides))
    return models[0], cfg, task


def abs_sum(model):
    return float(sum(p.detach().double().abs().sum() for p in model.parameters()))


def run(s, name, src0, tgt0, d, keep_files=True):
    """Everything for one configuration; raises Failure(stage, error) when fairseq refuses or crashes."""
    stage = "parse"
    try:
        flags = flags_of(s)
        adaptive = s["out"] == "adaptive"
        crit = s.get("crit") or ("adaptive_loss" if adaptive else "cross_entropy")
        extra = ["--ddp-backend", "legacy_ddp"] if crit == "adaptive_loss" and s.get("ddp", True) else []
        argv = [DATA, "--task", "language_modeling", *flags, "--seed", str(s["seed"]), "--cpu",
                "--tokens-per-sample", "64", "--criterion", crit, *extra, "--optimizer", "nag", "--lr", "0.1",
                "--max-update", "1"]  # fmt: skip
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                args = options.parse_args_and_arch(options.get_training_parser(), argv)
        except SystemExit:
            raise SystemExit(err.getvalue().strip().splitlines()[-1]) from None
        cfg = convert_namespace_to_omegaconf(args)

        stage = "build"  # as fairseq_cli/train.py: seed numpy and torch, set up the task, build model and criterion
        np.random.seed(cfg.common.seed)
        utils.set_torch_seed(cfg.common.seed)
        task = tasks.setup_task(cfg.task)
        model = task.build_model(cfg.model)
        stage = "criterion"
        criterion = task.build_criterion(cfg.criterion)
        init, seen = OrderedDict(), {}
        for k, v in model.state_dict().items():
            if v.is_floating_point() and not k.endswith(("_float_tensor", ".version")) and k != "version":
                key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
                seen.setdefault(key, v.detach().clone())  # tied tensors: one clone, saved once by torch.save
                init[k] = seen[key]
        n_params = sum(p.numel() for p in model.parameters())

        stage = "save"
        perturb(model, torch.Generator().manual_seed(100_000 + s["seed"]))
        for k, buf in model.named_buffers():  # dtype markers made by torch.FloatTensor(1): uninitialised memory,
            if k.endswith("_float_tensor"):  # zeroed so that two runs write byte-identical checkpoints
                buf.zero_()
        trainer = Trainer(cfg, task, model, criterion)
        trainer.cumulative_training_time = lambda: 0.0  # wall-clock time would make the files differ run to run
        path = f"{DATA}/{name}/checkpoint.pt"
        os.makedirs(os.path.dirname(path), exist_ok=True)
        trainer.consolidate_optimizer()  # as checkpoint_utils.save_checkpoint does before calling save_checkpoint
        trainer.save_checkpoint(path, {"train_iterator": {"epoch": 1}})
        ck = torch.load(path, weights_only=True)
        cfg_model = ck["cfg"]["model"]

        src, tgt = with_bos(src0, tgt0, d) if s["bos"] else (src0.clone(), tgt0.clone())
        pad = tgt.eq(d.pad())
        lengths = src.ne(d.pad()).sum(1)
        ovr = {"decoder_layers_to_keep": s["keep"]} if s["keep"] else {}
        pos = [[b, t if t >= 0 else src.size(1) + t] for b, t in FULL_POS]
        out = {}
        for bits in (32, 64):
            stage = f"eval{bits}"
            model, _, _ = load(path, ovr)
            if bits == 64:
                model.double()
            model.eval()
            ctx = float64_softmax() if bits == 64 else contextlib.nullcontext()
            with torch.no_grad(), ctx:
                net_output = model(src)
                lprobs = model.get_normalized_probs(net_output, log_probs=True, sample=None)
            assert lprobs.shape == (*src.shape, len(d)), lprobs.shape
            want = torch.float32 if bits == 32 else torch.float64
            assert lprobs.dtype == want, lprobs.dtype
            out[f"logprobs{bits}"] = lprobs.gather(-1, tgt[..., None]).squeeze(-1).masked_fill(pad, 0.0).clone()
            out[f"full{bits}"] = torch.stack([lprobs[b, t].clone() for b, t in pos])
            if bits == 32:
                keys = sorted(model.state_dict().keys())
            if bits == 64:  # what fairseq's own float32-casting log_softmax gives, for the record
                with torch.no_grad():
                    fs = model.get_normalized_probs(net_output, log_probs=True, sample=None)
                out["fs_cast_maxdiff"] = float((fs.double() - lprobs).abs().max())

        ignored = 0  # adaptive_loss shifts tail targets by the band start: id == start + pad (1) is then ignored
        if crit == "adaptive_loss" and cfg_model.get("adaptive_softmax_cutoff"):
            starts = [int(c) for c in str(cfg_model["adaptive_softmax_cutoff"]).split(",")]
            ignored = int(sum(int(tgt.eq(c + d.pad()).sum()) for c in starts))
        out["adaptive_loss_ignored"] = ignored
        sample = {"net_input": {"src_tokens": src, "src_lengths": lengths}, "target": tgt,
                  "ntokens": int((~pad).sum())}  # fmt: skip
        for bits, patched in ((32, False), (64, True), (64, False)):
            stage = f"train{bits}"
            model, lcfg, ltask = load(path, {**ovr, **DROPOUT0})
            if bits == 64:
                model.double()
            lcrit = ltask.build_criterion(lcfg.criterion)
            model.train()
            before = abs_sum(model)
            torch.manual_seed(s["train_seed"])
            with float64_softmax() if patched else contextlib.nullcontext():
                loss, sample_size, _ = lcrit(model, sample)
            after = abs_sum(model)
            loss.backward()
            for p in model.parameters():  # trainer: optimizer.multiply_grads(world_size / sample_size)
                if p.grad is not None:
                    p.grad.mul_(1.0 / sample_size)
            grads = [p.grad.double() for p in model.parameters() if p.grad is not None]
            exact = float(torch.stack([g.norm() for g in grads]).norm())  # clip_grad_norm_'s formula, in float64
            if bits == 32:
                gnorm = float(utils.clip_grad_norm_(model.parameters(), max_norm=0))
                assert abs(gnorm - exact) <= 1e-5 * exact, (gnorm, exact)
            else:  # clip_grad_norm_ asks torch.norm(g, dtype=float32), which torch refuses for float64 gradients
                gnorm = exact
            tag = "" if (bits == 32 or patched) else "_fs"
            out[f"loss{bits}{tag}"], out[f"gnorm{bits}{tag}"] = float(loss), gnorm
            out["sample_size"] = int(sample_size)
            if tag == "":
                out[f"abs_before_qn{bits}"] = before if s["qn"] else None
                out[f"abs_after_qn{bits}"] = after if s["qn"] else None
    except Failure:
        raise
    except BaseException as e:  # noqa: BLE001 - fairseq raises anything, including SystemExit
        if isinstance(e, KeyboardInterrupt):
            raise
        raise Failure(stage, e) from None
    finally:
        if not keep_files:
            shutil.rmtree(f"{DATA}/{name}", ignore_errors=True)

    rec = {"name": name, "flags": flags, "argv": argv[1:], "seed": s["seed"], "perturb_seed": 100_000 + s["seed"],
           "load_overrides": ovr, "train_seed": s["train_seed"],
           "criterion": crit, "src": src, "tgt": tgt, "full_pos": pos}  # fmt: skip
    for k in ("logprobs32", "logprobs64", "full32", "full64", "loss32", "loss64", "loss64_fs", "sample_size",
              "adaptive_loss_ignored", "gnorm32", "gnorm64", "gnorm64_fs", "abs_before_qn32", "abs_after_qn32",
              "abs_before_qn64", "abs_after_qn64"):  # fmt: skip
        rec[k] = out[k]
    rec.update({"init": init, "keys": keys, "cfg_model": cfg_model, "n_params": int(n_params)})
    return rec, out["fs_cast_maxdiff"]


BOOLS = ("no_final_norm", "ln_emb", "no_scale", "bos", "scale_attn", "scale_fc", "scale_heads", "scale_resids", "ckpt",
         "offload")  # fmt: skip


def features(s):
    """Option -> value pairs used for the coverage table, the greedy pick and its checks."""
    i, o = eff_dims(s)
    f = {"arch": s["arch"], "ln": "pre" if s["pre_ln"] else "post", "layers": s["L"], "embed_dim": s["E"],
         "ffn": s["F"], "input_dim": "512 (unset)" if i == 512 else ("= embed" if i == s["E"] else "!= embed"),
         "output_dim": "512 (unset)" if o == 512 else ("= embed" if o == s["E"] else "!= embed"), "pos": s["pos"],
         "act": s["act"] or "(default)", "input": s["inp"], "output": s["out"] if s["out"] != "adaptive" else
         ("adaptive tied" if s["tie"] else "adaptive untied")}  # fmt: skip
    if s["inp"] == "adaptive":
        f["ai_bands"], f["ai_factor"] = len(s["ai_cut"]) + 1, s["ai_factor"]
    if s["inp"] == "char":
        f["char_dim"], f["highway"] = s["char_dim"], s["highway"]
    if s["out"] == "adaptive":
        f["as_bands"], f["as_factor"], f["as_dropout"] = len(s["as_cut"]) + 1, s["as_factor"], s["as_dropout"]
        f["tie_proj"] = bool(s["tie"] and (s["tie_proj"] or s["arch"] == "transformer_lm_wiki103"))
    for k in BOOLS:
        f[k] = bool(s[k] or (k == "ckpt" and s["offload"]))
    f["no_final_norm"] = bool(s["no_final_norm"] or s["arch"] in ("transformer_lm_wiki103", "transformer_lm_gbw"))
    f["layerdrop"], f["quant_noise"] = s["layerdrop"], s["qn"]
    if s["qn"]:
        f["qn_block"] = s["qn_block"]
    f["layers_to_keep"] = s["keep"] or "-"
    return f


# (option, value) pairs that must each appear >= WANT times and with both pre-LN and post-LN
NEEDS = ([("act", a) for a in ACTS] + [("pos", p) for p in ("sin", "learned", "none")] + [("layers", n) for n in
         (1, 2, 3)] + [("embed_dim", e) for e in (8, 16, 24, 32)] + [("ffn", n) for n in (16, 32, 48)] +
         [("input", x) for x in ("embed", "adaptive", "char")] + [("input_dim", "!= embed"), ("output_dim", "!= embed")]
         + [("output", x) for x in ("full", "shared", "adaptive tied", "adaptive untied")] +
         [("ai_bands", 2), ("ai_bands", 3), ("ai_factor", 2), ("ai_factor", 4), ("char_dim", 2), ("char_dim", 4),
          ("highway", 0), ("highway", 1), ("highway", 2), ("as_bands", 2), ("as_bands", 3), ("as_factor", 2),
          ("as_factor", 4), ("as_dropout", 0.0), ("as_dropout", 0.1), ("as_dropout", 0.2), ("tie_proj", True)] +
         [(k, True) for k in BOOLS if k != "offload"] + [("layerdrop", x) for x in (0.0, 0.25, 0.5)] +
         [("quant_noise", x) for x in (0.0, 0.1, 0.25)] + [("qn_block", 4), ("qn_block", 8)])  # fmt: skip
WANT = 3


def coverage(specs):
    table, both = {}, {}
    for s in specs:
        for k, v in features(s).items():
            table.setdefault(k, Counter())[v] += 1
            both.setdefault((k, v), set()).add(s["pre_ln"])
    return table, both


def gain(s, table, both):
    """Weight of the still-unmet needs this candidate would meet (rarer values and a missing LN kind weigh more)."""
    g = 0
    for k, v in features(s).items():
        if (k, v) in NEEDS:
            n = table.get(k, {}).get(v, 0)
            g += 2 * (n < WANT) + 2 * (n < 2) + 3 * (s["pre_ln"] not in both.get((k, v), ()))
    if s["arch"] in PRESETS and table["arch"][s["arch"]] < 2:
        g += 1
    if s["keep"] and sum(n for v, n in table["layers_to_keep"].items() if v != "-") < 5:
        g += 1
    return g


def est_params(s, V=256):
    """Rough parameter count (the checkpoint's size beyond its fixed part), for the greedy pick."""
    i, o = eff_dims(s)
    E, n = s["E"], 0
    if s["inp"] == "embed":
        n += V * i + (E * i if i != E else 0)
    elif s["inp"] == "adaptive":
        edges = [0] + s["ai_cut"] + [V]
        n += sum((edges[b + 1] - edges[b] + E) * int(i // s["ai_factor"] ** b) for b in range(len(edges) - 1))
    else:
        n += 2000
    n += s["L"] * (4 * E * E + 2 * E * s["F"]) + (66 * E if s["pos"] == "learned" else 0)
    if s["out"] == "full":
        n += V * o
    if s["out"] != "shared" and o != E and not s["tie"]:
        n += E * o
    if s["out"] == "adaptive" and not s["tie"]:
        edges = s["as_cut"] + [V]
        n += o * (edges[0] + len(edges) - 1)
        n += sum((o + edges[b + 1] - edges[b]) * int(o // s["as_factor"] ** (b + 1)) for b in range(len(edges) - 1))
    return n


def check_coverage(specs):
    table, both = coverage(specs)
    problems = [f"preset {a} missing" for a in PRESETS if table["arch"][a] < 1]
    for k, v in NEEDS:
        if table.get(k, {}).get(v, 0) < 2:
            problems.append(f"{k}={v} appears {table.get(k, {}).get(v, 0)} times")
        elif both[(k, v)] != {True, False}:
            problems.append(f"{k}={v} not seen with both pre-LN and post-LN")
    if table["offload"][True] < 1:
        problems.append("offload missing")
    if sum(n for v, n in table["layers_to_keep"].items() if v != "-") < 3:
        problems.append("fewer than 3 layers_to_keep configurations")
    if table["input_dim"]["512 (unset)"] < 1 or table["output_dim"]["512 (unset)"] < 1:
        problems.append("no unset (512) input/output dim")
    return problems


def intern_strings(x):
    if isinstance(x, str):
        return sys.intern(x)
    if isinstance(x, dict):
        return type(x)((intern_strings(k), intern_strings(v)) for k, v in x.items())
    if isinstance(x, list):
        return [intern_strings(v) for v in x]
    return x


def choose_init(recs, specs):
    """>= 10 configurations whose initial weights are kept: cover the listed features, smallest first."""
    want = [lambda s: s["inp"] == "char", lambda s: any(s[k] for k in ("scale_attn", "scale_fc", "scale_heads",
            "scale_resids")), lambda s: not s["pre_ln"], lambda s: s["out"] == "adaptive" and not s["tie"],
            lambda s: s["qn"] > 0, lambda s: s["pos"] == "learned", lambda s: s["arch"] == "transformer_lm_gpt3_small",
            lambda s: s["inp"] == "adaptive", lambda s: s["tie"], lambda s: s["out"] == "shared",
            lambda s: s["arch"] == "transformer_lm_wiki103", lambda s: s["pos"] == "sin",
            lambda s: s["ln_emb"], lambda s: s["keep"] is not None, lambda s: s["out"] == "full"]  # fmt: skip
    order = sorted(range(len(recs)), key=lambda i: (recs[i]["n_params"], i))
    chosen = []
    for w in want:
        if any(w(specs[i]) for i in chosen):
            continue
        for i in order:
            if w(specs[i]) and i not in chosen:
                chosen.append(i)
                break
    for i in order:
        if len(chosen) >= 10:
            break
        if i not in chosen:
            chosen.append(i)
    return set(chosen)


def resolve_auto(s, tgt):
    """as_cut [c, "AUTO"]: the smallest second cutoff > c + 4 such that some target id == cutoff + 1 (= pad)."""
    if "AUTO" in s["as_cut"]:
        ids = sorted({int(t) for t in tgt.flatten()} - {1})
        c = next(i - 1 for i in ids if i - 1 > s["as_cut"][0] + 4)
        s["as_cut"] = [s["as_cut"][0], c]
    return s


def main():
    t0 = time.time()
    os.chdir(REPO)
    shutil.rmtree(DATA, ignore_errors=True)
    os.makedirs(DATA)
    d = build_dictionary()
    V = len(d)
    src0, tgt0 = build_batch(d)
    print(f"dictionary: {V} symbols; batch {tuple(tgt0.shape)}; fairseq {fairseq.__version__}; "
          f"torch {torch.__version__}")  # fmt: skip

    recs, specs, refused, casts = [], [], [], []

    def attempt(s, origin):
        name = f"c{len(recs):02d}"
        try:
            rec, cast = run(s, name, src0, tgt0, d)
        except Failure as f:
            refused.append({"origin": origin, "summary": summary(s), "flags": flags_of(s), "stage": f.stage,
                            "error": f.text()})  # fmt: skip
            print(f"  refused ({origin}): {f}")
            shutil.rmtree(f"{DATA}/{name}", ignore_errors=True)
            return False
        rec["origin"], rec["summary"] = origin, summary(s)  # configs.json only
        recs.append(rec)
        specs.append(s)
        casts.append(cast)
        print(f"{name} [{time.time() - t0:6.1f}s] {rec['summary']}")
        return True

    for k, s in enumerate(HAND):
        assert attempt(resolve_auto(dict(s), tgt0), f"hand-picked {k}"), "a hand-picked configuration failed"
    rng = np.random.default_rng(DRAW_SEED)
    pool = [draw(rng, V) for _ in range(POOL)]
    left = list(range(POOL))
    while len(recs) < len(HAND) + N_RANDOM:
        table, both = coverage(specs)
        gains = {j: gain(pool[j], table, both) for j in left}
        best = max(gains.values())
        if best > 0:  # weighted set cover: most unmet needs met per parameter (plus the checkpoint's fixed cost)
            j = min(left, key=lambda j: (-gains[j] / (est_params(pool[j]) + OVERHEAD), j))
        else:  # every need met: the next candidates in draw order, if small
            j = next(j for j in left if est_params(pool[j]) <= SMALL)
        left.remove(j)
        attempt(pool[j], f"pool draw {j}")

    problems = check_coverage(specs)
    assert not problems, "coverage: " + "; ".join(problems)

    probes = []
    for label, s in PROBES.items():
        try:
            run(dict(s), "probe", src0, tgt0, d, keep_files=False)
            probes.append({"probe": label, "flags": flags_of(s), "result": "accepted (built, saved, loaded, scored, "
                           "trained without error)"})  # fmt: skip
        except Failure as f:
            probes.append({"probe": label, "flags": flags_of(s), "result": f.text()})
        print(f"probe {label}: {probes[-1]['result']}")

    keep = choose_init(recs, specs)
    for i, r in enumerate(recs):
        if i not in keep:
            r["init"] = None
    for r in recs:
        del r["n_params"]

    table, _ = coverage(specs)
    js = {"fairseq_version": fairseq.__version__, "torch_version": str(torch.__version__), "dictionary_size": V,
          "argv": f"fairseq-train {DATA} --task language_modeling FLAGS --seed SEED --cpu --tokens-per-sample 64 "
                  "--criterion CRITERION [--ddp-backend legacy_ddp: with adaptive_loss] --optimizer nag --lr 0.1 "
                  "--max-update 1",
          "configs": [{"name": r["name"], "origin": r["origin"], "summary": r["summary"], "flags": r["flags"],
                       "seed": r["seed"], "train_seed": r["train_seed"],
                       "load_overrides": r["load_overrides"], "criterion": r["criterion"],
                       "adaptive_loss_ignored": r["adaptive_loss_ignored"],
                       "init_weights_stored": r["init"] is not None} for r in recs],
          "coverage": {k: {str(v): n for v, n in sorted(c.items(), key=lambda x: str(x[0]))} for k, c in table.items()},
          "refused_draws": refused, "probes": probes}  # fmt: skip
    with open(f"{DATA}/configs.json", "w") as f:  # one line per configuration, refusal and probe
        f.write(
            "{\n"
            + ",\n".join(
                f"{json.dumps(k)}: "
                + (
                    json.dumps(v)
                    if not isinstance(v, list)
                    else "[\n  " + ",\n  ".join(json.dumps(x) for x in v) + "\n ]"
                )
                for k, v in js.items()
            )
            + "\n}\n"
        )
    json.load(open(f"{DATA}/configs.json"))

    for r in recs:
        for k in ("argv", "origin", "summary"):  # in configs.json
            del r[k]
    recs = intern_strings(recs)  # repeated key names are then pickled once (same content, smaller file)
    ref = {"dict": "dict.txt", "configs": recs, "fairseq_version": fairseq.__version__,
           "torch_version": str(torch.__version__), "train_overrides": DROPOUT0}  # fmt: skip
    torch.save(ref, f"{DATA}/reference.pt")
    torch.load(f"{DATA}/reference.pt", weights_only=True)

    qn_all = [r for r in recs if r["abs_after_qn32"] is not None]
    qn_changed = [r for r in qn_all if r["abs_after_qn32"] != r["abs_before_qn32"]]
    print(f"\n{len(recs)} configurations ({len(HAND)} hand-picked, {len(recs) - len(HAND)} from the pool, "
          f"{len(refused)} refused draws), init weights kept for {len(keep)}")  # fmt: skip
    print(f"quant noise rewrote the weights in place during the training forward in {len(qn_changed)}/{len(qn_all)}")
    print(f"max |fairseq float32-cast log_softmax - float64| over configs: {max(casts):.3g}")
    for k, c in table.items():
        print(f"  {k:15s} " + ", ".join(f"{v}: {n}" for v, n in sorted(c.items(), key=lambda x: str(x[0]))))
    print(f"done in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
