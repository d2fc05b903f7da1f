"""The network, top to bottom: adaptive input, adaptive softmax, the pre-LN decoder layer, the LM.

Numerically this is fairseq's ``transformer_lm`` (``fairseq/models/transformer_lm.py``,
``fairseq/models/transformer/transformer_decoder.py``, ``fairseq/modules/{adaptive_input,adaptive_softmax,
transformer_layer,multihead_attention,sinusoidal_positional_embedding}.py``; reference doc sections 1-3),
written for speed and reuse rather than as a port:

* attention runs through ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels, no stored
  T x T maps) with one fused q/k/v projection; fairseq's separate q/k/v tensors are split/concatenated at
  load time (``fairseq_io.py``);
* tied tensors are *the same* ``nn.Parameter`` in both modules, so ``model.parameters()`` counts them once
  and both sides' gradients accumulate into one ``.grad``;
* the adaptive softmax has three entry points: ``loss`` (training; each tail sees only its own rows),
  ``log_prob`` (the full V-way distribution) and ``target_log_prob`` (log p(target) with no rows x V tensor).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig, band_dims
from .kernels import add_dropout, causal_attention, cross_entropy_sum, dropout

KVCache = list[dict[str, Tensor]]


def complete_cutoff(cutoff: tuple[int, ...] | list[int], vocab_size: int) -> list[int]:
    """fairseq appends the vocabulary size as the last band's end unless it is already there."""
    cut = list(cutoff)
    if vocab_size > cut[-1]:
        cut.append(vocab_size)
    elif vocab_size < cut[-1]:
        raise ValueError(f"cutoff {cut[-1]} is larger than the vocabulary size {vocab_size}")
    return cut


