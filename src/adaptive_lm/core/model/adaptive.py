"""Adaptive input (Baevski & Auli 2018, section 3): word embeddings whose width shrinks per frequency band, and
the routing of token ids to their bands that the adaptive input and the adaptive softmax share."""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from adaptive_lm.core.config import ModelConfig, band_dims
from adaptive_lm.core.kernels import Linear, block_weight, pad_rows, weights_fixed
from adaptive_lm.core.model.init import quant_noise_


def complete_cutoff(cutoff: tuple[int, ...] | list[int], vocab_size: int) -> list[int]:
    """fairseq appends the vocabulary size as the last band's end unless it is already there."""
    if isinstance(cutoff, (str, bytes)) or not isinstance(cutoff, Iterable):
        raise ValueError(f"cutoff {cutoff!r}: a list of strictly increasing positive integers, e.g. [20000, 60000]")
    cut = list(cutoff)
    if (
        not cut
        or not all(isinstance(c, numbers.Integral) and not isinstance(c, bool) for c in cut)
        or cut != sorted(set(cut))
    ):
        raise ValueError(f"cutoff {cut}: strictly increasing positive integers, e.g. [20000, 60000]")
    if cut[0] <= 0:
        raise ValueError(f"cutoff {cut}: the first band must hold at least one word")
    if vocab_size > cut[-1]:
        cut.append(vocab_size)
    elif vocab_size < cut[-1]:
        raise ValueError(f"cutoff {cut[-1]} is larger than the vocabulary size {vocab_size}")
    return cut


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


def _check_padding_and_noise(padding_idx: int | None, band0: int, q_noise: float, block: int, dims: list[int]) -> None:
    """What ``nn.Embedding`` asserts about band 0's padding row and what fairseq's quant-noise asserts (or divides by
    zero on), as one ``ValueError`` each at construction instead of an assertion or a shape error in training."""
    integral = isinstance(padding_idx, numbers.Integral) and not isinstance(padding_idx, bool)
    if padding_idx is not None and (not integral or not -band0 <= padding_idx < band0):
        raise ValueError(f"padding_idx {padding_idx!r} is not an id of the first band [0, {band0}) (cutoff[0] = "
                         f"{band0}): the padding row lives in band 0; pass a smaller padding_idx, a larger first "
                         "cutoff, or None for no padding row")  # fmt: skip
    if not 0.0 <= q_noise < 1.0:
        raise ValueError(f"q_noise {q_noise} must be in [0, 1) (the kept weights are divided by 1 - q_noise)")
    if q_noise > 0:
        if not isinstance(block, numbers.Integral) or block < 1:
            raise ValueError(f"qn_block_size {block!r} must be a positive integer")
        bad = [d for d in dims if d % block]
        if bad:
            raise ValueError(f"qn_block_size {block} does not divide the band widths {bad} (bands {dims}): quant-noise "
                             "drops whole blocks of each projection's inputs (fairseq asserts it); choose a block "
                             "size that divides every band's width")  # fmt: skip


