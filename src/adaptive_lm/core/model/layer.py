"""The decoder layer: causal self-attention with a fused q/k/v projection, fairseq's activations, and the layer
itself (pre- or post-LN, NormFormer options, quant-noise on the feed-forward weights)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaptive_lm.core.config import ModelConfig
from adaptive_lm.core.kernels import (
    Linear,
    add_dropout,
    causal_attention,
    dropout,
    one_query_attention,
    ours,
    prefix_attention,
    suffix_attention,
)
from adaptive_lm.core.model.init import quant_noise_


class LayerCache(dict):
    """One layer's keys and values so far, ``"k"`` and ``"v"`` (B, H, S, hd), as a plain dict cache holds them; with
    a ``capacity`` they live in preallocated buffers.

    Why: decoding one position at a time, a dict cache concatenates every layer's keys and values with the new ones
    (a copy of the whole cache per step) and beam search then reorders them (another copy), which took more time
    than the model's matmuls for an 8-layer d512 model. Here a new position is written in place, and a reorder is one
    gather into the spare buffer, done lazily: ``reorder`` only records the rows, and the next ``append`` (this
    layer's turn in the next step) gathers them, just before the attention reads the same keys and values. On the CPU,
    when at most half the rows change, only those are copied, in place: a trained model's beams mostly keep their
    order (72% of the rows on the fixture's generation benchmark). Gathering every layer's cache at the start of a
    step wrote up to 290 MB that the layers then read back from DRAM (8 layers d512, 80 rows, 110 positions); one
    layer's cache at a time is still in the CPU's cache when its attention reads it. Read ``"k"`` and ``"v"`` only
    through ``append`` (or after ``flush``)."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.bufs: list[Tensor] = []  # k, v, spare k, spare v: (B0, H, capacity, hd) each, made on first use
        self.pending: Tensor | None = None  # rows of a reorder not yet applied

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add (B, H, T, hd) keys and values; the whole (B, H, S + T, hd) views back."""
        self.flush()
        S = self["k"].shape[2] if "k" in self else 0
        B, H, T, hd = k.shape
        if self.capacity < S + T:  # beyond the planned length: concatenate, as a plain dict
            k, v = (torch.cat([self[n], x], dim=2) if n in self else x for n, x in (("k", k), ("v", v)))
        else:
            if not self.bufs:
                self.bufs = [k.new_empty(B, H, self.capacity, hd) for _ in range(4)]
            for buf, x in zip(self.bufs[:2], (k, v)):
                buf[:B, :, S : S + T] = x
            k, v = self.bufs[0][:B, :, : S + T], self.bufs[1][:B, :, : S + T]
        self["k"], self["v"] = k, v
        return k, v

    def reorder(self, rows: Tensor) -> None:
        """Keep, in this order, the cache rows ``rows`` (beam search's choice, maybe fewer rows than before); applied
        by the next ``append`` or ``flush``."""
        self.pending = rows if self.pending is None else self.pending.index_select(0, rows)

    def flush(self) -> None:
        """Apply the pending reorder: one gather of the keys and values into the spare buffers, or (on the CPU, at
        most half the rows moving) an in-place copy of the moved rows."""
        rows, self.pending = self.pending, None
        if rows is None or "k" not in self:
            return
        if not self.bufs or self["k"].data_ptr() != self.bufs[0].data_ptr():
            self["k"], self["v"] = self["k"].index_select(0, rows), self["v"].index_select(0, rows)
            return
        n, S = rows.numel(), self["k"].shape[2]
        if n == self["k"].shape[0] and ours(rows):  # (counting the moved rows would be a host sync on a GPU)
            dst = rows.ne(torch.arange(n, device=rows.device)).nonzero().squeeze(1)  # the rows that change
            if 2 * dst.numel() <= n:  # copying the moved rows twice moves less than gathering them all
                for buf in self.bufs[:2]:
                    kept = buf[:, :, :S]  # (B0, H, S, hd)
                    kept.index_copy_(0, dst, kept.index_select(0, rows.index_select(0, dst)))
                return
        for src, dst in ((0, 2), (1, 3)):
            torch.index_select(self.bufs[src][:, :, :S], 0, rows, out=self.bufs[dst][:n, :, :S])
        self.bufs = [self.bufs[2], self.bufs[3], self.bufs[0], self.bufs[1]]
        self["k"], self["v"] = self.bufs[0][:n, :, :S], self.bufs[1][:n, :, :S]


class SelfAttention(nn.Module):
    """Causal multi-head self-attention with a fused q/k/v projection (fairseq's four projections, with bias)."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.dim, self.heads, self.head_dim, self.dropout = dim, heads, dim // heads, dropout
        # no default init (its draws would break fairseq's order): built on meta, given empty parameters on the
        # current default device (meta when loading). Not skip_init: its to_empty runs a Python reference that
        # imports torch.fx's symbolic shapes (0.2 s of every command)
        here = torch.empty(0).device
        self.qkv = Linear(dim, 3 * dim, device="meta")
        self.qkv.weight = nn.Parameter(torch.empty(3 * dim, dim, device=here))  # (3C, C)
        self.qkv.bias = nn.Parameter(torch.empty(3 * dim, device=here))  # (3C,)
        with torch.no_grad():  # fairseq builds k, v, q (default Linear init each), then out: same draws, same order
            for i in (1, 2, 0):  # rows of k, v, q in the fused [q; k; v] matrix
                nn.init.kaiming_uniform_(self.qkv.weight[i * dim : (i + 1) * dim], a=math.sqrt(5))  # redrawn below
                nn.init.uniform_(self.qkv.bias[i * dim : (i + 1) * dim], -(dim**-0.5), dim**-0.5)
        self.out_proj = Linear(dim, dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """fairseq: xavier(gain 1/sqrt 2) on k, v, q in that order; xavier on out; out bias 0; q/k/v biases default.
        With the constructor's draws, a given seed gives fairseq's initial weights exactly."""
        for i in (1, 2, 0):
            nn.init.xavier_uniform_(self.qkv.weight[i * self.dim : (i + 1) * self.dim], gain=1 / math.sqrt(2))
        nn.init.xavier_uniform_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(
        self, x: Tensor, cache: dict[str, Tensor] | None = None, keep_from: int = 0, prefix_lens: Tensor | None = None
    ) -> Tensor:
        """(B, T, C) -> (B, T - keep_from, C): every position's keys and values, the queries of positions
        ``keep_from`` on (``TransformerLM.forward``'s ``keep_from``). ``prefix_lens`` (B,): how many of the cached
        positions each row has (``TransformerLM.forward``)."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, hd)
        q = q[:, :, keep_from:] if keep_from else q  # (B, H, T - keep_from, hd)
        T = q.shape[2]
        if isinstance(cache, LayerCache):
            k, v = cache.append(k, v)  # (B, H, S + T, hd)
        elif cache is not None:
            if "k" in cache:
                k = torch.cat([cache["k"], k], dim=2)  # (B, H, S + T, hd)
                v = torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        S = k.shape[2]
        p = self.dropout if self.training else 0.0
        if prefix_lens is not None:
            y = prefix_attention(q, k, v, prefix_lens)  # (B, H, T, hd)
        elif S == T:
            y = causal_attention(q, k, v, self.dropout, self.training)  # (B, H, T, hd)
        elif T == 1:
            y = one_query_attention(q, k, v) if p == 0.0 else F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        else:  # T queries after S - T cached (or only keyed) positions: query t sees keys up to S - T + t
            y = suffix_attention(q, k, v, self.dropout, self.training)  # (B, H, T, hd)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)


def _gelu(x: Tensor) -> Tensor:
    """fairseq's ``gelu``: the exact erf form, computed in fp32."""
    return F.gelu(x.float()).type_as(x)


def _gelu_accurate(x: Tensor) -> Tensor:
    """fairseq's ``gelu_accurate`` (also its deprecated ``gelu_fast``): the tanh approximation, fairseq's arithmetic."""
    return 0.5 * x * (1 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * torch.pow(x, 3))))


ACTIVATION_FNS = {
    "relu": F.relu,
    "gelu": _gelu,
    "gelu_fast": _gelu_accurate,
    "gelu_accurate": _gelu_accurate,
    "tanh": torch.tanh,
    "linear": lambda x: x,
    "relu_squared": lambda x: F.relu(x).pow(2),
}


class DecoderLayer(nn.Module):
    """fairseq's ``TransformerDecoderLayerBase`` without encoder attention.

    pre-LN (``decoder_normalize_before``):  x + Drop(Attn(LN(x)));  x + Drop(FC2(ActDrop(act(FC1(LN(x))))))
    post-LN (fairseq 0.12's plain ``transformer_lm``): LN(x + Drop(Attn(x)));  LN(x + Drop(FC2(...(x))))
    NormFormer options: ``scale_heads`` scales each head's slice of the attention output, ``scale_attn`` adds a
    LayerNorm after attention, ``scale_fc`` one after the activation (dropout), ``scale_resids`` scales the FFN
    residual per channel. ``quant_noise_pq``: fairseq's quant-noise on fc1 and fc2 when training.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.decoder_embed_dim
        self.pre_ln = cfg.decoder_normalize_before
        self.heads = cfg.decoder_attention_heads
        self.self_attn = SelfAttention(d, cfg.decoder_attention_heads, cfg.attention_dropout)
        self.attn_ln = nn.LayerNorm(d) if cfg.scale_attn else None
        self.c_attn = nn.Parameter(torch.ones(self.heads)) if cfg.scale_heads else None
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.ffn_layernorm = nn.LayerNorm(cfg.decoder_ffn_embed_dim) if cfg.scale_fc else None
        self.w_resid = nn.Parameter(torch.ones(d)) if cfg.scale_resids else None
        self.fc1 = Linear(d, cfg.decoder_ffn_embed_dim)
        self.fc2 = Linear(cfg.decoder_ffn_embed_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.act_name = cfg.activation_fn
        self.act = ACTIVATION_FNS[cfg.activation_fn]
        self.dropout, self.act_dropout = cfg.dropout, cfg.act_dropout
        self.q_noise, self.qn_block_size = cfg.quant_noise_pq, cfg.quant_noise_pq_block_size

    def forward(
        self, x: Tensor, cache: dict[str, Tensor] | None = None, keep_from: int = 0, prefix_lens: Tensor | None = None
    ) -> Tensor:
        """(B, T, d) -> (B, T - keep_from, d): with ``keep_from`` only the later positions' outputs."""
        h = self.self_attn(self.self_attn_layer_norm(x) if self.pre_ln else x, cache, keep_from, prefix_lens)
        x = x[:, keep_from:] if keep_from else x  # (B, T', d) the residual of the kept positions
        if self.c_attn is not None:
            h = (h.unflatten(-1, (self.heads, -1)) * self.c_attn[:, None]).flatten(-2)  # (B, T, H, hd) -> (B, T, d)
        if self.attn_ln is not None:
            h = self.attn_ln(h)
        x = add_dropout(x, h, self.dropout, self.training)
        if not self.pre_ln:
            x = self.self_attn_layer_norm(x)
        noise = self.training and self.q_noise > 0
        if noise:
            quant_noise_(self.fc1.weight, self.q_noise, self.qn_block_size)
        h = self.fc1(self.final_layer_norm(x) if self.pre_ln else x)  # (B, T', ffn)
        if self.act_name == "relu":  # relu(h) * keep == relu(h * keep) (keep >= 0): relu in place, one tensor fewer
            # in place also without gradients (inference): fc1's output is read by nothing else
            inplace = (self.training and self.act_dropout > 0) or not torch.is_grad_enabled()
            h = F.relu(dropout(h, self.act_dropout, self.training), inplace=inplace)
        else:
            h = dropout(self.act(h), self.act_dropout, self.training)
        if self.ffn_layernorm is not None:
            h = self.ffn_layernorm(h)
        if noise:
            quant_noise_(self.fc2.weight, self.q_noise, self.qn_block_size)
        residual = x if self.w_resid is None else self.w_resid * x
        x = add_dropout(residual, self.fc2(h), self.dropout, self.training)  # (B, T', d)
        return x if self.pre_ln else self.final_layer_norm(x)
