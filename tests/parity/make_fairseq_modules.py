"""Makes tests/parity/modules/reference.pt: fairseq's own ``AdaptiveInput`` / ``AdaptiveSoftmax`` modules (and the
``adaptive_loss`` criterion's arithmetic) over generated configurations, for tests/test_adaptive_modules.py.

fairseq is never a dependency of the project: this script only runs it, from a separate environment. From the
repository root, with the Python that has fairseq (fairseq-fixed 0.12.3.1, torch 2.13.0 CPU):

    ~/fairseq-venv/bin/python tests/parity/make_fairseq_modules.py

A few seconds on one thread. It reads nothing but fairseq; every draw is seeded, so two runs write identical
files. The configurations are drawn with ``numpy.random.default_rng(DRAW_SEED)`` over what fairseq's modules accept
(README.md in this folder, "Module-level reference"), plus hand-picked edge cases first.
"""

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore")
logging.disable(logging.INFO)

import fairseq  # noqa: E402
from fairseq.modules import AdaptiveInput, AdaptiveSoftmax  # noqa: E402

OUT = Path(__file__).resolve().parent / "modules"
DRAW_SEED = 20240917
N_RANDOM = 24
FACTORS = (1.0, 1.5, 2.0, 2.5, 3.0, 4.0)  # 1.5, 2.5, 3.0: dims // factor**i are float floor divisions
SHAPES = ((1, 1), (2, 5), (3, 7))

# hand-picked edge cases: kind, V, cutoff, factor, dims, pad, tie_proj, dropout, q_noise
HAND = [
    dict(kind="softmax", V=40, cutoff=[40], factor=4.0, d=8, pad=1, dropout=0.0),  # cutoff == V: head only
    dict(kind="softmax", V=40, cutoff=[10, 40], factor=2.0, d=8, pad=1, dropout=0.1),  # last cutoff == V
    dict(kind="softmax", V=48, cutoff=[4, 8, 12, 20, 28, 36, 44], factor=1.5, d=24, pad=1, dropout=0.2),  # many
    dict(kind="softmax", V=30, cutoff=[6], factor=2.5, d=13, pad=1, dropout=0.0),  # one cutoff
    dict(kind="input", V=40, cutoff=[40], factor=4.0, idim=8, odim=6, pad=1),
    dict(kind="input", V=48, cutoff=[4, 8, 12, 20, 28, 36, 44], factor=1.5, idim=24, odim=9, pad=0),
    dict(kind="input", V=32, cutoff=[8, 20], factor=2.0, idim=16, odim=8, pad=1, q_noise=0.25, qn_block=4),
    dict(kind="tied", V=40, cutoff=[10, 25], factor=2.0, idim=16, odim=8, pad=1, tie_proj=True, dropout=0.1),
    dict(kind="softmax", V=40, cutoff=[10, 25], factor=2.0, d=8, pad=0, dropout=0.0),  # pad 0: quirk ids = cutoffs
    dict(kind="tied", V=40, cutoff=[10, 25], factor=2.0, idim=16, odim=8, pad=1, tie_proj=False, dropout=0.0),
    dict(kind="tied", V=40, cutoff=[10, 25], factor=2.0, idim=8, odim=12, pad=2, tie_proj=True, dropout=0.0),
    # tied: the softmax's own factor is not used (the tails are the adaptive input's bands)
    dict(
        kind="tied",
        V=40,
        cutoff=[10, 25],
        factor=2.0,
        sm_factor=4.0,
        idim=8,
        odim=8,
        pad=1,
        tie_proj=False,
        dropout=0.1,
    ),  # fmt: skip
    dict(kind="tied", V=40, cutoff=[10, 40], factor=3.0, idim=12, odim=12, pad=1, tie_proj=True, dropout=0.2),
]


