"""The network, top to bottom: token embedders (adaptive input, character CNN), adaptive softmax, the decoder layer
(pre- or post-LN, NormFormer options), the language model.

Numerically this is fairseq 0.12's ``transformer_lm`` (``fairseq/models/transformer_lm.py``,
``fairseq/models/transformer/transformer_decoder.py``, ``fairseq/modules/{adaptive_input,adaptive_softmax,
character_token_embedder,transformer_layer,multihead_attention,layer_drop,quant_noise}.py``) for every option of
its config (``config.py``), written for speed and reuse rather than as a port:

* one fused q/k/v projection (fairseq's separate q/k/v tensors are split/concatenated at load time, in
  ``fairseq_io.py``); the attention, dropout and cross-entropy kernels are in ``kernels.py``;
* tied tensors are *the same* ``nn.Parameter`` in both modules, so ``model.parameters()`` counts them once and
  both sides' gradients accumulate into one ``.grad``;
* the adaptive softmax has three entry points: ``loss`` (training; each tail sees only its own rows),
  ``log_prob`` (the full V-way distribution) and ``target_log_prob`` (log p(target) with no rows x V tensor);
* random draws happen in fairseq's order, so a seed gives fairseq's initial weights, layer-drop choices and
  quant-noise masks.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from adaptive_lm.core.config import ConfigError, ModelConfig, band_dims, parse_character_filters, parse_layers_to_keep
from adaptive_lm.core.kernels import (
    add_dropout,
    causal_attention,
    cross_entropy_sum,
    dropout,
    linear_cross_entropy_sum,
    pad_rows,
    recompute_contexts,
)

KVCache = list[dict[str, Tensor]]


def complete_cutoff(cutoff: tuple[int, ...] | list[int], vocab_size: int) -> list[int]:
    """fairseq appends the vocabulary size as the last band's end unless it is already there."""
    cut = list(cutoff)
    if vocab_size > cut[-1]:
        cut.append(vocab_size)
    elif vocab_size < cut[-1]:
        raise ValueError(f"cutoff {cut[-1]} is larger than the vocabulary size {vocab_size}")
    return cut


def _linear_init_draw(out_features: int, in_features: int) -> None:
    """Consume the random numbers that building a bias-free ``nn.Linear(in_features, out_features)`` draws."""
    nn.init.kaiming_uniform_(torch.empty(out_features, in_features), a=math.sqrt(5))


