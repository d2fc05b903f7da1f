"""Model configuration, field for field fairseq 0.12's ``TransformerLanguageModelConfig``, and its checks.

``ModelConfig`` has every field of that dataclass (``fairseq/models/transformer_lm.py``) under fairseq's name and
with fairseq's default, so a checkpoint's stored ``cfg["model"]`` or ``args`` maps onto it field by field, and
the plain ``--arch transformer_lm`` gets what fairseq 0.12 gives it: the dataclass defaults, which mean a
**post-LN** decoder (``decoder_normalize_before=False``) with 512-wide input and output dimensions. The named
architectures (``--arch transformer_lm_wiki103``, ...) are in ``core.presets``.

Every field is either reproduced exactly or refused by name in ``ModelConfig.validate`` (``REFUSED``); the
option table in ``docs/fairseq-options.md`` says which test proves which.
"""

from __future__ import annotations

import ast
import dataclasses
from dataclasses import dataclass
from typing import Any

from adaptive_lm.core.errors import ConfigError

# fairseq 0.12's --activation-fn choices (``utils.get_available_activation_fns``) plus relu_squared, which its
# ``get_activation_fn`` accepts from a stored config. ("swish" is refused: fairseq returns the SiLU *class*.)
ACTIVATIONS = ("relu", "gelu", "gelu_fast", "gelu_accurate", "tanh", "linear", "relu_squared")
DEFAULT_CHARACTER_FILTERS = "[(1, 64), (2, 128), (3, 192), (4, 256), (5, 256), (6, 256), (7, 256)]"


def parse_cutoff(value: Any) -> tuple[int, ...] | None:
    """Cutoffs arrive as fairseq strings ("20000,60000"), lists, or None."""
    if value is None or value == "" or value == "None":
        return None
    try:
        if isinstance(value, str):
            value = value.strip().strip("[]()")
            return tuple(int(float(v)) for v in value.split(",") if v.strip())
        return tuple(int(v) for v in value)
    except (ValueError, TypeError):
        raise ConfigError(f"cutoff {value!r} is not a list of word counts such as 20000,60000") from None


def parse_character_filters(value: str) -> list[tuple[int, int]]:
    """fairseq ``eval``s this string; we only read a literal list of (width, channels) pairs."""
    try:
        filters = ast.literal_eval(value) if isinstance(value, str) else value
        out = [(int(w), int(c)) for w, c in filters]
    except (ValueError, SyntaxError, TypeError) as e:
        raise ConfigError(
            f"character_filters {value!r} is not a list of (width, channels) pairs such as "
            f"{DEFAULT_CHARACTER_FILTERS!r} ({e})"
        ) from None
    if not out or any(w < 1 or c < 1 for w, c in out):
        raise ConfigError(f"character_filters {value!r}: every (width, channels) pair must be positive")
    return out


def min_parameters(cfg: Any) -> int:
    """A lower bound on a model config's parameter count, from the sizes alone: each layer's four attention
    projections and two feed-forward maps (biases, norms and embeddings left out). Computed without building
    anything, so that a size no machine holds (a typo such as ``--decoder-layers 100000000``) is refused at once;
    building it ran for minutes before running out of memory."""
    d, f = cfg.decoder_embed_dim, cfg.decoder_ffn_embed_dim
    return cfg.num_layers * (4 * d * d + 2 * d * f)


def check_sizes(cfg: Any) -> None:
    """Widths, heads and band factors that build no model (fairseq and ours failed with ZeroDivisionError or a
    reshape error)."""
    for name in ("decoder_embed_dim", "decoder_ffn_embed_dim", "decoder_attention_heads", "max_target_positions"):
        if getattr(cfg, name, 1) < 1:
            raise ConfigError(f"{name} {getattr(cfg, name)} must be a positive integer")
    if cfg.decoder_layers < 0:  # a checkpoint loaded with it was refused as 'weights do not match' its settings
        raise ConfigError(f"decoder_layers {cfg.decoder_layers} must be zero or more")
    used = {"adaptive_input_factor": getattr(cfg, "adaptive_input", False),
            "adaptive_softmax_factor": getattr(cfg, "adaptive_softmax_cutoff", None) is not None}  # fmt: skip
    for name, on in used.items():  # fairseq ignores a factor whose module is off (such a checkpoint loads there)
        if on and not getattr(cfg, name) > 0:
            raise ConfigError(f"{name} {getattr(cfg, name)} must be positive (each band is this much narrower)")


