"""Token embedders and positions: fairseq's character CNN, the choice between it, the adaptive input and a plain
embedding, and the sinusoidal positions (learned ones are a plain ``nn.Embedding``, built in ``lm``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaptive_lm.core.config import ConfigError, ModelConfig, parse_character_filters
from adaptive_lm.core.kernels import Linear
from adaptive_lm.core.model.adaptive import AdaptiveInput


def derived_buffer(shape: tuple[int, ...], dtype: torch.dtype, make: Callable[[], Tensor]) -> Tensor:
    """A buffer computed from the configuration: ``make()``, or on the meta device (building a model to load into)
    an empty tensor of ``shape``, which ``TransformerLM.materialize_buffers`` fills after loading. Why not compute it
    on meta: there these ops run through Python references that import TorchDynamo (0.7 s of every command)."""
    if torch.empty(0).device.type == "meta":
        return torch.empty(shape, dtype=dtype)
    return make()


def char_table(symbols: Sequence[str], max_chars: int = 50, nspecial: int = 4) -> Tensor:
    """(V, max_chars) long: each word's UTF-8 bytes + 1, zero-padded and cut at ``max_chars``; specials all zero
    (fairseq's ``CharacterTokenEmbedder.set_vocab``)."""
    table = torch.zeros(len(symbols), max_chars, dtype=torch.long)
    for i, word in enumerate(symbols):
        if i >= nspecial:
            b = list(word.encode("utf-8"))[:max_chars]
            table[i, : len(b)] = torch.tensor(b, dtype=torch.long) + 1
    return table


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
        self.highway = nn.ModuleList(Linear(width, 2 * width) for _ in range(highway))
        with torch.no_grad():  # fairseq's Highway.reset_parameters (in its constructor)
            for layer in self.highway:
                layer.bias[width:].fill_(1.0)  # bias the gate towards carrying the input
                layer.bias[:width].zero_()
                nn.init.xavier_normal_(layer.weight)
        self.projection = Linear(width, word_dim)
        shape = (len(symbols), self.MAX_CHARS)
        table = derived_buffer(shape, torch.long, lambda: char_table(symbols, self.MAX_CHARS, nspecial))
        self.register_buffer("word_to_char", table, persistent=False)  # (V, 50)
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
        table = derived_buffer((init_size, dim), torch.float, lambda: sinusoidal_table(init_size, dim, padding_idx))
        self.register_buffer("weights", table, persistent=False)  # (init_size, dim)

    def forward(self, positions: Tensor, max_position: int | None = None) -> Tensor:
        """``max_position``: an upper bound of ``positions`` known on the host (else it is read from the device)."""
        if max_position is None:
            max_position = int(positions.max()) if positions.numel() else 0
        need = max_position + 1
        if need > self.weights.shape[0]:
            self.weights = sinusoidal_table(need, self.dim, self.padding_idx).to(self.weights.device)
        return self.weights.index_select(0, positions.reshape(-1)).view(*positions.shape, self.dim)