def fairseq_linear(in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
    """fairseq's ``transformer_decoder.Linear``: an ``nn.Linear`` (its default init draws), re-drawn xavier_uniform,
    bias 0 (``project_in_dim`` / ``project_out_dim``)."""
    m = nn.Linear(in_features, out_features, bias)
    nn.init.xavier_uniform_(m.weight)
    if bias:
        nn.init.zeros_(m.bias)
    return m


def fp32(t: Tensor) -> Tensor:
    """Softmax and loss in at least fp32 (bf16/fp16 logits are upcast; fp64 stays fp64 for gradient checks)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


@torch.no_grad()
def quant_noise_(weight: Tensor, p: float, block_size: int) -> None:
    """fairseq's iPQ quant-noise (``fairseq/modules/quant_noise.py``) on an ``(out, in)`` weight matrix.

    In each row, blocks of ``block_size`` input weights are dropped with probability ``p`` and the rest scaled by
    1 / (1 - p), the mask drawn as fairseq draws it. Like fairseq's forward pre-hook this **replaces the
    parameter's data** (``weight.data = ...``, at every training forward): the weights keep the noised values and
    the optimizer updates those. fairseq applies it to the feed-forward layers, the adaptive-input projections and
    the extra embedding Linear; its attention (fast path) and its adaptive softmax (never given the setting) escape.
    """
    out_f, in_f = weight.shape
    mask = torch.zeros(in_f // block_size * out_f, device=weight.device).bernoulli_(p)
    mask = mask.repeat_interleave(block_size, -1).view(-1, in_f).bool()  # (out, in)
    weight.data = weight.data.masked_fill(mask, 0) * (1 / (1 - p))


def char_table(symbols: Sequence[str], max_chars: int = 50, nspecial: int = 4) -> Tensor:
    """(V, max_chars) long: each word's UTF-8 bytes + 1, zero-padded and cut at ``max_chars``; specials all zero
    (fairseq's ``CharacterTokenEmbedder.set_vocab``)."""
    table = torch.zeros(len(symbols), max_chars, dtype=torch.long)
    for i, word in enumerate(symbols):
        if i >= nspecial:
            b = list(word.encode("utf-8"))[:max_chars]
            table[i, : len(b)] = torch.tensor(b, dtype=torch.long) + 1
    return table


def route(ids: Tensor, cutoff: Sequence[int]) -> list[Tensor]:
    """Per band [c_{i-1}, c_i) of ``cutoff``, the positions of ``ids`` (flattened) that fall in it, in order.

    Why: the adaptive modules compute each band or tail only for its own rows, and finding those rows on a GPU
    (``nonzero``) makes the host wait for the device, once per band and micro-batch. The trainer calls this on the
    CPU copy of a batch while the previous update runs and passes the results (``Routes``), so nothing waits."""
    flat = ids.reshape(-1)
    band = torch.bucketize(flat, torch.tensor(list(cutoff), dtype=flat.dtype), right=True)  # (N,) band of each id
    order = torch.argsort(band, stable=True)
    counts = torch.bincount(band, minlength=len(cutoff)).tolist()
    return list(torch.split(order, counts[: len(cutoff)]))


class Routes:
    """Precomputed ``route``s of a batch's source tokens (adaptive input) and targets (adaptive softmax)."""

    def __init__(self, src: Tensor, target: Tensor, cfg: ModelConfig) -> None:
        V = cfg.vocab_size
        self.input = route(src, complete_cutoff(cfg.adaptive_input_cutoff, V)) if cfg.adaptive_input else None
        cut = cfg.adaptive_softmax_cutoff
        self.target = route(target, complete_cutoff(cut, V)) if cut is not None else None

    def to(self, device: torch.device, non_blocking: bool = False) -> Routes:
        for name in ("input", "target"):
            rows = getattr(self, name)
            if rows is not None:
                pin = non_blocking and torch.device(device).type == "cuda"  # asynchronous only from pinned memory
                setattr(
                    self, name, [(r.pin_memory() if pin else r).to(device, non_blocking=non_blocking) for r in rows]
                )
        return self


# =====================================================================================================
# Token embedders: adaptive input (Baevski & Auli 2018, section 3) and fairseq's character CNN
# =====================================================================================================
class AdaptiveInput(nn.Module):
    """Word embeddings whose width shrinks by ``factor`` per frequency band, each projected up to ``output_dim``.

    Band i covers ids [c_{i-1}, c_i) with an ``Embedding(size_i, initial_dim // factor**i)`` and a bias-free
    ``Linear(dim_i -> output_dim)``. Only band 0 has a padding row (fairseq >= Jan 2020); no scaling happens
    here (the decoder multiplies by sqrt(d)). ``q_noise`` > 0: fairseq's quant-noise on the projections (training).
    """

    def __init__(
        self,
        vocab_size: int,
        padding_idx: int,
        initial_dim: int,
        factor: float,
        output_dim: int,
        cutoff: tuple[int, ...] | list[int],
        q_noise: float = 0.0,
        qn_block_size: int = 8,
    ) -> None:
        super().__init__()
        self.cutoff = complete_cutoff(cutoff, vocab_size)
        self.vocab_size = vocab_size
        self.padding_idx = padding_idx
        self.embedding_dim = output_dim
        self.q_noise, self.qn_block_size = q_noise, qn_block_size
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

    def forward(self, tokens: Tensor, rows: list[Tensor] | None = None) -> Tensor:
        """``rows``: each band's positions (``route``), if already known; found here otherwise."""
        flat = tokens.reshape(-1)  # (N,)
        out: Tensor | None = None
        prev = 0
        for i, end in enumerate(self.cutoff):
            idx = rows[i] if rows is not None else ((flat >= prev) & (flat < end)).nonzero().squeeze(1)  # (N_i,)
            n = idx.numel()
            if n > 0:
                w = self.projections[i].weight
                if self.training and self.q_noise > 0:
                    quant_noise_(w, self.q_noise, self.qn_block_size)
                ids = pad_rows(flat.index_select(0, idx) - prev, w)  # (N_i',) maybe padded for the kernel
                band = self.projections[i](self.embeddings[i](ids))[:n]  # (N_i, d)
                if out is None:
                    out = band.new_zeros(flat.shape[0], self.embedding_dim)
                out = out.index_copy(0, idx, band.to(out.dtype))
            prev = end
        if out is None:  # empty input
            out = self.projections[0].weight.new_zeros(flat.shape[0], self.embedding_dim)
        return out.view(*tokens.shape, self.embedding_dim)  # (*tokens.shape, d)


class CharacterEmbedder(nn.Module):
    """fairseq's ``CharacterTokenEmbedder`` (the char-CNN input the paper compares adaptive input against): each
    word's UTF-8 bytes (+1, at most 50, zero-padded) are embedded, convolved by each (width, channels) filter,
    max-pooled over time, relu'd, concatenated, passed through highway layers and projected to ``word_dim``.
    ``<pad>`` gives zeros, ``</s>`` and ``<unk>`` learned vectors; other specials read as an empty word."""

    MAX_CHARS = 50

    def __init__(
        self, symbols: Sequence[str], filters: list[tuple[int, int]], char_dim: int, word_dim: int, highway: int
    ) -> None:
        super().__init__()
        self.embedding_dim = word_dim
        self.pad, self.eos, self.unk, nspecial = 1, 2, 3, 4  # fairseq's Dictionary specials
        # modules in fairseq's construction order, so their default init draws come in fairseq's order
        self.char_embeddings = nn.Embedding(257, char_dim, padding_idx=0)
        self.symbol_embeddings = nn.Parameter(torch.empty(2, word_dim))  # </s>, <unk>
        self.convolutions = nn.ModuleList(nn.Conv1d(char_dim, c, kernel_size=w) for w, c in filters)
        width = sum(c for _, c in filters)
        self.highway = nn.ModuleList(nn.Linear(width, 2 * width) for _ in range(highway))
        with torch.no_grad():  # fairseq's Highway.reset_parameters (in its constructor)
            for layer in self.highway:
                layer.bias[width:].fill_(1.0)  # bias the gate towards carrying the input
                layer.bias[:width].zero_()
                nn.init.xavier_normal_(layer.weight)
        self.projection = nn.Linear(width, word_dim)
        self.register_buffer("word_to_char", char_table(symbols, self.MAX_CHARS, nspecial), persistent=False)
        with torch.no_grad():  # fairseq's CharacterTokenEmbedder.reset_parameters
            nn.init.xavier_normal_(self.char_embeddings.weight)
            nn.init.xavier_normal_(self.symbol_embeddings)
            nn.init.xavier_uniform_(self.projection.weight)
            self.char_embeddings.weight[0].zero_()
            self.projection.bias.zero_()

    def forward(self, tokens: Tensor) -> Tensor:
        flat = tokens.reshape(-1)  # (N,)
        chars = self.char_embeddings(self.word_to_char[flat]).transpose(1, 2)  # (N, char_dim, 50)
        pooled = [F.relu(conv(chars).max(dim=-1).values) for conv in self.convolutions]  # (N, c_j) each
        x = torch.cat(pooled, dim=-1)  # (N, width)
        for layer in self.highway:
            h, gate = layer(x).chunk(2, dim=-1)
            gate = torch.sigmoid(gate)
            x = gate * x + (1 - gate) * F.relu(h)
        x = self.projection(x)  # (N, word_dim)
        x = torch.where(flat.eq(self.pad)[:, None], torch.zeros_like(x), x)
        x = torch.where(flat.eq(self.eos)[:, None], self.symbol_embeddings[0].to(x.dtype), x)
        x = torch.where(flat.eq(self.unk)[:, None], self.symbol_embeddings[1].to(x.dtype), x)
        return x.view(*tokens.shape, -1)  # (*tokens.shape, word_dim)


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

    def _tail_rows(self, i: int, x: Tensor, rows: Tensor) -> Tensor:
        """Tail i's logits for ``rows`` of x, with the row count padded as the matmul kernels like it."""
        padded = pad_rows(rows, self.tail_out[i])
        return self.tail_logits(i, x.index_select(0, padded))[: rows.numel()]  # (n, size_i)

    def split_targets(
        self, target: Tensor, routes: list[Tensor] | None = None
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor] | None]]:
        """fairseq's ``adapt_target``: head target (word or c0 + cluster) and per cluster (rows, local targets).
        ``routes``: each band's rows of ``target`` (``route``), if already known (no host sync then)."""
        target = target.reshape(-1)
        c0 = self.cutoff[0]
        head_target = torch.where(
            target < c0, target, c0 - 1 + torch.bucketize(target, self._bounds(target), right=True)
        )
        clusters: list[tuple[Tensor, Tensor] | None] = []
        for i in range(self.n_clusters):
            lo, hi = self.cutoff[i], self.cutoff[i + 1]
            rows = routes[i + 1] if routes is not None else ((target >= lo) & (target < hi)).nonzero().squeeze(1)
            clusters.append((rows, target.index_select(0, rows) - lo) if rows.numel() > 0 else None)
        return head_target, clusters

    def _bounds(self, like: Tensor) -> Tensor:
        """Tail cluster starts (c_0 .. c_{n-1}) as a tensor on ``like``'s device, cached."""
        key = (like.device, like.dtype)
        cache = self.__dict__.setdefault("_bounds_cache", {})
        if key not in cache:
            cache[key] = torch.tensor(self.cutoff[:-1], dtype=like.dtype, device=like.device)
        return cache[key]

    # ---- entry points --------------------------------------------------------------------------------
    def loss(
        self,
        hidden: Tensor,
        target: Tensor,
        ignore_index: int = 1,
        tail_ignore_quirk: bool = True,
        routes: list[Tensor] | None = None,
    ) -> Tensor:
        """Summed NLL in nats over non-``ignore_index`` targets (fairseq's ``adaptive_loss``).

        Dropout is applied to the input first (training mode only). ``tail_ignore_quirk`` reproduces fairseq's
        use of ``ignore_index`` on the *local* tail targets, which drops the within-cluster term of the words
        with id ``cutoff[i] + ignore_index`` (fairseq/criterions/adaptive_loss.py); False gives the exact NLL.
        """
        x = hidden.reshape(-1, hidden.shape[-1])  # (N, d)
        x = dropout(x, self.dropout, self.training)
        head_target, clusters = self.split_targets(target, routes)
        loss = cross_entropy_sum(fp32(self.head_logits(x)), head_target, ignore_index)
        tail_ignore = ignore_index if tail_ignore_quirk else -100
        for i, c in enumerate(clusters):
            if c is None:
                continue
            rows, local = c
            loss = loss + cross_entropy_sum(fp32(self._tail_rows(i, x, rows)), local, tail_ignore)
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
                tail = F.log_softmax(fp32(self._tail_rows(c, x, r)), dim=-1)  # (n, size_c)
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

    def forward(self, positions: Tensor, max_position: int | None = None) -> Tensor:
        """``max_position``: an upper bound of ``positions`` known on the host (else it is read from the device)."""
        if max_position is None:
            max_position = int(positions.max()) if positions.numel() else 0
        need = max_position + 1
        if need > self.weights.shape[0]:
            self.weights = sinusoidal_table(need, self.dim, self.padding_idx).to(self.weights.device)
        return self.weights.index_select(0, positions.reshape(-1)).view(*positions.shape, self.dim)