def draw(rng: np.random.Generator) -> dict:
    kind = ["input", "softmax", "tied"][rng.integers(3)]
    V = int(rng.integers(8, 49))
    n = int(rng.integers(1, 5))
    cut = sorted(set(int(c) for c in rng.choice(np.arange(1, V + 1), size=n, replace=False)))
    if rng.random() < 0.25 and cut[-1] != V:
        cut.append(V)
    c = dict(kind=kind, V=V, cutoff=cut, factor=float(rng.choice(FACTORS)), pad=int(rng.integers(0, 3)))
    c["idim"], c["odim"] = int(rng.integers(2, 17)), int(rng.integers(2, 17))
    c["d"] = c["odim"] if kind == "tied" else int(rng.integers(2, 17))
    c["tie_proj"] = bool(rng.random() < 0.5)
    c["dropout"] = float(rng.choice([0.0, 0.1, 0.3]))
    if kind == "input" and rng.random() < 0.3:
        c["q_noise"], c["qn_block"] = 0.25, 1
    unused = {"input": ("d", "tie_proj", "dropout"), "softmax": ("idim", "odim", "tie_proj"), "tied": ()}[kind]
    return {k: v for k, v in c.items() if k not in unused}


def bands(c: dict) -> list[int]:
    cut = c["cutoff"] if c["cutoff"][-1] == c["V"] else [*c["cutoff"], c["V"]]
    return [e - s for s, e in zip([0, *cut[:-1]], cut)]


