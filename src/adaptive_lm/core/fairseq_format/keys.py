"""Weight names between fairseq and us, both directions (q/k/v or the old fused in_proj <-> our fused ``qkv``,
untied tail projections transposed, tied tensors under all of fairseq's names), and the strict load that accepts
each tied tensor under any one of its names."""

from __future__ import annotations

import re

import torch
from torch import Tensor

from adaptive_lm.core.config import ModelConfig
from adaptive_lm.core.errors import UserError
from adaptive_lm.core.model import prune_layers

# fairseq's bookkeeping tensors, which hold no weights
_DROP = re.compile(r"(^version$|_float_tensor$|^embed_positions\.weights$|^adaptive_softmax\.version$)")

# fairseq name (without "decoder.") -> ours, where one tensor is only renamed; the first full match wins
_RENAMES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(p), template)
    for p, template in (
        (r"embed_tokens\.embeddings\.(\d+)\.0\.weight", r"embed_tokens.embeddings.\1.weight"),
        (r"embed_tokens\.embeddings\.(\d+)\.1\.weight", r"embed_tokens.projections.\1.weight"),
        (r"layers\.(\d+)\.self_attn\.in_proj_(weight|bias)", r"layers.\1.self_attn.qkv.\2"),  # fused already
        (r"layers\.(\d+)\.layer_norms\.0\.(weight|bias)", r"layers.\1.self_attn_layer_norm.\2"),  # old names
        (r"layers\.(\d+)\.layer_norms\.1\.(weight|bias)", r"layers.\1.final_layer_norm.\2"),
        (r"adaptive_softmax\.head\.word_proj(\.1)?\.weight", "adaptive_softmax.word_weight"),  # tied head
        (r"adaptive_softmax\.head\.word_proj\.0\.weight", "adaptive_softmax.head_in_proj.weight"),
        (r"adaptive_softmax\.head\.class_proj\.weight", "adaptive_softmax.class_weight"),
        (r"adaptive_softmax\.tail\.(\d+)\.2\.weight", r"adaptive_softmax.tail_out.\1"),
        (r"embed_out", "output_projection.weight"),
        (r"embed_tokens\.highway\.layers\.(.*)", r"embed_tokens.highway.\1"),  # fairseq's Highway holds a ModuleList
    )
]
_QKV = re.compile(r"layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")
_TAIL_PROJ = re.compile(r"adaptive_softmax\.tail\.(\d+)\.0\.weight")


def _renamed(key: str) -> str:
    for pattern, template in _RENAMES:
        m = pattern.fullmatch(key)
        if m:
            return m.expand(template)
    return key


def _unused(key: str, cfg: ModelConfig) -> bool:
    """Bookkeeping, the sinusoidal table (rebuilt, not loaded), and fairseq#3545's output projection that sits
    unused next to an adaptive softmax."""
    return bool(
        _DROP.search(key)
        or (key == "embed_positions.weight" and cfg.decoder_learned_pos is False)
        or (key == "output_projection.weight" and cfg.adaptive_softmax_cutoff is not None)
    )


