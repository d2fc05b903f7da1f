"""The adaptive softmax (Grave et al. 2017, as in fairseq): a head over the frequent words plus one logit per tail
cluster, each tail computed only for its own rows, optionally tied to the adaptive input's bands."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from adaptive_lm.core.kernels import (
    Linear,
    block_weight,
    cross_entropy_sum,
    dropout,
    linear,
    log_softmax_,
    pad_rows,
)
from adaptive_lm.core.model.adaptive import AdaptiveInput, complete_cutoff
from adaptive_lm.core.model.init import _linear_init_draw

# Logits per chunk when scoring targets: 16 MiB of fp32, so a chunk stays in a server's L3 between its matmul and
# its softmax, and below glibc's 32 MiB mmap ceiling (``core.malloc``): a larger block is fresh pages, faulted in
# again for every chunk of every batch (WikiText-103's 20,002-way head at the old 2^24: 64 MiB chunks).
CHUNK_ELEMENTS = 1 << 22


def fp32(t: Tensor) -> Tensor:
    """Softmax and loss in at least fp32 (bf16/fp16 logits are upcast; fp64 stays fp64 for gradient checks)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _check_args(cutoff: list[int], input_dim: int, factor: float, dropout: float, tied: Any, tie_proj: bool) -> None:
    """What the constructor cannot build, or what would fail only at the first forward: one message each."""
    if tied is not None and not isinstance(tied, AdaptiveInput):
        raise TypeError(f"adaptive_input must be an AdaptiveInput to tie to, not {type(tied).__name__}")
    if not factor > 0 or input_dim < 1:
        raise ValueError(f"factor {factor} and input_dim {input_dim} must be positive")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout {dropout} must be in [0, 1)")
    if tied is not None:  # the tails' widths are the adaptive input's bands (as fairseq's): ``factor`` is not used
        proj = tied.weights_for_band(0)[1]
        if tie_proj and len(cutoff) > 1 and proj.shape[0] != input_dim:
            raise ValueError(f"input_dim {input_dim} differs from the adaptive input's output_dim {proj.shape[0]}: "
                             "tied projections need the same width")  # fmt: skip
        return
    for i in range(1, len(cutoff)):
        dim = int(input_dim // factor**i)
        if dim < 1:
            raise ValueError(f"tail {i} would be {dim} wide ({input_dim} divided by {factor:g}**{i}): lower the factor "
                             "or use fewer cutoffs")  # fmt: skip


def _check_features(hidden: Tensor, input_dim: int) -> None:
    """Features of the width the head was built for (a shape error inside a matmul otherwise)."""
    if hidden.dim() < 1 or hidden.shape[-1] != input_dim:
        raise ValueError(f"features of shape {tuple(hidden.shape)}: the last dimension must be the adaptive softmax's "
                         f"input_dim {input_dim}")  # fmt: skip


def _check_targets(rows: int, target: Tensor, vocab_size: int, ignore: int | None) -> None:
    """One integer target per row, each a word of the vocabulary (or ``ignore``): a shorter target list or an id
    past the last cluster would give a number without a word (the loss counted such an id as its last cluster).
    The values are checked on the CPU only (on a GPU the check would wait for the device)."""
    if rows != target.numel():
        raise ValueError(f"{target.numel()} targets for {rows} rows of features: one per row")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise ValueError(f"targets of dtype {target.dtype}: word ids are integers (torch.long)")
    if target.device.type != "cpu" or not target.numel():
        return
    lo, hi = (int(v) for v in torch.aminmax(target))
    if lo >= 0 and hi < vocab_size:
        return
    flat = target.reshape(-1)
    kept = flat if ignore is None else flat[flat != ignore]
    if bool(((kept < 0) | (kept >= vocab_size)).any()):
        lo, hi = (int(v) for v in torch.aminmax(kept))
        raise ValueError(f"target ids from {lo} to {hi}: outside the vocabulary [0, {vocab_size})")


class AdaptiveSoftmax(nn.Module):
    """Head over the ``c_0`` frequent words plus one logit per tail cluster; tail i = proj, dropout, out.

    Tail i (of ``n_clusters``) is ``input_dim // factor**(i + 1)`` wide. With ``adaptive_input`` given, the word
    head and every tail's output matrix *are* the adaptive input's band embeddings, so the tails are as wide as its
    bands and ``factor`` is not used (as in fairseq), and with ``tie_proj`` the tail projections are its band
    projections (transposed use; ``input_dim`` must then be its ``output_dim``). Tail projections are stored as
    ``[input_dim, dim]`` (applied as ``x @ P``) whether tied or not, so one code path serves both; the fairseq
    loader transposes untied ones. ``dropout`` in [0, 1) (training only): on the input of ``loss``, and inside
    every tail between projection and output. fairseq's ``q_noise`` is not taken: its transformer_lm never passes
    it to the adaptive softmax.
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
        _check_args(self.cutoff, input_dim, factor, dropout, adaptive_input, tie_proj)
        self.vocab_size = vocab_size
        self.input_dim = input_dim
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
                self.head_in_proj = Linear(input_dim, self.word_weight.shape[1], bias=False)
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
                dim = emb.shape[1]  # fairseq: Linear(proj.size(0), proj.size(1)) into the tied embedding's width
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
    def head_weight(self) -> Tensor:
        """[word_weight; class_weight] (c0 + nc, d): the untied or tied-without-projection head as one matrix (made
        once per block inside ``packed_weights``, so that it is packed like a parameter)."""
        parts = (self.word_weight, self.class_weight)
        return block_weight(parts, lambda: torch.cat(parts))  # (c0 + nc, d)

    def head_logits(self, x: Tensor, weight: Tensor | None = None) -> Tensor:
        """(N, d) -> (N, c0 + n_clusters): frequent-word logits, then one logit per tail cluster. ``weight``: the
        ``head_weight()`` already made (scoring in chunks concatenates it once, not per chunk)."""
        if self.head_in_proj is None:
            return linear(x, self.head_weight() if weight is None else weight)  # (N, c0 + nc)
        words = linear(self.head_in_proj(x), self.word_weight)  # (N, c0)
        return torch.cat([words, linear(x, self.class_weight)], dim=-1)

    def tail_logits(self, i: int, x: Tensor) -> Tensor:
        """(N_i, d) -> (N_i, size_i) for tail cluster i (dropout between projection and output, as fairseq)."""
        h = dropout(x @ self.tail_proj[i], self.dropout, self.training)  # (N_i, dim_i)
        return linear(h, self.tail_out[i])  # (N_i, size_i)

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
        tail_ignore_quirk: bool = False,
        routes: list[Tensor] | None = None,
    ) -> Tensor:
        """Summed NLL in nats over non-``ignore_index`` targets: the exact one by default.

        Dropout is applied to the input first (training mode only). ``tail_ignore_quirk=True`` reproduces fairseq's
        ``adaptive_loss``, which applies ``ignore_index`` to the *local* tail targets and so drops the within-cluster
        term of the words with id ``cutoff[i] + ignore_index`` (fairseq/criterions/adaptive_loss.py): the trainer and
        validation turn it on for fairseq's numbers (``--criterion adaptive_loss``); a reused module should not.
        Without the quirk a target equal to ``ignore_index`` is left out whatever its value (with it, as in fairseq,
        only below ``cutoff[0]``). ``hidden`` (..., input_dim) with ``target`` (...) of the same number of rows, e.g.
        (B, T, d) and (B, T) or (B * T, d) and (B * T,). Target ids outside [0, V) are refused on the CPU.
        """
        _check_features(hidden, self.input_dim)
        x = hidden.reshape(-1, hidden.shape[-1])  # (N, d)
        quirk_past_vocab = tail_ignore_quirk and ignore_index >= self.vocab_size  # fairseq fails on such a target
        # with ``routes`` (the trainer's loader made them from data checked when loaded) the ids are not read again:
        # that read is a host sync, which the GPU path must not have inside an update
        if routes is None:
            _check_targets(x.shape[0], target, self.vocab_size, None if quirk_past_vocab else ignore_index)
        elif x.shape[0] != target.numel():
            raise ValueError(f"{target.numel()} targets for {x.shape[0]} rows of features: one per row")
        x = dropout(x, self.dropout, self.training)
        head_target, clusters = self.split_targets(target, routes)
        drop = None
        if not tail_ignore_quirk and ignore_index >= self.cutoff[0]:  # an ignored id among the tails or past them
            drop = target.reshape(-1) == ignore_index  # (N,)
            head_target = head_target.masked_fill(drop, ignore_index)
        loss = cross_entropy_sum(fp32(self.head_logits(x)), head_target, ignore_index)
        tail_ignore = ignore_index if tail_ignore_quirk else -100
        for i, c in enumerate(clusters):
            if c is None:
                continue
            rows, local = c
            if drop is not None:
                local = local.masked_fill(drop.index_select(0, rows), tail_ignore)
            loss = loss + cross_entropy_sum(fp32(self._tail_rows(i, x, rows)), local, tail_ignore)
        return loss

    def log_prob(self, hidden: Tensor) -> Tensor:
        """(..., input_dim) -> (..., V): the full natural-log distribution (fairseq's ``get_log_prob``, target=None).
        No dropout on the input; in training mode the tails' dropout applies, as in fairseq's."""
        _check_features(hidden, self.input_dim)
        shape = hidden.shape[:-1]
        x = hidden.reshape(-1, hidden.shape[-1])  # (N, d)
        head = log_softmax_(fp32(self.head_logits(x)))  # (N, c0 + nc)
        c0 = self.cutoff[0]
        out = head.new_empty(x.shape[0], self.vocab_size)  # (N, V): each part written in place, no concatenation
        out[:, :c0] = head[:, :c0]
        for i in range(self.n_clusters):
            tail = log_softmax_(fp32(self.tail_logits(i, x)))  # (N, size_i)
            part = out[:, self.cutoff[i] : self.cutoff[i + 1]]  # (N, size_i), a view of out
            if torch.is_grad_enabled() and (tail.requires_grad or head.requires_grad):
                part.copy_(tail + head[:, c0 + i : c0 + i + 1])  # differentiable (out= is not)
            else:
                torch.add(tail, head[:, c0 + i : c0 + i + 1], out=part)  # no temporary
        return out.view(*shape, self.vocab_size)  # (..., V)

    def target_log_prob(self, hidden: Tensor, target: Tensor, chunk_elements: int = CHUNK_ELEMENTS) -> Tensor:
        """log p(target) for every position, computing each tail only for its own rows, in row chunks of at most
        ``chunk_elements`` logits: memory stays bounded whatever the number of tokens and the vocabulary size.
        (..., input_dim), (...) -> (...); no dropout on the input, the tails' in training mode (as ``log_prob``)."""
        _check_features(hidden, self.input_dim)
        shape = target.shape
        x = hidden.reshape(-1, hidden.shape[-1])  # (N, d)
        _check_targets(x.shape[0], target, self.vocab_size, None)
        head_target, clusters = self.split_targets(target)
        out = torch.empty(
            x.shape[0], dtype=torch.float64 if x.dtype == torch.float64 else torch.float32, device=x.device
        )
        step = max(1, chunk_elements // self.head_size)
        weight = self.head_weight() if self.head_in_proj is None else None
        for i in range(0, x.shape[0], step):
            head = log_softmax_(fp32(self.head_logits(x[i : i + step], weight)))  # (n, c0 + nc)
            out[i : i + step] = head.gather(1, head_target[i : i + step, None]).squeeze(1)
        for c, cl in enumerate(clusters):
            if cl is None:
                continue
            rows, local = cl
            step = max(1, chunk_elements // (self.cutoff[c + 1] - self.cutoff[c]))
            for i in range(0, rows.numel(), step):
                r = rows[i : i + step]
                tail = log_softmax_(fp32(self._tail_rows(c, x, r)))  # (n, size_c)
                out.index_add_(0, r, tail.gather(1, local[i : i + step, None]).squeeze(1).to(out.dtype))
        return out.view(shape)
