"""Model configuration and architecture presets.

`ModelConfig` holds the architecture only, with fairseq's field names (``decoder_embed_dim``,
``adaptive_input_cutoff``, ...) so that a fairseq checkpoint's stored ``cfg["model"]`` or ``args``
maps onto it field by field. Presets mirror fairseq's architecture functions in
``fairseq/models/transformer_lm.py`` (reference doc section 1): each one only fills what the user did
not set, then defers to its parent. They are plain data here: a dict of values per preset, applied in
parent-to-child order, with user overrides last.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

ACTIVATIONS = ("relu", "gelu", "gelu_accurate", "gelu_fast", "tanh", "linear", "swish", "silu")


class ConfigError(ValueError):
    """A configuration the model cannot be built from; the message says what to change."""


def parse_cutoff(value: Any) -> tuple[int, ...] | None:
    """Cutoffs arrive as fairseq strings ("20000,60000"), lists, or None."""
    if value is None or value == "" or value == "None":
        return None
    if isinstance(value, str):
        value = value.strip().strip("[]()")
        return tuple(int(float(v)) for v in value.split(",") if v.strip())
    return tuple(int(v) for v in value)


@dataclass
class ModelConfig:
    """Architecture of a fairseq ``transformer_lm`` (decoder-only, pre-LN) with optional adaptive I/O."""

    vocab_size: int = 0
    padding_idx: int = 1
    decoder_embed_dim: int = 512
    decoder_input_dim: int | None = None  # None -> decoder_embed_dim (fairseq default)
    decoder_output_dim: int | None = None  # None -> decoder_embed_dim
    decoder_ffn_embed_dim: int = 2048
    decoder_layers: int = 6
    decoder_attention_heads: int = 8
    activation_fn: str = "relu"
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    relu_dropout: float = 0.0  # old name of activation_dropout; used when activation_dropout == 0
    decoder_normalize_before: bool = True  # fairseq's base_lm_architecture forces True
    no_decoder_final_norm: bool = False
    adaptive_input: bool = False
    adaptive_input_factor: float = 4.0
    adaptive_input_cutoff: tuple[int, ...] | None = None
    adaptive_softmax_cutoff: tuple[int, ...] | None = None
    adaptive_softmax_factor: float = 4.0
    adaptive_softmax_dropout: float = 0.0
    tie_adaptive_weights: bool = False
    tie_adaptive_proj: bool = False
    share_decoder_input_output_embed: bool = False
    decoder_learned_pos: bool = False
    no_token_positional_embeddings: bool = False
    no_scale_embedding: bool = False
    layernorm_embedding: bool = False
    max_target_positions: int = 1024
    add_bos_token: bool = False

    def __post_init__(self) -> None:
        self.adaptive_input_cutoff = parse_cutoff(self.adaptive_input_cutoff)
        self.adaptive_softmax_cutoff = parse_cutoff(self.adaptive_softmax_cutoff)
        if self.decoder_input_dim is None:
            self.decoder_input_dim = self.decoder_embed_dim
        if self.decoder_output_dim is None:
            self.decoder_output_dim = self.decoder_embed_dim

    # ---- derived values -------------------------------------------------------------------------
    @property
    def act_dropout(self) -> float:
        """fairseq falls back to relu_dropout when activation_dropout is 0 (backward compatibility)."""
        return self.activation_dropout if self.activation_dropout > 0 else self.relu_dropout

    def validate(self) -> None:
        """The checks fairseq makes in ``build_model`` and in the adaptive modules, with actionable messages."""
        if self.vocab_size <= 0:
            raise ConfigError("vocab_size must be positive: pass the size of the dictionary (len(dict))")
        if self.decoder_embed_dim % self.decoder_attention_heads != 0:
            raise ConfigError(
                f"decoder_embed_dim {self.decoder_embed_dim} is not divisible by decoder_attention_heads "
                f"{self.decoder_attention_heads}: choose a head count that divides the width"
            )
        if self.activation_fn not in ACTIVATIONS:
            raise ConfigError(f"unknown activation_fn {self.activation_fn!r}: use one of {', '.join(ACTIVATIONS)}")
        for name in ("adaptive_input_cutoff", "adaptive_softmax_cutoff"):
            cut = getattr(self, name)
            if cut is None:
                continue
            if list(cut) != sorted(set(cut)) or cut[0] <= 0:
                raise ConfigError(f"{name} {','.join(map(str, cut))} must be strictly increasing positive integers")
            if cut[-1] > self.vocab_size or (len(cut) > 1 and cut[-2] >= self.vocab_size):
                raise ConfigError(
                    f"{name} {','.join(map(str, cut))} reaches the vocabulary size {self.vocab_size}: "
                    f"every cutoff must be below it (e.g. --{name.replace('_', '-')} "
                    f"{suggest_cutoffs(self.vocab_size)})"
                )
            if cut[-1] == self.vocab_size and len(cut) == 1:
                raise ConfigError(f"{name} {cut[0]} equals the vocabulary size: leave at least one tail band")
        if self.adaptive_input and self.adaptive_input_cutoff is None:
            raise ConfigError("adaptive_input needs adaptive_input_cutoff (e.g. 20000,60000)")
        if self.tie_adaptive_weights:
            if not self.adaptive_input:
                raise ConfigError("tie_adaptive_weights needs adaptive_input: pass --adaptive-input")
            if self.adaptive_softmax_cutoff is None:
                raise ConfigError(
                    "tie_adaptive_weights needs --adaptive-softmax-cutoff equal to --adaptive-input-cutoff"
                )
            if self.adaptive_input_factor != self.adaptive_softmax_factor:
                raise ConfigError(
                    f"tied adaptive weights need equal factors: adaptive_input_factor {self.adaptive_input_factor} "
                    f"!= adaptive_softmax_factor {self.adaptive_softmax_factor}"
                )
            if tuple(self.adaptive_input_cutoff) != tuple(self.adaptive_softmax_cutoff):
                raise ConfigError(
                    f"tied adaptive weights need identical cutoffs: input {self.adaptive_input_cutoff} "
                    f"!= softmax {self.adaptive_softmax_cutoff}; pass the same --adaptive-*-cutoff to both"
                )
            if self.decoder_input_dim != self.decoder_output_dim:
                raise ConfigError(
                    f"tied adaptive weights need decoder_input_dim == decoder_output_dim "
                    f"({self.decoder_input_dim} != {self.decoder_output_dim})"
                )
        for on, name, dim, factor, cut in (
            (
                self.adaptive_input,
                "input",
                self.decoder_input_dim,
                self.adaptive_input_factor,
                self.adaptive_input_cutoff,
            ),
            (
                self.adaptive_softmax_cutoff is not None,
                "softmax",
                self.decoder_output_dim,
                self.adaptive_softmax_factor,
                self.adaptive_softmax_cutoff,
            ),
        ):
            if on and cut is not None:
                dims = band_dims(dim, factor, len(tuple(cut)) + 1)
                if min(dims) < 1:
                    raise ConfigError(
                        f"adaptive {name} bands would be {dims} wide ({dim} divided by {factor:g} per band): raise "
                        f"the model width, lower --adaptive-{name}-factor, or use fewer --adaptive-{name}-cutoff values"
                    )
        if self.share_decoder_input_output_embed and self.adaptive_softmax_cutoff is not None:
            raise ConfigError("share_decoder_input_output_embed cannot be used with an adaptive softmax")
        for name in ("dropout", "attention_dropout", "activation_dropout", "relu_dropout", "adaptive_softmax_dropout"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ConfigError(f"{name} {p} must be in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, numbers, strings) for JSON and ``torch.load(weights_only=True)``."""
        d = dataclasses.asdict(self)
        for k in ("adaptive_input_cutoff", "adaptive_softmax_cutoff"):
            d[k] = list(d[k]) if d[k] is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def suggest_cutoffs(vocab_size: int) -> str:
    """Roughly the paper's proportions (20k/60k of 268k), rounded, for error messages."""
    a = max(1, int(round(vocab_size * 0.075, -1)) or vocab_size // 13)
    b = max(a + 1, int(round(vocab_size * 0.22, -1)) or vocab_size // 4)
    if b >= vocab_size:
        return str(max(1, vocab_size // 2))
    return f"{a},{b}"


# ---- presets: fairseq's architecture functions as data ------------------------------------------
# Each entry: (parent, values). Values apply only to fields the user left unset, child before parent,
# exactly as fairseq's safe_getattr chain does.
PRESETS: dict[str, tuple[str | None, dict[str, Any]]] = {
    "transformer_lm": (
        None,
        dict(
            decoder_embed_dim=512,
            decoder_ffn_embed_dim=2048,
            decoder_layers=6,
            decoder_attention_heads=8,
            activation_fn="relu",
            dropout=0.1,
            attention_dropout=0.0,
            activation_dropout=0.0,
            relu_dropout=0.0,
            no_decoder_final_norm=False,
            adaptive_input=False,
            adaptive_input_factor=4.0,
            adaptive_input_cutoff=None,
            adaptive_softmax_cutoff=None,
            adaptive_softmax_factor=4.0,
            adaptive_softmax_dropout=0.0,
            tie_adaptive_weights=False,
            tie_adaptive_proj=False,
            share_decoder_input_output_embed=False,
            decoder_learned_pos=False,
            no_token_positional_embeddings=False,
            no_scale_embedding=False,
            layernorm_embedding=False,
            add_bos_token=False,
        ),
    ),
    "transformer_lm_big": (
        "transformer_lm",
        dict(decoder_layers=12, decoder_embed_dim=1024, decoder_ffn_embed_dim=4096, decoder_attention_heads=16),
    ),
    "transformer_lm_wiki103": (
        "transformer_lm_big",
        dict(
            decoder_layers=16,
            decoder_attention_heads=8,
            dropout=0.3,
            adaptive_input=True,
            tie_adaptive_weights=True,
            adaptive_input_cutoff=(20000, 60000),
            adaptive_softmax_cutoff=(20000, 60000),
            adaptive_softmax_dropout=0.2,
            attention_dropout=0.1,
            activation_dropout=0.1,
            no_decoder_final_norm=True,
            tie_adaptive_proj=True,
        ),
    ),
    "transformer_lm_gbw": (
        "transformer_lm_big",
        dict(
            decoder_embed_dim=512,
            dropout=0.1,
            attention_dropout=0.1,
            activation_dropout=0.0,
            no_decoder_final_norm=True,
        ),
    ),
    # Not in fairseq: a few-thousand-parameter model of the wiki103 shape for tests and smoke runs.
    "tiny": (
        "transformer_lm_wiki103",
        dict(
            decoder_layers=2,
            decoder_embed_dim=32,
            decoder_ffn_embed_dim=64,
            decoder_attention_heads=4,
            adaptive_input_cutoff=(20, 40),
            adaptive_softmax_cutoff=(20, 40),
            max_target_positions=64,
        ),
    ),
}
ALIASES = {
    "transformer_lm_baevski_wiki103": "transformer_lm_wiki103",
    "transformer_lm_baevski_gbw": "transformer_lm_gbw",
    "wiki103": "transformer_lm_wiki103",
    "gbw": "transformer_lm_gbw",
    "base": "transformer_lm",
    "big": "transformer_lm_big",
}


def resolve_arch(arch: str) -> str:
    name = ALIASES.get(arch, arch)
    if name not in PRESETS:
        known = sorted(set(PRESETS) | set(ALIASES))
        raise ConfigError(f"unknown architecture {arch!r}: choose one of {', '.join(known)}")
    return name


def preset_values(arch: str) -> dict[str, Any]:
    """All values an architecture sets, parents first, children overriding."""
    chain = []
    name: str | None = resolve_arch(arch)
    while name is not None:
        parent, values = PRESETS[name]
        chain.append(values)
        name = parent
    out: dict[str, Any] = {}
    for values in reversed(chain):
        out.update(values)
    return out


def make_config(arch: str, vocab_size: int, **overrides: Any) -> ModelConfig:
    """Preset values, then explicit overrides (``None`` means "not set", as in fairseq)."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(f"unknown model option(s): {', '.join(unknown)}")
    values = preset_values(arch)
    values.update({k: v for k, v in overrides.items() if v is not None})
    values["vocab_size"] = vocab_size
    values["decoder_normalize_before"] = True  # fairseq forces pre-LN for every transformer_lm arch
    cfg = ModelConfig(**values)
    cfg.validate()
    return cfg


def band_dims(dim: int, factor: float, n_bands: int) -> list[int]:
    """fairseq's ``int(dim // factor**i)`` per band (a float factor gives float floor division)."""
    return [int(dim // (factor**i)) for i in range(n_bands)]


__all__ = [
    "ConfigError",
    "ModelConfig",
    "PRESETS",
    "ALIASES",
    "make_config",
    "preset_values",
    "resolve_arch",
    "parse_cutoff",
    "band_dims",
]