def state_dict_from_fairseq(sd: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Rename fairseq's decoder keys to ours; fuse q/k/v; transpose untied tail projections; keep only
    ``decoder_layers_to_keep`` (fairseq's ``prune_state_dict``)."""
    sd = prune_layers(sd, cfg.decoder_layers_to_keep)
    src = {k[len("decoder.") :] if k.startswith("decoder.") else k: v for k, v in sd.items()}
    out: dict[str, Tensor] = {}
    qkv: dict[str, dict[str, Tensor]] = {}
    c0 = cfg.adaptive_softmax_cutoff[0] if cfg.adaptive_softmax_cutoff else 0
    tied_proj = cfg.tie_adaptive_weights and cfg.tie_adaptive_proj
    for k, v in src.items():
        if _unused(k, cfg):
            continue
        qkv_match, tail_match = _QKV.fullmatch(k), _TAIL_PROJ.fullmatch(k)
        if qkv_match:  # fused below, once all three are seen
            layer, part, kind = qkv_match.groups()
            qkv.setdefault(f"layers.{layer}.self_attn.qkv.{kind}", {})[part] = v
        elif k == "adaptive_softmax.head.weight":  # untied head: one matrix, words then clusters
            out["adaptive_softmax.word_weight"], out["adaptive_softmax.class_weight"] = v[:c0], v[c0:]
        elif tail_match:  # tied: the adaptive input's [d, dim] projection; untied: a Linear's [dim, d] weight
            out[f"adaptive_softmax.tail_proj.{tail_match.group(1)}"] = v if tied_proj else v.t()
        else:
            out[_renamed(k)] = v
    for name, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise UserError(f"checkpoint has an incomplete attention projection set for {name}")
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def load_into(
    model: torch.nn.Module, sd: dict[str, Tensor], source: str = "checkpoint", dtype: torch.dtype | None = None
) -> None:
    """Strict load that accepts each tied tensor under any one of its names (fairseq stores it under all).

    A model built on the meta device is filled by *assigning* the loaded tensors (no second copy of the weights;
    with a memory-mapped file the pages are read on first use), then re-tied; ``dtype`` converts on the way.
    """
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    full = dict(sd)
    for names in groups.values():
        have = [n for n in names if n in full]
        if have:
            for n in names:
                full.setdefault(n, full[have[0]])
    expected = set(model.state_dict().keys())
    missing = sorted(expected - set(full))
    unexpected = sorted(set(full) - expected)
    if missing or unexpected:
        raise UserError(
            f"{source}: weights do not match the model built from its settings "
            f"(missing: {', '.join(missing[:5]) or 'none'}; unexpected: {', '.join(unexpected[:5]) or 'none'})"
        )
    own = model.state_dict()
    for k, v in full.items():
        if tuple(own[k].shape) != tuple(v.shape):
            raise UserError(f"{source}: {k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}")
    meta = any(p.is_meta for p in model.parameters())
    if dtype is not None:
        cache: dict[int, Tensor] = {}
        full = {k: cache.setdefault(id(v), v.to(dtype) if v.is_floating_point() else v) for k, v in full.items()}
    if meta:
        model.load_state_dict(full, strict=True, assign=True)
        model.tie_weights()  # type: ignore[operator]
        model.materialize_buffers()  # type: ignore[operator]
    else:
        model.load_state_dict(full, strict=True)


def state_dict_to_fairseq(model: torch.nn.Module, cfg: ModelConfig) -> dict[str, Tensor]:
    """Our weights under fairseq's ``decoder.*`` names, tied tensors shared between their names (the inverse of
    ``state_dict_from_fairseq``)."""
    own = model.state_dict()
    out: dict[str, torch.Tensor] = {"decoder.version": torch.tensor([3.0])}
    tied_proj = cfg.tie_adaptive_weights and cfg.tie_adaptive_proj
    d = cfg.decoder_embed_dim
    for k, v in own.items():
        v = v.detach().cpu()
        if k.startswith("embed_tokens.embeddings."):
            i = k.split(".")[2]
            out[f"decoder.embed_tokens.embeddings.{i}.0.weight"] = v
        elif k.startswith("embed_tokens.projections."):
            i = k.split(".")[2]
            out[f"decoder.embed_tokens.embeddings.{i}.1.weight"] = v
        elif ".self_attn.qkv." in k:
            kind = k.rsplit(".", 1)[1]
            prefix = k.split(".self_attn.")[0]
            q, kk, vv = v.split(d, dim=0)
            for n, t in zip("qkv", (q, kk, vv)):
                out[f"decoder.{prefix}.self_attn.{n}_proj.{kind}"] = t.clone()
        elif k == "adaptive_softmax.word_weight":
            if cfg.tie_adaptive_weights:
                out["decoder.adaptive_softmax.head.word_proj.weight"] = v
            else:
                out["decoder.adaptive_softmax.head.weight"] = torch.cat([v, own["adaptive_softmax.class_weight"]])
        elif k == "adaptive_softmax.class_weight":
            if cfg.tie_adaptive_weights:
                out["decoder.adaptive_softmax.head.class_proj.weight"] = v
        elif k == "adaptive_softmax.head_in_proj.weight":
            out["decoder.adaptive_softmax.head.word_proj.0.weight"] = v
        elif k.startswith("adaptive_softmax.tail_proj."):
            out[f"decoder.adaptive_softmax.tail.{k.split('.')[-1]}.0.weight"] = v if tied_proj else v.t().contiguous()
        elif k.startswith("adaptive_softmax.tail_out."):
            out[f"decoder.adaptive_softmax.tail.{k.split('.')[-1]}.2.weight"] = v
        elif k.startswith("embed_tokens.highway."):  # fairseq's Highway keeps its layers in .layers
            out["decoder.embed_tokens.highway.layers." + k[len("embed_tokens.highway.") :]] = v
        else:
            out[f"decoder.{k}"] = v
    if "decoder.adaptive_softmax.head.word_proj.0.weight" in out:  # word_proj became a Sequential
        out["decoder.adaptive_softmax.head.word_proj.1.weight"] = out.pop(
            "decoder.adaptive_softmax.head.word_proj.weight"
        )
    if cfg.adaptive_input:
        out["decoder.embed_tokens._float_tensor"] = torch.zeros(1)
    if cfg.adaptive_softmax_cutoff is not None:
        out["decoder.adaptive_softmax.version"] = torch.tensor([1])
        if cfg.tie_adaptive_weights:  # fairseq's TiedHeadModule has the buffer, its untied head (a Linear) has not
            out["decoder.adaptive_softmax.head._float_tensor"] = torch.zeros(1)
    return out
