"""The model check: a 2-layer wiki103-shaped model in fp64, the device (plain kernels, bands routed on the CPU as
the trainer does) against the CPU (our kernels): the loss, the target log-probs and every gradient agree to 1e-10.

Why fp64: any difference left is then the code path's, not rounding's, so the tolerance can be tight.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from adaptive_lm.check.context import NO_DROPOUT, Ctx, Record, fmt, maxabs, maxdiff, verdict
from adaptive_lm.core.kernels import plain_kernels
from adaptive_lm.core.model import Routes, TransformerLM, build_model

V, B, T = 400, 4, 48  # vocabulary, batch, tokens per row
TIGHT = ["loss_rel_diff", "loss_without_routes_rel_diff", "target_logprob_max_abs_diff", "grad_worst_rel_diff"]


def fp64_model() -> TransformerLM:
    torch.manual_seed(0)
    model = build_model("transformer_lm_wiki103", V, decoder_layers=2, decoder_embed_dim=64, decoder_ffn_embed_dim=128,
                        decoder_attention_heads=4, adaptive_input_cutoff=(50, 150), adaptive_softmax_cutoff=(50, 150),
                        **NO_DROPOUT)  # fmt: skip
    return model.double()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """(source, target), each B x T, with right padding in two rows as the collater makes it."""
    g = torch.Generator().manual_seed(3)
    tgt = torch.randint(4, V, (B, T), generator=g)  # B, T
    tgt[1, -5:] = tgt[3, -9:] = 1
    src = torch.cat([torch.full((B, 1), 2), tgt[:, :-1]], 1).masked_fill(tgt.eq(1), 1)  # B, T
    return src, tgt


def grads(m: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: (p.grad.detach().cpu() if p.grad is not None else None) for n, p in m.named_parameters()}


def on_cpu(model: TransformerLM, src: torch.Tensor, tgt: torch.Tensor) -> dict[str, Any]:
    """Loss (backward run), target log-probs: the CPU with our kernels, bands found with nonzero."""
    with plain_kernels(False):
        model.train()
        loss = model.loss_from_features(model(src), tgt, True)
        loss.backward()
        model.eval()
        with torch.no_grad():
            lp = model.target_log_probs(src, tgt)  # B, T
    return dict(loss=loss.item(), loss_plain=loss.item(), lp=lp, grads=grads(model))


def on_device(ctx: Ctx, model: TransformerLM, src: torch.Tensor, tgt: torch.Tensor) -> dict[str, Any]:
    """The same on the device with the plain kernels, the bands precomputed on the CPU (``model.Routes``) as the
    trainer does; also the loss without routes."""
    src_d, tgt_d = src.to(ctx.device), tgt.to(ctx.device)
    with plain_kernels(True):
        model.train()
        routes = Routes(src, tgt, model.cfg).to(ctx.device)
        loss = model.loss_from_features(model(src_d, routes=routes), tgt_d, True, routes)
        loss.backward()
        loss_plain = model.loss(src_d, tgt_d, True).item()  # the same without routes
        model.eval()
        with torch.no_grad():
            lp = model.target_log_probs(src_d, tgt_d).cpu()  # B, T
    return dict(loss=loss.item(), loss_plain=loss_plain, lp=lp, grads=grads(model))


def check_model_fp64(ctx: Ctx) -> Record:
    cpu_model = fp64_model()
    dev_model = copy.deepcopy(cpu_model).to(ctx.device)
    src, tgt = batch()
    c, d = on_cpu(cpu_model, src, tgt), on_device(ctx, dev_model, src, tgt)
    gc, gd = c["grads"], d["grads"]
    missing = [n for n in gc if (gc[n] is None) != (gd[n] is None)]
    rel = {n: maxdiff(gd[n], gc[n]) / max(maxabs(gc[n]), 1e-300) for n in gc if gc[n] is not None and gd[n] is not None}
    worst = max(rel, key=rel.get)
    keep = tgt.ne(1)
    figs = dict(
        device=ctx.where,
        loss_cpu=c["loss"],
        loss_rel_diff=abs(d["loss"] - c["loss"]) / abs(c["loss"]),
        loss_without_routes_rel_diff=abs(d["loss_plain"] - c["loss"]) / abs(c["loss"]),
        target_logprob_max_abs_diff=maxdiff(d["lp"][keep], c["lp"][keep]),
        grad_worst_rel_diff=rel[worst],
        grad_worst_param=worst,
        params_compared=len(rel),
        grad_presence_mismatch=missing,
    )
    bad = [k for k in TIGHT if figs[k] > 1e-10] + (["gradient presence"] if missing else [])
    summary = (
        f"{ctx.where}: loss {fmt(figs['loss_rel_diff'])}, log-probs {fmt(figs['target_logprob_max_abs_diff'])}, "
        f"{len(rel)} grads worst {fmt(rel[worst])} ({worst})"
    )
    return Record(verdict(not bad), summary, figs, ("above 1e-10: " + ", ".join(bad)) if bad else "")
