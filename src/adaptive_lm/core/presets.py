"""Architecture presets: fairseq's architecture functions as data, and the config ``fairseq-train --arch ARCH``
builds from them.

Presets mirror fairseq's architecture functions (``transformer_lm_big``, ``transformer_lm_baevski_wiki103``, ...,
``base_lm_architecture``): each fills only what the user left unset, then defers to its parent; some values are
*forced* whatever the user says (``base_lm_architecture`` forces pre-LN, ``base_gpt3_architecture`` forces the
input/output widths and shared embeddings). They are plain data here: (parent, defaults, forced) per preset, a
callable where fairseq derives a value from another one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from adaptive_lm.core.config import ModelConfig
from adaptive_lm.core.errors import ConfigError

Value = Any  # a value, or a callable of the values resolved so far (fairseq derives some from others)


@dataclass(frozen=True)
class Preset:
    """One fairseq architecture function: ``defaults`` fill unset fields, ``forced`` overwrite, then ``parent``."""

    parent: str | None
    defaults: dict[str, Value] = dataclasses.field(default_factory=dict)
    forced: dict[str, Value] = dataclasses.field(default_factory=dict)
    public: bool = True  # False: a shared base (base_lm_architecture), not an --arch choice


def _embed_dim(v: dict[str, Any]) -> int:
    return v["decoder_embed_dim"]


def _gpt(d: int, ffn: int, layers: int, heads: int) -> Preset:
    return Preset(
        "base_lm",
        dict(
            decoder_embed_dim=d,
            decoder_ffn_embed_dim=ffn,
            decoder_layers=layers,
            decoder_attention_heads=heads,
            dropout=0.1,
            attention_dropout=0.1,
            activation_fn="gelu",
        ),
    )


def _gpt3(layers: int, d: int, heads: int) -> Preset:
    return Preset("base_gpt3", dict(decoder_layers=layers, decoder_embed_dim=d, decoder_attention_heads=heads))


PRESETS: dict[str, Preset] = {
    # --arch transformer_lm: fairseq 0.12 builds it from the dataclass defaults (ModelConfig's), no arch function
    "transformer_lm": Preset(None),
    # base_lm_architecture: fills the rest, forces pre-LN ("training is not stable without this")
    "base_lm": Preset(
        None,
        defaults=dict(decoder_output_dim=_embed_dim, decoder_input_dim=_embed_dim, base_shuffle=0),
        forced=dict(decoder_normalize_before=True),
        public=False,
    ),
    "transformer_lm_big": Preset(
        "base_lm",
        dict(decoder_layers=12, decoder_embed_dim=1024, decoder_ffn_embed_dim=4096, decoder_attention_heads=16),
    ),
    "transformer_lm_wiki103": Preset(
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
    "transformer_lm_gbw": Preset(
        "transformer_lm_big",
        dict(decoder_embed_dim=512, dropout=0.1, attention_dropout=0.1, no_decoder_final_norm=True),
    ),
    "transformer_lm_gpt": _gpt(768, 3072, 12, 12),
    "transformer_lm_gpt2_small": _gpt(1024, 4096, 24, 16),
    "transformer_lm_gpt2_tiny": _gpt(64, 64, 2, 1),
    "transformer_lm_gpt2_medium": _gpt(1280, 5120, 36, 20),
    "transformer_lm_gpt2_big": _gpt(1600, 6400, 48, 25),
    "transformer_lm_gpt2_big_wide": _gpt(2048, 8192, 24, 32),
    "transformer_lm_gpt2_bigger": _gpt(2048, 8192, 48, 32),
    # base_gpt3_architecture: widths forced to the embedding's, learned positions, no dropout, shared embeddings
    "base_gpt3": Preset(
        "base_lm",
        defaults=dict(
            decoder_ffn_embed_dim=lambda v: 4 * v["decoder_embed_dim"],
            decoder_learned_pos=True,
            dropout=0.0,
            attention_dropout=0.0,
            activation_fn="gelu",
        ),
        forced=dict(decoder_input_dim=_embed_dim, decoder_output_dim=_embed_dim, share_decoder_input_output_embed=True),
        public=False,
    ),
    "transformer_lm_gpt3_small": _gpt3(12, 768, 12),
    "transformer_lm_gpt3_medium": _gpt3(24, 1024, 16),
    "transformer_lm_gpt3_large": _gpt3(24, 1536, 16),
    "transformer_lm_gpt3_xl": _gpt3(24, 2048, 32),
    "transformer_lm_gpt3_2_7": _gpt3(32, 2560, 32),
    "transformer_lm_gpt3_6_7": _gpt3(32, 4096, 32),
    "transformer_lm_gpt3_13": _gpt3(40, 5120, 40),
    "transformer_lm_gpt3_175": _gpt3(96, 12288, 96),
    # Not in fairseq: a few-thousand-parameter model of the wiki103 shape for tests and smoke runs.
    "tiny": Preset(
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


ARCH_CHOICES = [n for n, p in PRESETS.items() if p.public] + list(ALIASES)


def resolve_arch(arch: str) -> str:
    name = ALIASES.get(arch, arch)
    if name not in PRESETS or not PRESETS[name].public:
        raise ConfigError(f"unknown architecture {arch!r}: choose one of {', '.join(sorted(ARCH_CHOICES))}")
    return name


def apply_preset(arch: str, given: dict[str, Any]) -> dict[str, Any]:
    """fairseq's arch-function chain on ``given`` (the values set by the user or stored in a checkpoint): each
    preset, child first, fills what is still unset and overwrites its forced fields; a ``None`` counts as unset,
    as fairseq's ``safe_getattr`` does for a loaded config."""
    values = {k: v for k, v in given.items() if v is not None}
    name: str | None = resolve_arch(arch)
    while name is not None:
        preset = PRESETS[name]
        for k, v in preset.defaults.items():
            if k not in values:
                values[k] = v(values) if callable(v) else v
        for k, v in preset.forced.items():
            values[k] = v(values) if callable(v) else v
        name = preset.parent
    return values


def make_config(arch: str, vocab_size: int, **overrides: Any) -> ModelConfig:
    """The config ``fairseq-train --arch ARCH`` builds for these flags (``None`` means "not set", as in fairseq)."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(f"unknown model option(s): {', '.join(unknown)}")
    values = apply_preset(arch, overrides)
    values["vocab_size"] = vocab_size
    cfg = ModelConfig(**values)
    cfg.validate()
    return cfg


def preset_values(arch: str) -> dict[str, Any]:
    """Every value an architecture sets by itself (no user flags), resolved like ``make_config``."""
    return apply_preset(arch, {})


__all__ = [
    "ALIASES",
    "ARCH_CHOICES",
    "PRESETS",
    "Preset",
    "apply_preset",
    "make_config",
    "preset_values",
    "resolve_arch",
]