def bucket(n: int) -> int:
    """``n`` rounded up to a coarse size: a multiple of 64 up to 128, then of half the power of two below ``n``
    (128, 192, 256, 384, 512, 768, ...; at most 50% padding, a handful of sizes per octave).

    Why: the rows of an adaptive-softmax tail or an adaptive-input band change with every batch, and CPU bf16
    matmuls (oneDNN) build and cache a kernel per shape; with rounded sizes the few shapes repeat across steps.
    """
    if n <= 128:
        return -(-n // 64) * 64
    step = 1 << (n.bit_length() - 2)  # half of the power of two at or below n
    return -(-n // step) * step


def wants_buckets(device: torch.device, dtype: torch.dtype) -> bool:
    """Row bucketing pays only where oneDNN runs the matmuls: CPU in bf16/fp16 (autocast or half weights). fp32
    on CPU goes to MKL, which caches nothing per shape; there the padding was pure cost (3% of a small step)."""
    return device.type == "cpu" and (dtype in (torch.bfloat16, torch.float16) or torch.is_autocast_enabled(device.type))


def pad_to_bucket(rows: Tensor) -> Tensor:
    """``rows`` (a 1-D index list) extended to ``bucket(len)`` entries by repeating its first one; callers drop
    the results of the extra entries, so only the matmul shapes change (they repeat across batches)."""
    n = rows.numel()
    if n == 0 or bucket(n) == n:
        return rows
    return torch.cat([rows, rows[:1].expand(bucket(n) - n)])


def bucket_rows(rows: Tensor, local: Tensor, fill: int) -> tuple[Tensor, Tensor]:
    """A tail's rows padded by ``pad_to_bucket``, the extra rows with target ``fill``, which the loss ignores."""
    padded = pad_to_bucket(rows)
    extra = padded.numel() - rows.numel()
    return padded, (torch.cat([local, local.new_full((extra,), fill)]) if extra else local)


def _linear_init_draw(out_features: int, in_features: int) -> None:
    """Consume the random numbers that building a bias-free ``nn.Linear(in_features, out_features)`` draws."""
    nn.init.kaiming_uniform_(torch.empty(out_features, in_features), a=math.sqrt(5))


def fp32(t: Tensor) -> Tensor:
    """Softmax and loss in at least fp32 (bf16/fp16 logits are upcast; fp64 stays fp64 for gradient checks)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


# =====================================================================================================
# Adaptive input (Baevski & Auli 2018, section 3)
# =====================================================================================================
class AdaptiveInput(nn.Module):
    """Word embeddings whose width shrinks by ``factor`` per frequency band, each projected up to ``output_dim``.

    Band i covers ids [c_{i-1}, c_i) with an ``Embedding(size_i, initial_dim // factor**i)`` and a bias-free
    ``Linear(dim_i -> output_dim)``. Only band 0 has a padding row (fairseq >= Jan 2020); no scaling happens
    here (the decoder multiplies by sqrt(d)).
    """

    def __init__(
        self,
        vocab_size: int,
        padding_idx: int,
        initial_dim: int,
        factor: float,
        output_dim: int,
        cutoff: tuple[int, ...] | list[int],
    ) -> None:
        super().__init__()
        self.cutoff = complete_cutoff(cutoff, vocab_size)
        self.vocab_size = vocab_size
        self.padding_idx = padding_idx
        self.embedding_dim = output_dim
        self.dims = band_dims(initial_dim, factor, len(self.cutoff))
        self.embeddings = nn.ModuleList()
        self.projections = nn.ModuleList()
        prev = 0
        for i, end in enumerate(self.cutoff):
            size, dim = end - prev, self.dims[i]
            self.embeddings.append(nn.Embedding(size, dim, padding_idx=padding_idx if i == 0 else None))
            self.projections.append(nn.Linear(dim, output_dim, bias=False))
            prev = end
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """fairseq: N(0, dim^-0.5) embeddings with row ``padding_idx`` zeroed in *every* band; xavier projections."""
        for emb, proj in zip(self.embeddings, self.projections):
            nn.init.normal_(emb.weight, mean=0.0, std=emb.weight.shape[1] ** -0.5)
            if self.padding_idx < emb.weight.shape[0]:
                emb.weight[self.padding_idx].zero_()
            nn.init.xavier_uniform_(proj.weight)

    def weights_for_band(self, band: int) -> tuple[Tensor, Tensor]:
        """(embedding [size, dim], projection [output_dim, dim]) of a band: what the adaptive softmax ties to."""
        return self.embeddings[band].weight, self.projections[band].weight

    def forward(self, tokens: Tensor) -> Tensor:
        flat = tokens.reshape(-1)  # (N,)
        out: Tensor | None = None
        prev = 0
        for i, end in enumerate(self.cutoff):
            idx = ((flat >= prev) & (flat < end)).nonzero().squeeze(1)  # (N_i,)
            n = idx.numel()
            if n > 0:
                ids = flat.index_select(0, idx) - prev  # (N_i,)
                w = self.projections[i].weight
                if wants_buckets(w.device, w.dtype):  # pad rows, dropped below
                    ids = pad_to_bucket(ids)
                band = self.projections[i](self.embeddings[i](ids))[:n]  # (N_i, d)
                if out is None:
                    out = band.new_zeros(flat.shape[0], self.embedding_dim)
                out = out.index_copy(0, idx, band.to(out.dtype))
            prev = end
        if out is None:  # empty input
            out = self.projections[0].weight.new_zeros(flat.shape[0], self.embedding_dim)
        return out.view(*tokens.shape, self.embedding_dim)  # (*tokens.shape, d)


# =====================================================================================================
# Adaptive softmax (Grave et al. 2017, as in fairseq)
# =====================================================================================================
class AdaptiveSoftmax(nn.Module):
    """Head over the ``c_0`` frequent words plus one logit per tail cluster; tail i = proj, dropout, out.

    With ``adaptive_input`` given, the word head and every tail's output matrix *are* the adaptive input's
    band embeddings, and with ``tie_proj`` the tail projections are its band projections (transposed use).
    Tail projections are stored as ``[d, dim]`` (applied as ``x @ P``) whether tied or not, so one code path
    serves both; the fairseq loader transposes untied ones.
    """

    def __init__(
        self,
        vocab_size: int,
        input_dim: int,
        cutoff: tuple[int, ...] | list[int],
        dropout: float = 0.0,
        factor: float = 4.0,
        adaptive_input: AdaptiveInput | None = None,
        tie_proj: bool = False,
    ) -> None:
        super().__init__()
        self.cutoff = complete_cutoff(cutoff, vocab_size)
        self.vocab_size = vocab_size
        self.n_clusters = len(self.cutoff) - 1
        self.head_size = self.cutoff[0] + self.n_clusters
        self.dropout = dropout
        self.tied = adaptive_input is not None
        self.tie_proj = tie_proj and self.tied
        c0 = self.cutoff[0]

        # head: word part [c0, dim0] (+ optional in-projection when tied with dim0 != input_dim), class part
        self.head_in_proj: nn.Linear | None = None
        if adaptive_input is not None:
            if adaptive_input.cutoff != self.cutoff:
                raise ValueError(f"tied cutoffs differ: input {adaptive_input.cutoff} vs softmax {self.cutoff}")
            self.word_weight = adaptive_input.embeddings[0].weight  # shared Parameter [c0, dim0]
            if self.word_weight.shape[1] != input_dim:
                self.head_in_proj = nn.Linear(input_dim, self.word_weight.shape[1], bias=False)
        else:
            self.word_weight = nn.Parameter(torch.empty(c0, input_dim))
        self.class_weight = nn.Parameter(torch.empty(self.n_clusters, input_dim))
        # fairseq builds an nn.Linear for the head (or the tied head's class part) and for every untied tail
        # matrix, each drawing its default init, before re-initialising them all; the same draws here, in the same
        # order, so that a given seed gives fairseq's initial weights exactly (only the count and order matter)
        _linear_init_draw(self.head_size - c0 if self.tied else self.head_size, input_dim)

        self.tail_proj = nn.ParameterList()
        self.tail_out = nn.ParameterList()
        for i in range(self.n_clusters):
            dim = int(input_dim // factor ** (i + 1))
            size = self.cutoff[i + 1] - self.cutoff[i]
            if adaptive_input is not None:
                emb, proj = adaptive_input.weights_for_band(i + 1)
                if not self.tie_proj:
                    _linear_init_draw(proj.shape[1], proj.shape[0])  # fairseq: Linear(proj.size(0), proj.size(1))
                self.tail_proj.append(proj if self.tie_proj else nn.Parameter(torch.empty(input_dim, dim)))
                self.tail_out.append(emb)
            else:
                _linear_init_draw(dim, input_dim)
                _linear_init_draw(size, dim)
                self.tail_proj.append(nn.Parameter(torch.empty(input_dim, dim)))
                self.tail_out.append(nn.Parameter(torch.empty(size, dim)))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """xavier_uniform on every untied matrix, with fairseq's fan shapes (the untied head is one matrix), in the
        order of fairseq's ``self.apply(init_weights)``: head in-projection, head, then each tail."""
        if self.head_in_proj is not None:
            nn.init.xavier_uniform_(self.head_in_proj.weight)
        if not self.tied:
            head = torch.empty(self.head_size, self.word_weight.shape[1])
            nn.init.xavier_uniform_(head)
            self.word_weight.copy_(head[: self.cutoff[0]])
            self.class_weight.copy_(head[self.cutoff[0] :])
        else:
            nn.init.xavier_uniform_(self.class_weight)
        for i in range(self.n_clusters):
            if not self.tie_proj:  # drawn as fairseq's Linear(d -> dim) weight [dim, d], in its element order
                self.tail_proj[i].copy_(nn.init.xavier_uniform_(torch.empty(self.tail_proj[i].T.shape)).T)
            if not self.tied:
                nn.init.xavier_uniform_(self.tail_out[i])

    def tie_to(self, adaptive_input: AdaptiveInput) -> None:
        """(Re-)share the tied tensors with ``adaptive_input`` (after an ``assign=True`` load made copies)."""
        if not self.tied:
            return
        self.word_weight = adaptive_input.embeddings[0].weight
        for i in range(self.n_clusters):
            self.tail_out[i] = adaptive_input.embeddings[i + 1].weight
            if self.tie_proj:
                self.tail_proj[i] = adaptive_input.projections[i + 1].weight

    # ---- pieces --------------------------------------------------------------------------------------
    def head_logits(self, x: Tensor) -> Tensor:
        """(N, d) -> (N, c0 + n_clusters): frequent-word logits, then one logit per tail cluster."""
        if self.head_in_proj is None:
            return F.linear(x, torch.cat([self.word_weight, self.class_weight]))  # (N, c0 + nc)
        words = F.linear(self.head_in_proj(x), self.word_weight)  # (N, c0)
        return torch.cat([words, F.linear(x, self.class_weight)], dim=-1)

    def tail_logits(self, i: int, x: Tensor) -> Tensor:
        """(N_i, d) -> (N_i, size_i) for tail cluster i (dropout between projection and output, as fairseq)."""
        h = dropout(x @ self.tail_proj[i], self.dropout, self.training)  # (N_i, dim_i)
        return F.linear(h, self.tail_out[i])  # (N_i, size_i)

    def split_targets(self, target: Tensor) -> tuple[Tensor, list[tuple[Tensor, Tensor] | None]]:
        """fairseq's ``adapt_target``: head target (word or c0 + cluster) and per cluster (rows, local targets)."""
        target = target.reshape(-1)
        head_target = target.clone()
        clusters: list[tuple[Tensor, Tensor] | None] = []
        for i in range(self.n_clusters):
            lo, hi = self.cutoff[i], self.cutoff[i + 1]
            mask = (target >= lo) & (target < hi)
            head_target[mask] = self.cutoff[0] + i
            rows = mask.nonzero().squeeze(1)
            clusters.append((rows, target.index_select(0, rows) - lo) if rows.numel() > 0 else None)
        return head_target, clusters

    # ---- entry points --------------------------------------------------------------------------------
    def loss(self, hidden: Tensor, target: Tensor, ignore_index: int = 1, tail_ignore_quirk: bool = True) -> Tensor:
        """Summed NLL in nats over non-``ignore_index`` targets (fairseq's ``adaptive_loss``).

        Dropout is applied to the input first (training mode only). ``tail_ignore_quirk`` reproduces fairseq's
        use of ``ignore_index`` on the *local* tail targets, which drops the within-cluster term of the words
        with id ``cutoff[i] + ignore_index`` (reference section 4); False gives the exact NLL.
        """
        x = hidden.reshape(-1, hidden.shape[-1])  # (N, d)
        x = dropout(x, self.dropout, self.training)
        head_target, clusters = self.split_targets(target)
        loss = cross_entropy_sum(fp32(self.head_logits(x)), head_target, ignore_index)
        tail_ignore = ignore_index if tail_ignore_quirk else -100
        for i, c in enumerate(clusters):
            if c is None:
                continue
            rows, local = c
            if wants_buckets(x.device, x.dtype):
                rows, local = bucket_rows(rows, local, tail_ignore)  # fewer distinct shapes for oneDNN's cache
            logits = fp32(self.tail_logits(i, x.index_select(0, rows)))  # (N_i', size_i)
            loss = loss + cross_entropy_sum(logits, local, tail_ignore)
        return loss

    def log_prob(self, hidden: Tensor) -> Tensor:
        """The full V-way natural-log distribution (..., V); no dropout (fairseq's ``get_log_prob``, target=None)."""
        shape = hidden.shape[:-1]
        x = hidden.reshape(-1, hidden.shape[-1])  # (N, d)
        head = F.log_softmax(fp32(self.head_logits(x)), dim=-1)  # (N, c0 + nc)
        c0 = self.cutoff[0]
        parts = [head[:, :c0]]
        for i in range(self.n_clusters):
            tail = F.log_softmax(fp32(self.tail_logits(i, x)), dim=-1)  # (N, size_i)
            parts.append(tail + head[:, c0 + i : c0 + i + 1])
        return torch.cat(parts, dim=-1).view(*shape, self.vocab_size)  # (..., V)

    def target_log_prob(self, hidden: Tensor, target: Tensor, chunk_elements: int = 1 << 24) -> Tensor:
        """log p(target) for every position, computing each tail only for its own rows, in row chunks of at most
        ``chunk_elements`` logits: memory stays bounded whatever the number of tokens and the vocabulary size."""
        shape = target.shape
        x = hidden.reshape(-1, hidden.shape[-1])  # (N, d)
        head_target, clusters = self.split_targets(target)
        out = torch.empty(
            x.shape[0], dtype=torch.float64 if x.dtype == torch.float64 else torch.float32, device=x.device
        )
        step = max(1, chunk_elements // self.head_size)
        for i in range(0, x.shape[0], step):
            head = F.log_softmax(fp32(self.head_logits(x[i : i + step])), dim=-1)  # (n, c0 + nc)
            out[i : i + step] = head.gather(1, head_target[i : i + step, None]).squeeze(1)
        for c, cl in enumerate(clusters):
            if cl is None:
                continue
            rows, local = cl
            step = max(1, chunk_elements // (self.cutoff[c + 1] - self.cutoff[c]))
            for i in range(0, rows.numel(), step):
                r = rows[i : i + step]
                r_in = pad_to_bucket(r) if wants_buckets(x.device, x.dtype) else r  # shapes oneDNN has cached
                logits = self.tail_logits(c, x.index_select(0, r_in))[: r.numel()]  # (n, size_c)
                tail = F.log_softmax(fp32(logits), dim=-1)
                out.index_add_(0, r, tail.gather(1, local[i : i + step, None]).squeeze(1).to(out.dtype))
        return out.view(shape)


# =====================================================================================================
# Positions
# =====================================================================================================
def make_positions(tokens: Tensor, padding_idx: int) -> Tensor:
    """fairseq's ``utils.make_positions``: non-pad tokens get padding_idx+1, +2, ...; pads keep padding_idx."""
    mask = tokens.ne(padding_idx).int()
    return (torch.cumsum(mask, dim=1).type_as(mask) * mask).long() + padding_idx


def sinusoidal_table(num: int, dim: int, padding_idx: int) -> Tensor:
    """[sin | cos] halves (concatenated, not interleaved), fp32, row ``padding_idx`` zero: fairseq's formula."""
    half = dim // 2
    scale = math.log(10000) / (half - 1)
    freq = torch.exp(torch.arange(half, dtype=torch.float) * -scale)  # (half,)
    angles = torch.arange(num, dtype=torch.float).unsqueeze(1) * freq.unsqueeze(0)  # (num, half)
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).view(num, -1)  # (num, 2*half)
    if dim % 2 == 1:
        table = torch.cat([table, torch.zeros(num, 1)], dim=1)
    table[padding_idx, :] = 0
    return table


class SinusoidalPositions(nn.Module):
    """Fixed positional embeddings; the table grows on demand, like fairseq's (no parameters, not saved)."""

    def __init__(self, dim: int, padding_idx: int, init_size: int) -> None:
        super().__init__()
        self.dim, self.padding_idx = dim, padding_idx
        self.register_buffer("weights", sinusoidal_table(init_size, dim, padding_idx), persistent=False)

    def forward(self, positions: Tensor) -> Tensor:
        need = int(positions.max()) + 1 if positions.numel() else 0
        if need > self.weights.shape[0]:
            self.weights = sinusoidal_table(need, self.dim, self.padding_idx).to(self.weights.device)
        return self.weights.index_select(0, positions.reshape(-1)).view(*positions.shape, self.dim)


# =====================================================================================================
# Decoder layer (pre-LN)
# =====================================================================================================
class SelfAttention(nn.Module):
    """Causal multi-head self-attention with a fused q/k/v projection (fairseq's four projections, with bias)."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.dim, self.heads, self.head_dim, self.dropout = dim, heads, dim // heads, dropout
        self.qkv = nn.utils.skip_init(nn.Linear, dim, 3 * dim)
        with torch.no_grad():  # fairseq builds k, v, q (default Linear init each), then out: same draws, same order
            for i in (1, 2, 0):  # rows of k, v, q in the fused [q; k; v] matrix
                nn.init.kaiming_uniform_(self.qkv.weight[i * dim : (i + 1) * dim], a=math.sqrt(5))  # redrawn below
                nn.init.uniform_(self.qkv.bias[i * dim : (i + 1) * dim], -(dim**-0.5), dim**-0.5)
        self.out_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """fairseq: xavier(gain 1/sqrt 2) on k, v, q in that order; xavier on out; out bias 0; q/k/v biases default.
        With the constructor's draws, a given seed gives fairseq's initial weights exactly."""
        for i in (1, 2, 0):
            nn.init.xavier_uniform_(self.qkv.weight[i * self.dim : (i + 1) * self.dim], gain=1 / math.sqrt(2))
        nn.init.xavier_uniform_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: Tensor, cache: dict[str, Tensor] | None = None) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, hd)
        if cache is not None:
            if "k" in cache:
                k = torch.cat([cache["k"], k], dim=2)  # (B, H, S + T, hd)
                v = torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        S = k.shape[2]
        p = self.dropout if self.training else 0.0
        if S == T:
            y = causal_attention(q, k, v, self.dropout, self.training)  # (B, H, T, hd)
        elif T == 1:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        else:  # T new queries after S - T cached keys: query t sees keys up to S - T + t
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)  # (T, S)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


def activation(name: str):
    return {
        "relu": F.relu,
        "gelu": F.gelu,
        "gelu_accurate": lambda x: F.gelu(x, approximate="tanh"),
        "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
        "tanh": torch.tanh,
        "linear": lambda x: x,
        "swish": F.silu,
        "silu": F.silu,
    }[name]


class DecoderLayer(nn.Module):
    """x + Drop(Attn(LN(x))); x + Drop(FC2(ActDrop(act(FC1(LN(x)))))) — fairseq's pre-LN decoder layer."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.decoder_embed_dim
        self.self_attn = SelfAttention(d, cfg.decoder_attention_heads, cfg.attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, cfg.decoder_ffn_embed_dim)
        self.fc2 = nn.Linear(cfg.decoder_ffn_embed_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.act = activation(cfg.activation_fn)
        self.dropout, self.act_dropout = cfg.dropout, cfg.act_dropout

    def forward(self, x: Tensor, cache: dict[str, Tensor] | None = None) -> Tensor:
        h = self.self_attn(self.self_attn_layer_norm(x), cache)  # (B, T, d)
        x = add_dropout(x, h, self.dropout, self.training)
        h = self.fc1(self.final_layer_norm(x))  # (B, T, ffn)
        if self.act is F.relu:  # relu(h) * keep == relu(h * keep) (keep >= 0): relu in place, one tensor fewer
            h = F.relu(dropout(h, self.act_dropout, self.training), inplace=self.training and self.act_dropout > 0)
        else:
            h = dropout(self.act(h), self.act_dropout, self.training)
        return add_dropout(x, self.fc2(h), self.dropout, self.training)  # (B, T, d)


# =====================================================================================================
# The language model
# =====================================================================================================
class TransformerLM(nn.Module):
    """fairseq's ``TransformerLanguageModel`` decoder. ``model(tokens)`` gives the features before the softmax."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        V, pad = cfg.vocab_size, cfg.padding_idx
        d, d_in, d_out = cfg.decoder_embed_dim, cfg.decoder_input_dim, cfg.decoder_output_dim
        self.padding_idx = pad

        if cfg.adaptive_input:
            self.embed_tokens: nn.Module = AdaptiveInput(
                V, pad, d_in, cfg.adaptive_input_factor, d, cfg.adaptive_input_cutoff
            )
            input_embed_dim = d
        else:
            self.embed_tokens = nn.Embedding(V, d_in, padding_idx=pad)
            with torch.no_grad():
                nn.init.normal_(self.embed_tokens.weight, mean=0.0, std=d_in**-0.5)
                self.embed_tokens.weight[pad].zero_()
            input_embed_dim = d_in
        self.embed_scale = 1.0 if cfg.no_scale_embedding else math.sqrt(d)
        self.project_in_dim = nn.Linear(input_embed_dim, d, bias=False) if input_embed_dim != d else None

        self.embed_positions: nn.Module | None = None
        if not cfg.no_token_positional_embeddings:
            n_pos = cfg.max_target_positions + pad + 1
            if cfg.decoder_learned_pos:
                self.embed_positions = nn.Embedding(n_pos, d, padding_idx=pad)
                with torch.no_grad():
                    nn.init.normal_(self.embed_positions.weight, mean=0.0, std=d**-0.5)
                    self.embed_positions.weight[pad].zero_()
            else:
                self.embed_positions = SinusoidalPositions(d, pad, n_pos)
        self.layernorm_embedding = nn.LayerNorm(d) if cfg.layernorm_embedding else None

        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        self.layer_norm = nn.LayerNorm(d) if not cfg.no_decoder_final_norm else None
        self.project_out_dim = nn.Linear(d, d_out, bias=False) if d != d_out and not cfg.tie_adaptive_weights else None

        self.adaptive_softmax: AdaptiveSoftmax | None = None
        self.output_projection: nn.Linear | None = None
        if cfg.adaptive_softmax_cutoff is not None:
            self.adaptive_softmax = AdaptiveSoftmax(
                V,
                d_out,
                cfg.adaptive_softmax_cutoff,
                dropout=cfg.adaptive_softmax_dropout,
                factor=cfg.adaptive_softmax_factor,
                adaptive_input=self.embed_tokens if cfg.tie_adaptive_weights else None,  # type: ignore[arg-type]
                tie_proj=cfg.tie_adaptive_proj,
            )
        else:
            if cfg.share_decoder_input_output_embed:
                self.output_projection = nn.Linear(self.embed_tokens.weight.shape[1], V, bias=False)
                self.output_projection.weight = self.embed_tokens.weight
            else:
                self.output_projection = nn.Linear(d_out, V, bias=False)
                nn.init.normal_(self.output_projection.weight, mean=0.0, std=d_out**-0.5)

    # ---- features --------------------------------------------------------------------------------------
    def forward(
        self,
        src_tokens: Tensor,
        cache: KVCache | None = None,
        positions: Tensor | None = None,
        return_all_hiddens: bool = False,
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """(B, T) token ids -> (B, T, d_out) features before the softmax.

        ``cache`` (one dict per layer, filled in place) makes each new call attend to the keys and values of
        the previous ones; ``positions`` then gives the new tokens' position ids. With ``return_all_hiddens``
        the states after the embedding and after every layer are returned too (fairseq's ``inner_states``).
        """
        if positions is None:
            positions = make_positions(src_tokens, self.padding_idx)  # (B, T)
        x = self.embed_scale * self.embed_tokens(src_tokens)  # (B, T, d)
        if self.project_in_dim is not None:
            x = self.project_in_dim(x)
        if self.embed_positions is not None:
            x = x + self.embed_positions(positions).to(x.dtype)
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        x = dropout(x, self.cfg.dropout, self.training)
        states = [x]
        for i, layer in enumerate(self.layers):
            x = layer(x, cache[i] if cache is not None else None)  # (B, T, d)
            states.append(x)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        if self.project_out_dim is not None:
            x = self.project_out_dim(x)  # (B, T, d_out)
        return (x, states) if return_all_hiddens else x

    def tie_weights(self) -> None:
        """Make tied tensors one Parameter again (loading with ``assign=True`` replaces each name separately)."""
        if self.adaptive_softmax is not None and isinstance(self.embed_tokens, AdaptiveInput):
            self.adaptive_softmax.tie_to(self.embed_tokens)
        if self.output_projection is not None and self.cfg.share_decoder_input_output_embed:
            self.output_projection.weight = self.embed_tokens.weight

    def materialize_buffers(self, device: torch.device | str = "cpu") -> None:
        """Rebuild non-persistent buffers (the sinusoidal table) after building on the meta device."""
        if isinstance(self.embed_positions, SinusoidalPositions):
            e = self.embed_positions
            e.weights = sinusoidal_table(e.weights.shape[0], e.dim, e.padding_idx).to(device)

    def new_cache(self) -> KVCache:
        return [{} for _ in self.layers]

    # ---- outputs -------------------------------------------------------------------------------------
    def log_probs_from_features(self, x: Tensor) -> Tensor:
        if self.adaptive_softmax is not None:
            return self.adaptive_softmax.log_prob(x)
        return F.log_softmax(fp32(self.output_projection(x)), dim=-1)  # type: ignore[misc]

    def target_log_probs_from_features(self, x: Tensor, target: Tensor) -> Tensor:
        if self.adaptive_softmax is not None:
            return self.adaptive_softmax.target_log_prob(x, target)
        lp = F.log_softmax(fp32(self.output_projection(x)), dim=-1)  # type: ignore[misc]
        return lp.gather(-1, target.unsqueeze(-1)).squeeze(-1)

    def log_probs(self, src_tokens: Tensor) -> Tensor:
        """(B, T) -> (B, T, V) natural-log next-token distribution at every position."""
        return self.log_probs_from_features(self(src_tokens))

    def target_log_probs(self, src_tokens: Tensor, target: Tensor) -> Tensor:
        """(B, T), (B, T) -> (B, T) log p(target_t | src_<=t), without a (B*T, V) tensor when adaptive."""
        return self.target_log_probs_from_features(self(src_tokens), target)

    def loss(self, src_tokens: Tensor, target: Tensor, tail_ignore_quirk: bool = True) -> Tensor:
        """Summed NLL (nats) over non-pad targets: fairseq's ``adaptive_loss`` (or cross-entropy without it)."""
        return self.loss_from_features(self(src_tokens), target, tail_ignore_quirk)

    def loss_from_features(self, x: Tensor, target: Tensor, tail_ignore_quirk: bool = True) -> Tensor:
        """``loss`` on features already computed (the trainer runs the forward pass itself, maybe compiled)."""
        if self.adaptive_softmax is not None:
            return self.adaptive_softmax.loss(x, target, self.padding_idx, tail_ignore_quirk)
        logits = fp32(self.output_projection(x))  # type: ignore[misc]
        return cross_entropy_sum(logits.view(-1, logits.shape[-1]), target.reshape(-1), self.padding_idx)

    def num_parameters(self) -> int:
        """Unique parameters (tied tensors once), the way fairseq and the paper count them."""
        return sum(p.numel() for p in self.parameters())
