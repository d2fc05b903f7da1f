"""The language model: fairseq's ``TransformerLanguageModel`` decoder (embedding, layers, adaptive softmax or output
projection), how a pruned checkpoint's layers are renumbered, and a model from a preset."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from adaptive_lm.core.config import ModelConfig, parse_layers_to_keep
from adaptive_lm.core.errors import ConfigError
from adaptive_lm.core.kernels import Linear, dropout, linear_cross_entropy_sum, log_softmax_, recompute_contexts
from adaptive_lm.core.model.adaptive import AdaptiveInput, Routes
from adaptive_lm.core.model.embed import (
    CharacterEmbedder,
    SinusoidalPositions,
    char_table,
    make_positions,
    sinusoidal_table,
    token_embedder,
)
from adaptive_lm.core.model.init import fairseq_linear, quant_noise_
from adaptive_lm.core.model.layer import DecoderLayer, LayerCache
from adaptive_lm.core.model.softmax import CHUNK_ELEMENTS, AdaptiveSoftmax, fp32
from adaptive_lm.core.presets import make_config

KVCache = list[dict[str, Tensor]]


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
        self.quant_noise = Linear(d, d, bias=False) if cfg.quant_noise_pq > 0 and not cfg.adaptive_input else None
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
            self.output_projection = Linear(self.embed_tokens.weight.shape[1], cfg.vocab_size, bias=False)
            self.output_projection.weight = self.embed_tokens.weight
        else:
            self.output_projection = Linear(d_out, cfg.vocab_size, bias=False)
            nn.init.normal_(self.output_projection.weight, mean=0.0, std=d_out**-0.5)

    # ---- features --------------------------------------------------------------------------------------
    def _positions(self, src_tokens: Tensor) -> tuple[Tensor, int]:
        """(B, T) position ids of whole sequences, and the largest (known without reading the device); a sequence
        longer than a learned table is refused (its lookup would fail with an index error)."""
        T = src_tokens.shape[-1]
        if isinstance(self.embed_positions, nn.Embedding) and self.cfg.max_target_positions < T:
            raise ValueError(f"{T} positions: more than the {self.cfg.max_target_positions} of the learned table")
        return make_positions(src_tokens, self.padding_idx), self.padding_idx + T  # (B, T)

    def forward(
        self,
        src_tokens: Tensor,
        cache: KVCache | None = None,
        positions: Tensor | None = None,
        return_all_hiddens: bool = False,
        routes: Routes | None = None,
        keep_from: int = 0,
        prefix_lens: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """(B, T) token ids -> (B, T, d_out) features before the softmax ((B, T - keep_from, d_out) with ``keep_from``).

        ``cache`` (one dict per layer, filled in place) makes each new call attend to the keys and values of
        the previous ones; ``positions`` then gives the new tokens' position ids. With ``return_all_hiddens``
        the states after the embedding and after every layer are returned too (fairseq's ``inner_states``).
        ``routes``: the batch's band positions computed in advance (``Routes``; the trainer does it on the CPU).
        ``keep_from``: only the features of positions ``keep_from`` on are wanted (evaluation with a context
        window scores only the block after its context): the last layer then computes the queries, feed-forward
        and final norms of those positions alone (every earlier layer still runs on all of them, whose keys and
        values the kept positions attend to), and (B, T - keep_from, d_out) comes back. About a quarter of a
        2-layer model's work at ``--context-window`` = half the block.
        ``prefix_lens`` (B,): the rows continue prefixes of different lengths; each layer's cache holds P positions
        per row, of which row b's first ``prefix_lens[b]`` are its own (the rest padding), and ``positions`` gives
        the new tokens' positions (rescoring after shared prefixes: ``inference.scoring``).
        """
        if keep_from and (cache is not None or return_all_hiddens):
            raise ValueError("keep_from needs the whole sequence in one call and only the last states")
        if prefix_lens is not None and (cache is None or positions is None):
            raise ValueError("prefix_lens needs a cache holding the prefixes and the new tokens' positions")
        max_position = None
        if positions is None:
            positions, max_position = self._positions(src_tokens)
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
        layers = self.active_layers()
        for n, (i, layer) in enumerate(layers):
            keep = keep_from if n == len(layers) - 1 else 0
            x = self.run_layer(layer, x, cache[i] if cache is not None else None, keep, prefix_lens)  # (B, T', d)
            states.append(x)
        if keep_from and not layers:  # no layer ran (all dropped): the embeddings of the kept positions
            x = x[:, keep_from:]
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

    def run_layer(
        self,
        layer: DecoderLayer,
        x: Tensor,
        cache: dict[str, Tensor] | None,
        keep_from: int = 0,
        prefix_lens: Tensor | None = None,
    ) -> Tensor:
        """One layer; with ``checkpoint_activations`` (training) its activations are recomputed in backward
        instead of kept (the RNG state is restored, so dropout draws the same masks), and with
        ``offload_activations`` the layer inputs it keeps wait in CPU memory."""
        if not (self.cfg.checkpoint_activations and self.training and torch.is_grad_enabled()):
            return layer(x, cache, keep_from, prefix_lens)
        offload = self.cfg.offload_activations and x.device.type != "cpu"
        with torch.autograd.graph.save_on_cpu(pin_memory=True) if offload else contextlib.nullcontext():
            return checkpoint(
                layer, x, cache, keep_from, prefix_lens, use_reentrant=False, context_fn=recompute_contexts
            )

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

    def new_cache(self, capacity: int | None = None) -> KVCache:
        """An empty key/value cache, one dict per layer; with ``capacity`` (positions) preallocated buffers that grow
        in place and reorder with one gather (``LayerCache``: what generation uses)."""
        if capacity is None:
            return [{} for _ in self.layers]
        return [LayerCache(capacity) for _ in self.layers]

    # ---- outputs -------------------------------------------------------------------------------------
    def log_probs_from_features(self, x: Tensor, temperature: float = 1.0) -> Tensor:
        """The full ln p over the vocabulary (..., V). ``temperature`` divides what fairseq's generator divides: the
        features before an adaptive softmax, the logits of a plain output layer."""
        if self.adaptive_softmax is not None:
            return self.adaptive_softmax.log_prob(x / temperature if temperature != 1.0 else x)
        logits = self.output_projection(x)  # type: ignore[misc]  # (..., V)
        if temperature != 1.0:
            logits = logits / temperature
        return log_softmax_(fp32(logits))  # (..., V)

    def target_log_probs_from_features(self, x: Tensor, target: Tensor, chunk_elements: int = CHUNK_ELEMENTS) -> Tensor:
        """log p(target) at every position, the full softmax in row chunks of at most ``chunk_elements`` logits."""
        _check_rows(x, target)
        if self.adaptive_softmax is not None:
            return self.adaptive_softmax.target_log_prob(x, target, chunk_elements)
        flat, t = x.reshape(-1, x.shape[-1]), target.reshape(-1)
        step = max(1, chunk_elements // self.cfg.vocab_size)
        out = [
            log_softmax_(fp32(self.output_projection(flat[i : i + step])))  # type: ignore[misc]
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

    def loss(self, src_tokens: Tensor, target: Tensor, tail_ignore_quirk: bool = False) -> Tensor:
        """Summed NLL (nats) over non-pad targets, exact; ``tail_ignore_quirk=True``: fairseq's ``adaptive_loss``
        (``AdaptiveSoftmax.loss`` says what differs), as the trainer computes it."""
        return self.loss_from_features(self(src_tokens), target, tail_ignore_quirk)

    def loss_from_features(
        self, x: Tensor, target: Tensor, tail_ignore_quirk: bool = False, routes: Routes | None = None
    ) -> Tensor:
        """``loss`` on features already computed (the trainer runs the forward pass itself, maybe compiled)."""
        _check_rows(x, target)
        if self.adaptive_softmax is not None:
            rows = routes.target if routes is not None else None
            return self.adaptive_softmax.loss(x, target, self.padding_idx, tail_ignore_quirk, rows)
        w = self.output_projection.weight  # type: ignore[union-attr]
        return linear_cross_entropy_sum(x.reshape(-1, x.shape[-1]), w, target.reshape(-1), self.padding_idx)

    def num_parameters(self) -> int:
        """Unique parameters (tied tensors once), the way fairseq and the paper count them."""
        return sum(p.numel() for p in self.parameters())


def _check_rows(x: Tensor, target: Tensor) -> None:
    """One target per feature row (``gather`` would take a shorter target list without a word). Shapes only: a
    check of the values would read the device."""
    if x.shape[:-1].numel() != target.numel():
        raise ValueError(f"{tuple(target.shape)} targets for features of shape {tuple(x.shape)}: one per position")


def prune_layers(state_dict: dict[str, Tensor], layers_to_keep: str | None) -> dict[str, Tensor]:
    """fairseq's ``checkpoint_utils.prune_state_dict``: keep only the listed layers of a stored model, renumbered
    0, 1, ... in order (a LayerDrop-trained model evaluated with fewer layers); other keys pass unchanged."""
    keep = parse_layers_to_keep(layers_to_keep)
    if keep is None:
        return state_dict
    stored = {int(k.split(".")[k.split(".").index("layers") + 1]) for k in state_dict if "layers" in k.split(".")[:-1]}
    missing = [i for i in keep if i not in stored]
    if missing:
        raise ConfigError(
            f"decoder_layers_to_keep {layers_to_keep!r}: the stored model has no layer {missing[0]} (its layers: "
            f"0-{max(stored, default=-1)}); list layers it has"
        )
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
    return TransformerLM(make_config(arch, vocab_size, **overrides))