def parse_layers_to_keep(value: str | None) -> list[int] | None:
    """fairseq's ``decoder_layers_to_keep`` ("0,2"): sorted layer numbers of the stored model to keep."""
    if value is None or str(value).strip() in ("", "None"):
        return None
    try:
        return sorted(int(v) for v in str(value).split(","))
    except ValueError:
        raise ConfigError(f"decoder_layers_to_keep {value!r} must be comma-separated layer numbers, e.g. 0,2") from None


@dataclass
class ModelConfig:
    """fairseq 0.12's ``TransformerLanguageModelConfig``: same names, same defaults (so: post-LN, 512-wide input and
    output dims), plus the two values fairseq takes from the task/dictionary (``vocab_size``, ``padding_idx``)."""

    vocab_size: int = 0
    padding_idx: int = 1
    activation_fn: str = "relu"
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    relu_dropout: float = 0.0  # old name of activation_dropout; used when activation_dropout == 0
    decoder_embed_dim: int = 512
    decoder_output_dim: int | None = 512  # None -> decoder_embed_dim (what base_lm_architecture does)
    decoder_input_dim: int | None = 512  # None -> decoder_embed_dim
    decoder_ffn_embed_dim: int = 2048
    decoder_layers: int = 6
    decoder_attention_heads: int = 8
    decoder_normalize_before: bool = False  # the dataclass default; every named arch forces True
    no_decoder_final_norm: bool = False
    adaptive_softmax_cutoff: tuple[int, ...] | None = None
    adaptive_softmax_dropout: float = 0.0
    adaptive_softmax_factor: float = 4.0
    no_token_positional_embeddings: bool = False
    share_decoder_input_output_embed: bool = False
    character_embeddings: bool = False
    character_filters: str = DEFAULT_CHARACTER_FILTERS
    character_embedding_dim: int = 4
    char_embedder_highway_layers: int = 2
    adaptive_input: bool = False
    adaptive_input_factor: float = 4.0
    adaptive_input_cutoff: tuple[int, ...] | None = None
    tie_adaptive_weights: bool = False
    tie_adaptive_proj: bool = False
    decoder_learned_pos: bool = False
    layernorm_embedding: bool = False
    no_scale_embedding: bool = False
    checkpoint_activations: bool = False
    offload_activations: bool = False
    decoder_layerdrop: float = 0.0
    decoder_layers_to_keep: str | None = None
    quant_noise_pq: float = 0.0
    quant_noise_pq_block_size: int = 8
    quant_noise_scalar: float = 0.0
    min_params_to_wrap: int = 100_000_000  # FSDP wrapping only: no effect on the numbers
    base_layers: int = 0
    base_sublayers: int = 1
    base_shuffle: int = 1
    scale_fc: bool = False
    scale_attn: bool = False
    scale_heads: bool = False
    scale_resids: bool = False
    decoder_xformers_att_config: str | None = None
    add_bos_token: bool = False
    max_target_positions: int = 1024
    tpu: bool = False  # where fairseq ran; no effect on the model (refused for training, see train.py)

    def __post_init__(self) -> None:
        self.adaptive_input_cutoff = parse_cutoff(self.adaptive_input_cutoff)
        self.adaptive_softmax_cutoff = parse_cutoff(self.adaptive_softmax_cutoff)
        if self.decoder_input_dim is None:
            self.decoder_input_dim = self.decoder_embed_dim
        if self.decoder_output_dim is None:
            self.decoder_output_dim = self.decoder_embed_dim
        if self.offload_activations:  # base_lm_architecture: offloading implies checkpointing
            self.checkpoint_activations = True

    # ---- derived values -------------------------------------------------------------------------
    @property
    def act_dropout(self) -> float:
        """fairseq falls back to relu_dropout when activation_dropout is 0 (backward compatibility)."""
        return self.activation_dropout if self.activation_dropout > 0 else self.relu_dropout

    @property
    def layers_to_keep(self) -> list[int] | None:
        return parse_layers_to_keep(self.decoder_layers_to_keep)

    @property
    def num_layers(self) -> int:
        """fairseq's ``build_model``: with ``decoder_layers_to_keep`` only those layers are built."""
        keep = self.layers_to_keep
        return len(keep) if keep is not None else self.decoder_layers

    @property
    def input_embed_dim(self) -> int:
        """Width of what the token embedder returns (the char CNN and adaptive input return decoder_embed_dim)."""
        if self.character_embeddings or self.adaptive_input:
            return self.decoder_embed_dim
        return int(self.decoder_input_dim)  # type: ignore[arg-type]

    def validate(self) -> None:
        """The checks fairseq makes in ``build_model`` and in its modules, plus the options we refuse by name; every
        message says what to change."""
        for name, why in REFUSED.items():
            if refused_value(name, getattr(self, name)):
                raise ConfigError(f"{name} = {getattr(self, name)!r}: {why}")
        check_sizes(self)
        self._check_shape()
        self._check_cutoffs()
        self._check_tying()
        for name in PROBABILITIES:
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} {getattr(self, name)} must be in [0, 1)")
        keep = self.layers_to_keep
        if keep is not None and (len(set(keep)) != len(keep) or keep[0] < 0):
            raise ConfigError(f"decoder_layers_to_keep {self.decoder_layers_to_keep}: distinct layer numbers >= 0")
        if self.quant_noise_pq > 0:
            self._check_quant_noise_blocks()

    def _check_shape(self) -> None:
        if self.vocab_size <= 0:
            raise ConfigError("vocab_size must be positive: pass the size of the dictionary (len(dict))")
        if self.decoder_embed_dim % self.decoder_attention_heads != 0:
            raise ConfigError(
                f"decoder_embed_dim {self.decoder_embed_dim} is not divisible by decoder_attention_heads "
                f"{self.decoder_attention_heads}: choose a head count that divides the width"
            )
        if self.activation_fn not in ACTIVATIONS:
            broken = (
                " (fairseq 0.12's swish is broken: it returns the SiLU class)" if self.activation_fn == "swish" else ""
            )
            raise ConfigError(
                f"unknown activation_fn {self.activation_fn!r}{broken}: use one of {', '.join(ACTIVATIONS)}"
            )
        if self.character_embeddings:
            parse_character_filters(self.character_filters)
        shared = self.share_decoder_input_output_embed and self.adaptive_softmax_cutoff is None
        if shared and (self.character_embeddings or self.adaptive_input):
            kind = "--character-embeddings" if self.character_embeddings else "--adaptive-input"
            raise ConfigError(
                "share_decoder_input_output_embed (which the gpt3 presets force) needs a word embedding to share, "
                f"and {kind} builds none (fairseq fails with an AttributeError): drop one of the two, or tie an "
                "adaptive input to an adaptive softmax (--adaptive-softmax-cutoff, --tie-adaptive-weights)"
            )
        if shared and self.input_embed_dim != self.decoder_output_dim:
            raise ConfigError(
                "share_decoder_input_output_embed needs a word embedding as wide as decoder_output_dim "
                f"({self.input_embed_dim} != {self.decoder_output_dim}); set --decoder-input-dim equal to "
                "--decoder-output-dim"
            )

    def _check_cutoffs(self) -> None:
        """Cutoffs increase, stay below the vocabulary, and leave every band at least one dimension wide."""
        bands = (
            ("input", self.adaptive_input, self.decoder_input_dim, self.adaptive_input_factor,
             self.adaptive_input_cutoff),
            ("softmax", self.adaptive_softmax_cutoff is not None, self.decoder_output_dim,
             self.adaptive_softmax_factor, self.adaptive_softmax_cutoff),
        )  # fmt: skip
        for kind, on, dim, factor, cut in bands:
            name = f"adaptive_{kind}_cutoff"
            if cut is None:
                continue
            text = ",".join(map(str, cut))
            if list(cut) != sorted(set(cut)) or cut[0] <= 0:
                raise ConfigError(f"{name} {text} must be strictly increasing positive integers")
            if cut[-1] > self.vocab_size or (len(cut) > 1 and cut[-2] >= self.vocab_size):
                raise ConfigError(
                    f"{name} {text} reaches the vocabulary size {self.vocab_size}: every cutoff must be below it "
                    f"(e.g. --{name.replace('_', '-')} {suggest_cutoffs(self.vocab_size)})"
                )
            if cut[-1] == self.vocab_size and len(cut) == 1:
                raise ConfigError(f"{name} {cut[0]} equals the vocabulary size: leave at least one tail band")
            dims = band_dims(dim, factor, n_bands(cut, self.vocab_size))
            if on and min(dims) < 1:
                raise ConfigError(
                    f"adaptive {kind} bands would be {dims} wide ({dim} divided by {factor:g} per band): raise "
                    f"the model width, lower --adaptive-{kind}-factor, or use fewer --adaptive-{kind}-cutoff values"
                )
        if self.adaptive_input and self.adaptive_input_cutoff is None:
            raise ConfigError("adaptive_input needs adaptive_input_cutoff (e.g. 20000,60000)")

    def _check_tying(self) -> None:
        """fairseq's asserts in ``build_model`` for tied adaptive weights, with what to change."""
        if not self.tie_adaptive_weights:
            return
        if self.character_embeddings:
            raise ConfigError(
                "tie_adaptive_weights needs the adaptive input's bands, but character_embeddings replaces the "
                "adaptive input (fairseq crashes on this combination): drop one of the two"
            )
        if not self.adaptive_input:
            raise ConfigError("tie_adaptive_weights needs adaptive_input: pass --adaptive-input")
        if self.adaptive_softmax_cutoff is None:
            raise ConfigError("tie_adaptive_weights needs --adaptive-softmax-cutoff equal to --adaptive-input-cutoff")
        if self.adaptive_input_factor != self.adaptive_softmax_factor:
            raise ConfigError(
                f"tied adaptive weights need equal factors: adaptive_input_factor {self.adaptive_input_factor} "
                f"!= adaptive_softmax_factor {self.adaptive_softmax_factor}"
            )
        if tuple(self.adaptive_input_cutoff) != tuple(self.adaptive_softmax_cutoff):  # type: ignore[arg-type]
            raise ConfigError(
                f"tied adaptive weights need identical cutoffs: input {self.adaptive_input_cutoff} "
                f"!= softmax {self.adaptive_softmax_cutoff}; pass the same --adaptive-*-cutoff to both"
            )
        if self.decoder_input_dim != self.decoder_output_dim:
            raise ConfigError(
                f"tied adaptive weights need decoder_input_dim == decoder_output_dim "
                f"({self.decoder_input_dim} != {self.decoder_output_dim})"
            )
        if self.decoder_output_dim != self.decoder_embed_dim:  # fairseq builds no project_out_dim when tied
            raise ConfigError(
                f"tied adaptive weights need decoder_output_dim == decoder_embed_dim ({self.decoder_output_dim} != "
                f"{self.decoder_embed_dim}): fairseq then builds no output projection and fails at the first forward"
            )

    def _check_quant_noise_blocks(self) -> None:
        """fairseq asserts, when building each noised Linear, that its input width is a multiple of the block size."""
        bs = self.quant_noise_pq_block_size
        if bs < 1:
            raise ConfigError(f"quant_noise_pq_block_size {bs} must be positive")
        d = self.decoder_embed_dim
        widths = {"decoder_embed_dim (attention, fc1)": d, "decoder_ffn_embed_dim (fc2)": self.decoder_ffn_embed_dim}
        if not self.adaptive_input:
            if self.input_embed_dim != d:
                raise ConfigError(
                    "quant_noise_pq with a plain or character embedding applies fairseq's extra "
                    f"Linear({d}, {d}) to the embeddings, so decoder_input_dim must equal decoder_embed_dim "
                    f"({self.input_embed_dim} != {d}); fairseq fails at the first forward otherwise"
                )
        else:
            cut = self.adaptive_input_cutoff or ()
            dims = band_dims(self.decoder_input_dim, self.adaptive_input_factor, n_bands(cut, self.vocab_size))
            for i, w in enumerate(dims):
                widths[f"adaptive input band {i} width"] = w
        for what, w in widths.items():
            if w % bs:
                raise ConfigError(
                    f"quant_noise_pq_block_size {bs} does not divide the {what} {w} (fairseq asserts it): choose a "
                    f"block size that divides every noised layer's input width"
                )

    def as_built(self) -> ModelConfig:
        """The config of the model as built, for saving next to its weights: a ``decoder_layers_to_keep`` model has
        that many layers, stored as ``decoder_layers`` (loading it again must not prune it a second time)."""
        return dataclasses.replace(self, decoder_layers=self.num_layers, decoder_layers_to_keep=None)

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