def accepted(c: dict) -> bool:
    """What both fairseq's modules and ours build: fairseq's init zeroes row ``pad`` in every band (an IndexError
    where a band is smaller); every adaptive-input band and every untied tail at least one wide (fairseq divides by
    zero on a 0-wide band and builds a 0-wide tail, which we refuse)."""
    sizes = bands(c)
    if c["kind"] != "softmax" and (c["pad"] >= min(sizes) or int(c["idim"] // c["factor"] ** (len(sizes) - 1)) < 1):
        return False
    return c["kind"] != "softmax" or int(c["d"] // c["factor"] ** (len(sizes) - 1)) >= 1


def build(c: dict):
    ai = sm = None
    if c["kind"] in ("input", "tied"):
        ai = AdaptiveInput(c["V"], c["pad"], c["idim"], c["factor"], c["odim"], list(c["cutoff"]),
                           c.get("q_noise", 0.0), c.get("qn_block", 8))  # fmt: skip
    if c["kind"] in ("softmax", "tied"):
        tied = ai if c["kind"] == "tied" else None
        sm = AdaptiveSoftmax(c["V"], c["d"], list(c["cutoff"]), c["dropout"], c.get("sm_factor", c["factor"]),
                             adaptive_inputs=tied, tie_proj=c.get("tie_proj", False))  # fmt: skip
    return ai, sm


def params(ai, sm) -> dict:
    """Every parameter under every fairseq name (tied ones under each), as ``state_dict`` names them."""
    out = {}
    for prefix, m in (("ai.", ai), ("sm.", sm)):
        if m is not None:
            out.update({prefix + k: p for k, p in m.named_parameters(remove_duplicate=False)})
    return out


def adaptive_loss(sm, hidden, target, pad):
    """fairseq/criterions/adaptive_loss.py's sum (reduce=True) for one batch."""
    logits, tgt = sm(hidden, target.view(-1))
    loss = hidden.new_zeros(())
    for i in range(len(tgt)):
        if tgt[i] is not None:
            loss = loss + F.cross_entropy(logits[i], tgt[i], ignore_index=pad, reduction="sum")
    return loss


def batch(c: dict, g: torch.Generator, shape) -> dict:
    V, pad = c["V"], c["pad"]
    tokens = torch.randint(0, V, shape, generator=g)
    target = torch.randint(0, V, shape, generator=g)
    flat_t, flat_y = tokens.view(-1), target.view(-1)
    edges = [x for s in c["cutoff"] for x in (s - 1, s) if 0 <= x < V] + [V - 1, pad]
    for j, e in enumerate(edges[: flat_t.numel()]):  # band edges and padding among the inputs
        flat_t[-1 - j] = e
    quirk = [s + pad for s in c["cutoff"] if s + pad < V]  # ids whose in-band index is pad: adaptive_loss drops them
    for j, e in enumerate([pad, *quirk][: flat_y.numel()]):
        flat_y[j] = e
    d = c["odim"] if c["kind"] == "input" else c["d"]
    x = torch.randn(*shape, d, generator=g)
    return dict(tokens=tokens, target=target, x=x, w=torch.randn(x.shape, generator=g))  # w: see reference()


def reference(c: dict, seed: int) -> dict:
    torch.manual_seed(seed)
    ai, sm = build(c)
    r = dict(config=c, seed=seed, after_init=torch.rand(4))
    r["init"] = {k: p.detach().clone() for k, p in params(ai, sm).items()}
    g = torch.Generator().manual_seed(seed + 1)
    r["batch"] = b = batch(c, g, SHAPES[seed % len(SHAPES)])
    r["outputs"] = {}
    for dtype, sfx in ((torch.float32, "32"), (torch.float64, "64")):
        torch.manual_seed(seed)
        ai, sm = build(c)
        for m in (ai, sm):
            if m is not None:
                m.to(dtype).eval()
        r["outputs"][sfx] = out = {}
        x = b["x"].detach().to(dtype).clone().requires_grad_()
        if sm is None:  # the adaptive input alone: its output and the gradients of a fixed linear function of it
            emb = ai(b["tokens"])
            out["embeddings"] = emb.detach().clone()
            (emb * b["w"].to(dtype)).sum().backward()
        else:
            hidden = x + ai(b["tokens"]) if ai is not None else x  # tied: both sides reach the shared tensors
            with torch.no_grad():
                out["log_probs"] = sm.get_log_prob(hidden, None).clone()
            loss = adaptive_loss(sm, hidden, b["target"], c["pad"])
            out["loss"] = loss.detach().clone()
            loss.backward()
            out["grad_x"] = x.grad.clone()
        out["grads"] = {k: (p.grad.clone() if p.grad is not None else None) for k, p in params(ai, sm).items()}
    if c.get("dropout", 0) > 0 and sm is not None or c.get("q_noise", 0) > 0:
        r["train"] = train(c, seed, b)
    return r


def train(c: dict, seed: int, b: dict) -> dict:
    """Training mode, fp32, torch.manual_seed(seed + 3) before the forward: dropout masks (PyTorch's kernel) and
    quant-noise masks drawn from torch's global generator, as in fairseq."""
    torch.manual_seed(seed)
    ai, sm = build(c)
    for m in (ai, sm):
        if m is not None:
            m.train()
    out = {}
    x = b["x"].detach().clone().requires_grad_()
    torch.manual_seed(seed + 3)
    if sm is None:
        emb = ai(b["tokens"])
        out["embeddings"] = emb.detach().clone()
        out["weights_after"] = {k: p.detach().clone() for k, p in params(ai, sm).items()}  # quant-noise rewrote them
        (emb * b["w"]).sum().backward()
    else:
        hidden = x + ai(b["tokens"]) if ai is not None else x
        loss = adaptive_loss(sm, hidden, b["target"], c["pad"])
        out["loss"] = loss.detach().clone()
        loss.backward()
        out["grad_x"] = x.grad.clone()
        torch.manual_seed(seed + 4)
        with torch.no_grad():
            hidden = x.detach() + ai(b["tokens"]) if ai is not None else x.detach()
            out["log_probs"] = sm.get_log_prob(hidden, None).clone()  # the tails' dropout applies in training
    out["grads"] = {k: (p.grad.clone() if p.grad is not None else None) for k, p in params(ai, sm).items()}
    return out


def main() -> None:
    torch.set_num_threads(1)
    rng = np.random.default_rng(DRAW_SEED)
    configs = [dict(c, d=c["odim"]) if c["kind"] == "tied" else dict(c) for c in HAND]
    assert all(accepted(c) for c in configs)
    while len(configs) < len(HAND) + N_RANDOM:
        c = draw(rng)
        if accepted(c):
            configs.append(c)
    refs = [reference(c, 1000 + i) for i, c in enumerate(configs)]
    OUT.mkdir(exist_ok=True)
    meta = dict(fairseq_version=str(fairseq.__version__), torch_version=str(torch.__version__), draw_seed=DRAW_SEED)
    torch.save(dict(meta, references=refs), OUT / "reference.pt")
    lines = [json.dumps({k: v for k, v in c.items()}) for c in configs]
    (OUT / "configs.jsonl").write_text("\n".join(lines) + "\n")
    print(f"{len(refs)} configurations -> {OUT / 'reference.pt'} ({(OUT / 'reference.pt').stat().st_size} bytes)")


if __name__ == "__main__":
    main()