# =====================================================================================================
# Decoder layer
# =====================================================================================================
class SelfAttention(nn.Module):
    """Causal multi-head self-attention with a fused q/k/v projection (fairseq's four projections, with bias)."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.dim, self.heads, self.head_dim, self.dropout = dim, heads, dim // heads, dropout
        # no default init (its draws would break fairseq's order), on the current default device (meta when loading)
        self.qkv = nn.utils.skip_init(nn.Linear, dim, 3 * dim, device=torch.empty(0).device)
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
        self.fc1 = nn.Linear(d, cfg.decoder_ffn_embed_dim)
        self.fc2 = nn.Linear(cfg.decoder_ffn_embed_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.act_name = cfg.activation_fn
        self.act = ACTIVATION_FNS[cfg.activation_fn]
        self.dropout, self.act_dropout = cfg.dropout, cfg.act_dropout
        self.q_noise, self.qn_block_size = cfg.quant_noise_pq, cfg.quant_noise_pq_block_size

    def forward(self, x: Tensor, cache: dict[str, Tensor] | None = None) -> Tensor:
        h = self.self_attn(self.self_attn_layer_norm(x) if self.pre_ln else x, cache)  # (B, T, d)
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
        h = self.fc1(self.final_layer_norm(x) if self.pre_ln else x)  # (B, T, ffn)
        if self.act_name == "relu":  # relu(h) * keep == relu(h * keep) (keep >= 0): relu in place, one tensor fewer
            h = F.relu(dropout(h, self.act_dropout, self.training), inplace=self.training and self.act_dropout > 0)
        else:
            h = dropout(self.act(h), self.act_dropout, self.training)
        if self.ffn_layernorm is not None:
            h = self.ffn_layernorm(h)
        if noise:
            quant_noise_(self.fc2.weight, self.q_noise, self.qn_block_size)
        residual = x if self.w_resid is None else self.w_resid * x
        x = add_dropout(residual, self.fc2(h), self.dropout, self.training)  # (B, T, d)
        return x if self.pre_ln else self.final_layer_norm(x)


# =====================================================================================================
# The language model
# =====================================================================================================
def token_embedder(cfg: ModelConfig, symbols: Sequence[str] | None) -> nn.Module:
    """fairseq's ``TransformerLanguageModel.build_model``: the char CNN, else the adaptive input, else a plain
    ``Embedding`` (N(0, d^-0.5), padding row zero)."""
    V, pad, d = cfg.vocab_size, cfg.padding_idx, cfg.decoder_embed_dim
    if cfg.character_embeddings:
        if symbols is None or len(symbols) != V:
            raise ConfigError("character_embeddings needs the dictionary's words (TransformerLM(cfg, symbols))")
        filters = parse_character_filters(cfg.character_filters)
        return CharacterEmbedder(symbols, filters, cfg.character_embedding_dim, d, cfg.char_embedder_highway_layers)
    if cfg.adaptive_input:
        return AdaptiveInput(V, pad, int(cfg.decoder_input_dim), cfg.adaptive_input_factor, d,  # type: ignore[arg-type]
                             cfg.adaptive_input_cutoff, cfg.quant_noise_pq, cfg.quant_noise_pq_block_size)  # fmt: skip
    emb = nn.Embedding(V, int(cfg.decoder_input_dim), padding_idx=pad)  # type: ignore[arg-type]
    with torch.no_grad():
        nn.init.normal_(emb.weight, mean=0.0, std=emb.weight.shape[1] ** -0.5)
        emb.weight[pad].zero_()
    return emb


class TransformerLM(nn.Module):
    """fairseq's ``TransformerLanguageModel`` decoder. ``model(tokens)`` gives the features before the softmax.

    ``symbols`` (the dictionary's words, in id order) is needed only by the character-CNN embedder, which reads
    the words' bytes.
    """

    def __init__(self, cfg: ModelConfig, symbols: Sequence[str] | None = None) -> None:
        """Modules in fairseq's construction order (token embedder, then ``TransformerDecoder.__init__``'s order), so
        that their random initialisations draw in fairseq's order."""
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        d, pad = cfg.decoder_embed_dim, cfg.padding_idx
        self.padding_idx = pad
        self.embed_tokens = token_embedder(cfg, symbols)
        self.embed_scale = 1.0 if cfg.no_scale_embedding else math.sqrt(d)
        # fairseq: with quant-noise and no adaptive input, an extra (noised) Linear(d, d) after the embedding scale
        self.quant_noise = nn.Linear(d, d, bias=False) if cfg.quant_noise_pq > 0 and not cfg.adaptive_input else None
        in_dim = cfg.input_embed_dim
        self.project_in_dim = fairseq_linear(in_dim, d, bias=False) if in_dim != d else None
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
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        final_norm = cfg.decoder_normalize_before and not cfg.no_decoder_final_norm
        self.layer_norm = nn.LayerNorm(d) if final_norm else None
        d_out = cfg.decoder_output_dim
        self.project_out_dim = (
            fairseq_linear(d, d_out, bias=False) if d != d_out and not cfg.tie_adaptive_weights else None
        )
        self.adaptive_softmax: AdaptiveSoftmax | None = None
        self.output_projection: nn.Linear | None = None
        if cfg.adaptive_softmax_cutoff is not None:  # no quant-noise: fairseq's decoder does not pass it on
            tied = self.embed_tokens if cfg.tie_adaptive_weights else None
            self.adaptive_softmax = AdaptiveSoftmax(
                cfg.vocab_size, d_out, cfg.adaptive_softmax_cutoff, cfg.adaptive_softmax_dropout,
                cfg.adaptive_softmax_factor, tied, cfg.tie_adaptive_proj,  # type: ignore[arg-type]
            )  # fmt: skip
        elif cfg.share_decoder_input_output_embed:
            self.output_projection = nn.Linear(self.embed_tokens.weight.shape[1], cfg.vocab_size, bias=False)
            self.output_projection.weight = self.embed_tokens.weight
        else:
            self.output_projection = nn.Linear(d_out, cfg.vocab_size, bias=False)
            nn.init.normal_(self.output_projection.weight, mean=0.0, std=d_out**-0.5)

    # ---- features --------------------------------------------------------------------------------------
    def forward(
        self,
        src_tokens: Tensor,
        cache: KVCache | None = None,
        positions: Tensor | None = None,
        return_all_hiddens: bool = False,
        routes: Routes | None = None,
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """(B, T) token ids -> (B, T, d_out) features before the softmax.

        ``cache`` (one dict per layer, filled in place) makes each new call attend to the keys and values of
        the previous ones; ``positions`` then gives the new tokens' position ids. With ``return_all_hiddens``
        the states after the embedding and after every layer are returned too (fairseq's ``inner_states``).
        ``routes``: the batch's band positions computed in advance (``Routes``; the trainer does it on the CPU).
        """
        max_position = None
        if positions is None:
            positions = make_positions(src_tokens, self.padding_idx)  # (B, T)
            max_position = self.padding_idx + src_tokens.shape[-1]  # known without reading the device
        if routes is not None and routes.input is not None:
            x = self.embed_scale * self.embed_tokens(src_tokens, routes.input)  # (B, T, d)
        else:
            x = self.embed_scale * self.embed_tokens(src_tokens)  # (B, T, d_in)
        if self.quant_noise is not None:
            if self.training:
                quant_noise_(self.quant_noise.weight, self.cfg.quant_noise_pq, self.cfg.quant_noise_pq_block_size)
            x = self.quant_noise(x)
        if self.project_in_dim is not None:
            x = self.project_in_dim(x)  # (B, T, d)
        if isinstance(self.embed_positions, SinusoidalPositions):
            x = x + self.embed_positions(positions, max_position).to(x.dtype)
        elif self.embed_positions is not None:
            x = x + self.embed_positions(positions).to(x.dtype)
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        x = dropout(x, self.cfg.dropout, self.training)
        states = [x]
        for i, layer in self.active_layers():
            x = self.run_layer(layer, x, cache[i] if cache is not None else None)  # (B, T, d)
            states.append(x)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        if self.project_out_dim is not None:
            x = self.project_out_dim(x)  # (B, T, d_out)
        return (x, states) if return_all_hiddens else x

    def active_layers(self) -> list[tuple[int, DecoderLayer]]:
        """All layers, or in training with ``decoder_layerdrop`` p the ones whose fresh uniform draw exceeds p
        (fairseq's ``LayerDropModuleList``: one draw per layer when the loop starts)."""
        layers = list(enumerate(self.layers))
        if self.cfg.decoder_layerdrop > 0 and self.training:
            u = torch.empty(len(layers)).uniform_()
            layers = [pair for pair, ui in zip(layers, u.tolist()) if ui > self.cfg.decoder_layerdrop]
        return layers  # type: ignore[return-value]

    def run_layer(self, layer: DecoderLayer, x: Tensor, cache: dict[str, Tensor] | None) -> Tensor:
        """One layer; with ``checkpoint_activations`` (training) its activations are recomputed in backward
        instead of kept (the RNG state is restored, so dropout draws the same masks), and with
        ``offload_activations`` the layer inputs it keeps wait in CPU memory."""
        if not (self.cfg.checkpoint_activations and self.training and torch.is_grad_enabled()):
            return layer(x, cache)
        offload = self.cfg.offload_activations and x.device.type != "cpu"
        with torch.autograd.graph.save_on_cpu(pin_memory=True) if offload else contextlib.nullcontext():
            return checkpoint(layer, x, cache, use_reentrant=False, context_fn=recompute_contexts)

    def tie_weights(self) -> None:
        """Make tied tensors one Parameter again (loading with ``assign=True`` replaces each name separately)."""
        if self.adaptive_softmax is not None and isinstance(self.embed_tokens, AdaptiveInput):
            self.adaptive_softmax.tie_to(self.embed_tokens)
        if self.output_projection is not None and self.cfg.share_decoder_input_output_embed:
            self.output_projection.weight = self.embed_tokens.weight

    def materialize_buffers(self, device: torch.device | str = "cpu", symbols: Sequence[str] | None = None) -> None:
        """Rebuild non-persistent buffers (the sinusoidal table, the char CNN's byte table) after building on the
        meta device."""
        if isinstance(self.embed_positions, SinusoidalPositions):
            e = self.embed_positions
            e.weights = sinusoidal_table(e.weights.shape[0], e.dim, e.padding_idx).to(device)
        if isinstance(self.embed_tokens, CharacterEmbedder) and self.embed_tokens.word_to_char.is_meta and symbols:
            self.embed_tokens.word_to_char = char_table(symbols, CharacterEmbedder.MAX_CHARS).to(device)

    def new_cache(self) -> KVCache:
        return [{} for _ in self.layers]

    # ---- outputs -------------------------------------------------------------------------------------
    def log_probs_from_features(self, x: Tensor, temperature: float = 1.0) -> Tensor:
        """The full ln p over the vocabulary (..., V). ``temperature`` divides what fairseq's generator divides: the
        features before an adaptive softmax, the logits of a plain output layer."""
        if self.adaptive_softmax is not None:
            return self.adaptive_softmax.log_prob(x / temperature if temperature != 1.0 else x)
        logits = self.output_projection(x)  # type: ignore[misc]  # (..., V)
        if temperature != 1.0:
            logits = logits / temperature
        return F.log_softmax(fp32(logits), dim=-1)

    def target_log_probs_from_features(self, x: Tensor, target: Tensor, chunk_elements: int = 1 << 24) -> Tensor:
        """log p(target) at every position, the full softmax in row chunks of at most ``chunk_elements`` logits."""
        if self.adaptive_softmax is not None:
            return self.adaptive_softmax.target_log_prob(x, target, chunk_elements)
        flat, t = x.reshape(-1, x.shape[-1]), target.reshape(-1)
        step = max(1, chunk_elements // self.cfg.vocab_size)
        out = [
            F.log_softmax(fp32(self.output_projection(flat[i : i + step])), dim=-1)  # type: ignore[misc]
            .gather(1, t[i : i + step, None])
            .squeeze(1)
            for i in range(0, flat.shape[0], step)
        ]
        return (torch.cat(out) if out else flat.new_zeros(0)).view(target.shape)

    def log_probs(self, src_tokens: Tensor) -> Tensor:
        """(B, T) -> (B, T, V) natural-log next-token distribution at every position."""
        return self.log_probs_from_features(self(src_tokens))

    def target_log_probs(self, src_tokens: Tensor, target: Tensor) -> Tensor:
        """(B, T), (B, T) -> (B, T) log p(target_t | src_<=t), without a (B*T, V) tensor when adaptive."""
        return self.target_log_probs_from_features(self(src_tokens), target)

    def loss(self, src_tokens: Tensor, target: Tensor, tail_ignore_quirk: bool = True) -> Tensor:
        """Summed NLL (nats) over non-pad targets: fairseq's ``adaptive_loss`` (or cross-entropy without it)."""
        return self.loss_from_features(self(src_tokens), target, tail_ignore_quirk)

    def loss_from_features(
        self, x: Tensor, target: Tensor, tail_ignore_quirk: bool = True, routes: Routes | None = None
    ) -> Tensor:
        """``loss`` on features already computed (the trainer runs the forward pass itself, maybe compiled)."""
        if self.adaptive_softmax is not None:
            rows = routes.target if routes is not None else None
            return self.adaptive_softmax.loss(x, target, self.padding_idx, tail_ignore_quirk, rows)
        w = self.output_projection.weight  # type: ignore[union-attr]
        return linear_cross_entropy_sum(x.reshape(-1, x.shape[-1]), w, target.reshape(-1), self.padding_idx)

    def num_parameters(self) -> int:
        """Unique parameters (tied tensors once), the way fairseq and the paper count them."""
        return sum(p.numel() for p in self.parameters())


def prune_layers(state_dict: dict[str, Tensor], layers_to_keep: str | None) -> dict[str, Tensor]:
    """fairseq's ``checkpoint_utils.prune_state_dict``: keep only the listed layers of a stored model, renumbered
    0, 1, ... in order (a LayerDrop-trained model evaluated with fewer layers); other keys pass unchanged."""
    keep = parse_layers_to_keep(layers_to_keep)
    if keep is None:
        return state_dict
    mapping = {str(old): str(new) for new, old in enumerate(keep)}
    out = {}
    for k, v in state_dict.items():
        parts = k.split(".")
        if "layers" not in parts[:-1]:
            out[k] = v
            continue
        i = parts.index("layers") + 1
        if parts[i] in mapping:
            parts[i] = mapping[parts[i]]
            out[".".join(parts)] = v
    return out


def build_model(arch: str, vocab_size: int, **overrides: object) -> TransformerLM:
    """A freshly initialised model of a preset (``transformer_lm_wiki103``, ``tiny``, ...) with overrides."""
    from adaptive_lm.core.config import make_config

    return TransformerLM(make_config(arch, vocab_size, **overrides))