def typed_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """``--model-overrides`` values for ModelConfig fields, checked against the field's type: a number given as text
    ("0.1") is read as one, as fairseq's typed config reads it; anything else of the wrong kind is one line. Why:
    ``{'dropout': 'abc'}`` reached the range checks and failed there with a TypeError traceback."""
    types = {f.name: str(f.type) for f in dataclasses.fields(ModelConfig)}
    out = dict(overrides)
    for name, value in overrides.items():
        kind = types.get(name, "").replace(" | None", "")
        if value is None and "None" in types.get(name, ""):
            continue
        if kind == "bool":
            if not isinstance(value, bool):
                raise ConfigError(f"model override {name}={value!r}: must be True or False")
        elif kind in ("int", "float"):
            number = value
            if isinstance(value, str):
                try:
                    number = int(value) if kind == "int" else float(value)
                except ValueError:
                    number = None
            ok = isinstance(number, int) if kind == "int" else isinstance(number, (int, float))
            if isinstance(number, bool) or not ok:
                what = "an integer" if kind == "int" else "a number"
                raise ConfigError(f"model override {name}={value!r}: must be {what}")
            out[name] = number
    return out


PROBABILITIES = ("dropout", "attention_dropout", "activation_dropout", "relu_dropout", "adaptive_softmax_dropout",
                 "decoder_layerdrop", "quant_noise_pq")  # fmt: skip