class AdaptiveInput(nn.Module):
    """Word embeddings whose width shrinks by ``factor`` per frequency band, each projected up to ``output_dim``.

    Band i covers ids [c_{i-1}, c_i) with an ``Embedding(size_i, initial_dim // factor**i)`` and a bias-free
    ``Linear(dim_i -> output_dim)``. Only band 0 has a padding row (fairseq >= Jan 2020): ``padding_idx`` must be
    one of its ids (negative ones count from its end, as ``nn.Embedding``'s), or None for no padding row (fairseq's
    init would zero every embedding then). No scaling happens here (the decoder multiplies by sqrt(d)).
    ``q_noise`` in [0, 1): fairseq's quant-noise on the projections (training); ``qn_block_size`` must divide every
    band's width then, as fairseq asserts. ``cutoff``: strictly increasing, the last at most ``vocab_size`` (which is
    appended unless it is the last already).
    """

    def __init__(
        self,
        vocab_size: int,
        padding_idx: int | None,
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
        if not factor > 0 or min(initial_dim, output_dim) < 1:
            raise ValueError(f"factor {factor} and dims {initial_dim}, {output_dim} must be positive")
        self.dims = band_dims(initial_dim, factor, len(self.cutoff))
        if min(self.dims) < 1:
            raise ValueError(f"bands {self.dims} wide ({initial_dim} divided by {factor:g} per band): every band "
                             "needs at least one dimension; lower the factor or use fewer cutoffs")  # fmt: skip
        _check_padding_and_noise(padding_idx, self.cutoff[0], q_noise, qn_block_size, self.dims)
        self.embeddings = nn.ModuleList()
        self.projections = nn.ModuleList()
        prev = 0
        for i, end in enumerate(self.cutoff):
            size, dim = end - prev, self.dims[i]
            self.embeddings.append(nn.Embedding(size, dim, padding_idx=padding_idx if i == 0 else None))
            self.projections.append(Linear(dim, output_dim, bias=False))
            prev = end
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """fairseq: N(0, dim^-0.5) embeddings with row ``padding_idx`` zeroed in *every* band that has that row (a
        band too small for it is where fairseq's init fails); xavier projections."""
        pad = self.padding_idx
        for emb, proj in zip(self.embeddings, self.projections):
            nn.init.normal_(emb.weight, mean=0.0, std=emb.weight.shape[1] ** -0.5)
            if pad is not None and -emb.weight.shape[0] <= pad < emb.weight.shape[0]:
                emb.weight[pad].zero_()
            nn.init.xavier_uniform_(proj.weight)

    def weights_for_band(self, band: int) -> tuple[Tensor, Tensor]:
        """(embedding [size, dim], projection [output_dim, dim]) of a band: what the adaptive softmax ties to."""
        return self.embeddings[band].weight, self.projections[band].weight

    TABLE_MAX_BYTES = 64 << 20  # the largest whole-vocabulary table kept for inference (a wiki103 model's: 1.1 GB)

    def table(self) -> Tensor:
        """(V, output_dim): every word's projected embedding, band by band."""
        return torch.cat([proj(emb.weight) for emb, proj in zip(self.embeddings, self.projections)])  # (V, d)

    def forward(self, tokens: Tensor, rows: list[Tensor] | None = None) -> Tensor:
        """``rows``: each band's positions (``route``), if already known; found here otherwise.

        Inference inside ``packed_weights`` (no gradients, fp32, the table at most ``TABLE_MAX_BYTES``): one lookup
        in ``table()``, made once per block. Why: decoding embeds 80 tokens a step, and routing them to their bands
        (a mask, a nonzero, a gather, a lookup, a projection and a scatter per band) cost 190 us of the fixture
        model's 2.8 ms step; the table's rows are the same products, computed for all rows at once."""
        flat = tokens.reshape(-1)  # (N,)
        w0 = self.projections[0].weight
        if (
            not self.training
            and weights_fixed()
            and not torch.is_grad_enabled()
            and w0.dtype == torch.float32
            and not torch.is_autocast_enabled(w0.device.type)
            and self.vocab_size * self.embedding_dim * 4 <= self.TABLE_MAX_BYTES
        ):
            lo, hi = torch.aminmax(flat) if flat.numel() else (flat.new_zeros(()), flat.new_zeros(()))
            if int(lo) < 0 or int(hi) >= self.vocab_size:
                bad = int(((flat < 0) | (flat >= self.vocab_size)).sum())
                raise ValueError(f"{bad} token ids outside the vocabulary [0, {self.vocab_size})")
            sources = (*(e.weight for e in self.embeddings), *(p.weight for p in self.projections))
            table = block_weight(sources, self.table)  # (V, d)
            return table.index_select(0, flat).view(*tokens.shape, self.embedding_dim)  # (*tokens.shape, d)
        out: Tensor | None = None
        prev, covered = 0, 0
        for i, end in enumerate(self.cutoff):
            idx = rows[i] if rows is not None else ((flat >= prev) & (flat < end)).nonzero().squeeze(1)  # (N_i,)
            n = idx.numel()
            if n > 0:
                w = self.projections[i].weight
                if self.training and self.q_noise > 0:
                    quant_noise_(w, self.q_noise, self.qn_block_size)
                ids = pad_rows(flat.index_select(0, idx) - prev, w)  # (N_i',) maybe padded for the kernel
                band = self.projections[i](self.embeddings[i](ids))[:n]  # (N_i, d)
                if out is None:  # the bands cover every position once: nothing to zero first
                    out = band.new_empty(flat.shape[0], self.embedding_dim)
                out.index_copy_(0, idx, band.to(out.dtype))  # in place: one (N, d) tensor, not one per band
            prev, covered = end, covered + n
        if covered != flat.shape[0]:
            raise ValueError(f"{flat.shape[0] - covered} token ids outside the vocabulary [0, {self.vocab_size})")
        if out is None:  # empty input
            out = self.projections[0].weight.new_zeros(flat.shape[0], self.embedding_dim)
        return out.view(*tokens.shape, self.embedding_dim)  # (*tokens.shape, d)