# Options fairseq accepts that we do not reproduce: refused by name, with what to do instead.
REFUSED: dict[str, str] = {
    "quant_noise_scalar": (
        "fairseq then swaps every Linear/Embedding for an int8-emulating module (fairseq/modules/quantization/scalar,"
        " CUDA only) whose evaluation uses 8-bit weights and activations; not reproduced: train without "
        "--quant-noise-scalar"
    ),
    "base_layers": (
        "BASE layers (fairseq's routed expert layers, fairseq/modules/base_layer.py, which need an all-to-all across "
        "GPUs) are not reproduced: use a model without --base-layers"
    ),
    "decoder_xformers_att_config": (
        "xFormers attention variants are not reproduced (plain causal attention only): drop "
        "--decoder-xformers-att-config"
    ),
}


# NormFormer's options are in fairseq 0.12's TransformerLanguageModelConfig, but its decoder reads them from a
# TransformerConfig built from the model's DictConfig (fairseq/models/transformer/transformer_config.py,
# ``from_namespace``), which has no such fields: fairseq-train 0.12 silently builds these models *without* the
# NormFormer layers. A checkpoint from a fairseq version where they worked holds their weights; the weights say.
NORMFORMER = {"scale_attn": "attn_ln.weight", "scale_fc": "ffn_layernorm.weight", "scale_heads": "c_attn",
              "scale_resids": "w_resid"}  # fmt: skip


def refused_value(name: str, value: Any) -> bool:
    """Whether ``value`` switches the refused option ``name`` on (0 / None / False / "" keep it off)."""
    return value not in (None, "", "None", 0, 0.0, False)


def suggest_cutoffs(vocab_size: int) -> str:
    """Roughly the paper's proportions (20k/60k of 268k), rounded, for error messages."""
    a = max(1, int(round(vocab_size * 0.075, -1)) or vocab_size // 13)
    b = max(a + 1, int(round(vocab_size * 0.22, -1)) or vocab_size // 4)
    if b >= vocab_size:
        return str(max(1, vocab_size // 2))
    return f"{a},{b}"


def band_dims(dim: int, factor: float, bands: int) -> list[int]:
    """fairseq's ``int(dim // factor**i)`` per band (a float factor gives float floor division)."""
    return [int(dim // (factor**i)) for i in range(bands)]


def n_bands(cutoff: tuple[int, ...] | list[int], vocab_size: int) -> int:
    """Bands of an adaptive input/softmax: the cutoffs, plus [last cutoff, V) unless the last cutoff is V."""
    return len(cutoff) + (1 if not cutoff or vocab_size > cutoff[-1] else 0)


__all__ = [
    "ACTIVATIONS",
    "DEFAULT_CHARACTER_FILTERS",
    "NORMFORMER",
    "PROBABILITIES",
    "REFUSED",
    "ConfigError",
    "ModelConfig",
    "band_dims",
    "n_bands",
    "parse_character_filters",
    "parse_cutoff",
    "parse_layers_to_keep",
    "refused_value",
    "suggest_cutoffs",
]
