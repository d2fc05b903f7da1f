"""The training configuration: one flat dataclass whose fields *are* ``adaptive-lm train``'s flags.

Each field carries its help text, group, choices and fairseq aliases as metadata (``opt(...)``); ``add_args``
generates the argparse groups from them (model flags come from ``ModelConfig`` in the same way) and
``TrainConfig.from_args`` reads a parsed namespace back, the few fields that need logic included (fairseq's
pre-2021 lr names, ``--update-freq`` lists, ``--criterion``). Defaults are written once, here. Tests and library
users build a ``TrainConfig(...)`` directly, without the parser.

Flag names and meanings are fairseq-train's (``fairseq/dataclass/configs.py``), so published recipes run
unchanged with ``fairseq-train`` replaced by ``adaptive-lm train``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from .config import ACTIVATIONS, ARCH_CHOICES, ModelConfig
from .errors import UserError

GROUPS = {
    "dataset": "dataset and batching",
    "optimization": "optimization (NAG, cosine schedule)",
    "checkpoint": "checkpoints",
    "distributed": "distributed (torchrun)",
    "logging": "logging",
    "hardware": "hardware and precision",
}


def opt(
    default: Any,
    help: str,
    group: str,
    *,
    flags: tuple[str, ...] = (),
    choices: Any = None,
    kind: Any = None,
    metavar: str | None = None,
    hidden: bool = False,
) -> Any:
    """A TrainConfig field: its default and how it appears on the command line (``kind``: the argparse type,
    or "positive" / "nonneg" / "prob" for checked numbers; ``flags``: extra names such as fairseq's aliases)."""
    meta = dict(help=help, group=group, flags=flags, choices=choices, kind=kind, metavar=metavar, hidden=hidden)
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # ---- dataset ----
    data: str = opt("", "binarised data folder (dict.txt, train.bin/.idx, valid.bin/.idx)", "dataset")
    task: str = opt(
        "language_modeling", "fairseq's task (only language modelling)", "dataset", choices=["language_modeling"]
    )
    tokens_per_sample: int = opt(1024, "tokens per block (the model's max positions)", "dataset", kind="positive")
    sample_break_mode: str = opt(
        "none",
        "how the stream is cut into blocks (none: fixed-size blocks across lines)",
        "dataset",
        choices=["none", "complete", "complete_doc", "eos"],
    )
    max_tokens: int | None = opt(None, "tokens per batch per process (padding included)", "dataset", kind="positive")
    batch_size: int | None = opt(
        None, "blocks per batch per process", "dataset", flags=("--max-sentences",), kind="positive"
    )
    max_tokens_valid: int | None = opt(
        None, "--max-tokens for validation (default: --max-tokens)", "dataset", kind="positive"
    )
    batch_size_valid: int | None = opt(
        None, "--batch-size for validation (default: --batch-size)", "dataset", kind="positive"
    )
    required_batch_size_multiple: int = opt(
        8,
        "fairseq's batch rounding; like fairseq, a last batch whose size is not a multiple is dropped (pass 1 "
        "to keep every sample)",
        "dataset",
        kind="positive",
    )
    skip_invalid_size_inputs_valid_test: bool = opt(
        False, "drop validation blocks longer than --tokens-per-sample", "dataset"
    )
    train_subset: str = opt("train", "the split to train on", "dataset")
    valid_subset: str = opt("valid", "the split to validate on", "dataset")
    max_valid_steps: int | None = opt(
        None, "validate on at most this many batches", "dataset", kind="positive", flags=("--nval",)
    )
    validate_interval: int = opt(1, "validate every N epochs", "dataset", kind="positive")
    validate_interval_updates: int = opt(0, "also validate every N updates (0: off)", "dataset", kind="nonneg")
    validate_after_updates: int = opt(0, "no validation before this many updates", "dataset", kind="nonneg")
    disable_validation: bool = opt(False, "never validate", "dataset")
    num_workers: int = opt(
        0, "accepted for compatibility; batches are built by one background thread", "dataset", kind="nonneg"
    )
    seed: int = opt(1, "seed of the initial weights, batch order and dropout", "dataset", kind=int)
    # ---- optimization ----
    arch: str = opt(
        "transformer_lm",
        "model architecture (fairseq's presets; 'tiny' is ours, for tests)",
        "optimization",
        flags=("-a",),
        choices=ARCH_CHOICES,
    )
    criterion: str = opt(
        "adaptive_loss",
        "adaptive_loss (fairseq's, with its tail ignore-index quirk) or cross_entropy (the exact NLL)",
        "optimization",
        choices=["adaptive_loss", "cross_entropy"],
    )
    optimizer: str = opt("nag", "fairseq's NAG", "optimization", choices=["nag"])
    lr_scheduler: str = opt(
        "cosine", "fairseq's cosine schedule with linear warmup", "optimization", choices=["cosine"]
    )
    max_update: int = opt(0, "stop after this many updates (0: no limit)", "optimization", kind="nonneg")
    max_epoch: int = opt(0, "stop after this many epochs (0: no limit)", "optimization", kind="nonneg")
    stop_time_hours: float = opt(
        0.0, "stop after this many hours of training (0: no limit)", "optimization", kind="nonneg"
    )
    lr: float = opt(
        0.25, "peak learning rate (before 2021 fairseq called it --max-lr)", "optimization", kind="positive"
    )
    min_lr: float = opt(0.0, "floor of the cosine schedule", "optimization", kind="nonneg")
    stop_min_lr: float = opt(-1.0, "stop at an epoch end once the lr is at or below this", "optimization", kind=float)
    warmup_updates: int = opt(0, "linear warmup updates", "optimization", kind="nonneg")
    warmup_init_lr: float = opt(-1.0, "lr at update 0 (default: --min-lr)", "optimization", kind=float)
    lr_period_updates: float = opt(
        -1, "length of the first cosine period (default: --max-update minus warmup)", "optimization", kind=float
    )
    t_mult: float = opt(1.0, "period growth factor per cosine restart", "optimization", kind="positive")
    lr_shrink: float = opt(0.1, "peak lr factor per cosine restart", "optimization", kind="positive")
    momentum: float = opt(0.99, "NAG momentum", "optimization", kind="prob")
    weight_decay: float = opt(0.0, "multiplicative weight decay", "optimization", flags=("--wd",), kind="nonneg")
    clip_norm: float = opt(0.0, "clip the gradient norm to this (0: off)", "optimization", kind="nonneg")
    update_freq: int = opt(
        1, "micro-batches per update and process (gradient accumulation)", "optimization", kind="positive"
    )
    # ---- checkpoints ----
    save_dir: str = opt("checkpoints", "where checkpoints, metrics.jsonl and the lock file go", "checkpoint")
    restore_file: str = opt(
        "checkpoint_last.pt",
        "checkpoint to continue from (ours or fairseq's; the default means --save-dir/checkpoint_last.pt if it exists)",
        "checkpoint",
    )
    finetune_from_model: str | None = opt(
        None,
        "start from these weights (optimizer, schedule, data position and "
        "meters reset) unless --save-dir already has checkpoint_last.pt",
        "checkpoint",
    )
    reset_optimizer: bool = opt(False, "do not restore the momentum buffers", "checkpoint")
    reset_lr_scheduler: bool = opt(False, "restart the lr schedule", "checkpoint")
    reset_dataloader: bool = opt(False, "start at the first batch of epoch 1", "checkpoint")
    reset_meters: bool = opt(False, "forget the best validation loss and the training time", "checkpoint")
    save_interval: int = opt(1, "save every N epochs", "checkpoint", kind="positive")
    save_interval_updates: int = opt(0, "also save every N updates (0: off)", "checkpoint", kind="nonneg")
    keep_interval_updates: int = opt(-1, "keep the last N update checkpoints (-1: all)", "checkpoint", kind=int)
    keep_last_epochs: int = opt(-1, "keep the last N epoch checkpoints (-1: all)", "checkpoint", kind=int)
    keep_best_checkpoints: int = opt(
        -1, "also keep the N best checkpoints as checkpoint.best_loss_X.pt", "checkpoint", kind=int
    )
    best_checkpoint_metric: str = opt(
        "loss", "validation metric for checkpoint_best.pt", "checkpoint", choices=["loss", "ppl"]
    )
    maximize_best_checkpoint_metric: bool = opt(False, "a higher metric is better", "checkpoint")
    patience: int = opt(-1, "stop after N validations without improvement (-1: off)", "checkpoint", kind=int)
    no_save: bool = opt(False, "write no checkpoints", "checkpoint")
    no_epoch_checkpoints: bool = opt(False, "write no checkpointN.pt at epoch ends", "checkpoint")
    no_last_checkpoints: bool = opt(False, "write no checkpoint_last.pt", "checkpoint")
    # ---- distributed ----
    ddp_backend: str = opt(
        "legacy_ddp",
        "accepted for compatibility: gradients are always reduced the legacy_ddp "
        "way (every parameter, missing gradients as zeros), in buckets that overlap the backward",
        "distributed",
        choices=["legacy_ddp", "no_c10d", "c10d", "pytorch_ddp"],
    )
    # ---- logging ----
    log_interval: int = opt(100, "log training statistics every N updates", "logging", kind="positive")
    log_format: str = opt("simple", "console line format", "logging", choices=["simple", "json", "none", "tqdm"])
    log_file: str | None = opt(None, "also append the log lines to this file", "logging")
    tensorboard_logdir: str | None = opt(None, "TensorBoard folder (needs the [tensorboard] extra)", "logging")
    progress_bar: bool = opt(
        True, "no progress bar (a bar on a terminal, a line per 10% in logs)", "logging", flags=("--no-progress-bar",)
    )
    # ---- hardware ----
    cpu: bool = opt(False, "train on the CPU even if a GPU is present", "hardware")
    bf16: bool = opt(False, "bfloat16 autocast (fp32 weights and optimizer)", "hardware")
    fp16: bool = opt(False, "float16 autocast with dynamic loss scaling (fp32 master weights)", "hardware")
    amp: bool = opt(False, "fairseq's automatic mixed precision: the same as --fp16 here", "hardware")
    fp16_init_scale: float = opt(128.0, "initial loss scale for --fp16/--amp", "hardware", kind="positive")
    fp16_scale_window: int | None = opt(
        None,
        "updates without overflow before the loss scale doubles (default: "
        "2^14 / processes / --update-freq, as fairseq)",
        "hardware",
        kind="positive",
    )
    min_loss_scale: float = opt(1e-4, "stop when the fp16 loss scale falls below this", "hardware", kind="positive")
    compile: bool = opt(False, "torch.compile the model (falls back to eager with a warning)", "hardware")
    kernels: str = opt(
        "auto",
        "auto: our CPU kernels on CPU, PyTorch's on GPUs; plain: PyTorch's everywhere (what CUDA runs, also on CPU)",
        "hardware",
        choices=["auto", "plain"],
    )
    tf32: bool = opt(
        True,
        "no TF32 matmuls for fp32 on CUDA (on by default: 8x the fp32 rate, 10-bit mantissa inputs)",
        "hardware",
        flags=("--no-tf32",),
    )
    tail_ignore_quirk: bool = opt(
        True,
        "reproduce fairseq's adaptive_loss ignore-index on tail targets (true/false)",
        "optimization",
        kind="bool",
        metavar="BOOL",
    )
    # stop after this many updates *in this process* (tests of resume / interruption), 0 = off
    stop_after_updates: int = opt(0, "", "optimization", kind="nonneg", hidden=True)
    model_overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields set by model flags

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @property
    def half(self) -> str | None:
        """The autocast dtype name, if any."""
        return "bf16" if self.bf16 else "fp16" if (self.fp16 or self.amp) else None

    def check(self) -> None:
        """Combinations no single flag can see (``argparse`` checked each value already)."""
        if self.max_tokens is None and self.batch_size is None:
            raise UserError("give --max-tokens (as in the recipe) or --batch-size")
        if self.bf16 and (self.fp16 or self.amp):
            raise UserError("--bf16 and --fp16/--amp are exclusive: pick one")
        if self.model_overrides.get("tpu"):
            raise UserError("--tpu: TPUs are not supported; train on CPUs (gloo) or CUDA GPUs (NCCL) with torchrun")
        if self.finetune_from_model and self.restore_file != "checkpoint_last.pt":
            raise UserError("--finetune-from-model and --restore-file are exclusive (fairseq refuses both too)")
        if self.finetune_from_model and (
            self.reset_optimizer or self.reset_lr_scheduler or self.reset_meters or self.reset_dataloader
        ):
            raise UserError("--finetune-from-model already resets the optimizer, schedule, meters and data position")
        if self.max_update == 0 and self.lr_period_updates <= 0:  # fairseq's cosine scheduler asserts the same
            raise UserError(
                "the cosine schedule needs --max-update or --lr-period-updates (the recipe passes --max-update 286000)"
            )

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> TrainConfig:
        """A parsed ``adaptive-lm train`` command line -> TrainConfig. The logic lives here: fairseq's pre-2021 lr
        names (``--max-lr`` peak, ``--lr`` floor, ``--min-lr`` stop threshold), ``--lr``/``--update-freq`` given as
        fairseq's lists, and ``--criterion cross_entropy`` switching the tail quirk off."""
        values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)}
        lrs = [float(x) for x in str(ns.lr).split(",")]  # checked by the parser (lr_list)
        if len(lrs) != 1:
            raise UserError("--lr takes one value with the cosine schedule (fairseq rejects a list too)")
        values["lr"] = lrs[0]
        if ns.max_lr is not None:  # pre-2021 names
            values["lr"], values["min_lr"] = ns.max_lr, lrs[0]
            values["stop_min_lr"] = ns.min_lr if ns.min_lr is not None else ns.stop_min_lr
        elif ns.min_lr is None:
            values["min_lr"] = cls.min_lr
        values["update_freq"] = int(str(ns.update_freq).split(",")[0])  # checked by the parser (int_list)
        values["tail_ignore_quirk"] = ns.tail_ignore_quirk and ns.criterion == "adaptive_loss"
        values["model_overrides"] = model_overrides(ns)
        return cls(**values)


def config_from_args(cls: Any, ns: argparse.Namespace, **given: Any) -> Any:
    """A dataclass config from the same-named attributes of a parsed command line, ``progress`` from
    ``--no-progress-bar``; ``given`` sets the fields whose flag has another name or needs logic."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {n: getattr(ns, n) for n in names if hasattr(ns, n)}
    if "progress" in names:
        values["progress"] = not getattr(ns, "no_progress_bar", False)
    return cls(**{**values, **given})


# ---- argparse types: one clear line for a bad value ----------------------------------------------------------
def _checked(kind: Any):
    def positive(s: str) -> float | int:
        v = _number(s)
        if not v > 0:
            raise argparse.ArgumentTypeError(f"{s!r} must be a positive number")
        return v

    def nonneg(s: str) -> float | int:
        v = _number(s)
        if not v >= 0:
            raise argparse.ArgumentTypeError(f"{s!r} must be zero or positive")
        return v

    def prob(s: str) -> float:
        v = float(_number(s))
        if not 0 <= v < 1:
            raise argparse.ArgumentTypeError(f"{s!r} must be a probability in [0, 1)")
        return v

    def boolean(s: str) -> bool:
        if s.lower() in ("1", "true", "yes", "on"):
            return True
        if s.lower() in ("0", "false", "no", "off"):
            return False
        raise argparse.ArgumentTypeError(f"{s!r} is not true/false")

    return {"positive": positive, "nonneg": nonneg, "prob": prob, "bool": boolean}.get(kind, kind)


def _number(s: str) -> float | int:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{s!r} is not a finite number")
    return int(v) if v.is_integer() and "." not in s and "e" not in s.lower() else v


positive, nonneg, probability, boolean = (_checked(k) for k in ("positive", "nonneg", "prob", "bool"))


def finite(s: str) -> float:
    """Any finite number (a weight that may be negative)."""
    return float(_number(s))


def lr_list(s: str) -> str:
    """fairseq's ``--lr`` is a comma-separated list of positive numbers (the cosine schedule takes one)."""
    for x in s.split(","):
        positive(x)
    return s


def int_list(s: str) -> str:
    """fairseq's ``--update-freq`` is a comma-separated list of positive integers (the first one is used)."""
    for x in s.split(","):
        v = positive(x)
        if not isinstance(v, int):
            raise argparse.ArgumentTypeError(f"{x!r} must be a positive integer")
    return s


def add_train_args(p: argparse.ArgumentParser) -> None:
    """``adaptive-lm train``'s flags from TrainConfig's and ModelConfig's fields, in fairseq-train's sections."""
    p.add_argument("data", help=TrainConfig.__dataclass_fields__["data"].metadata["help"])
    groups = {k: p.add_argument_group(title) for k, title in GROUPS.items()}
    for f in dataclasses.fields(TrainConfig):
        m = f.metadata
        if not m or f.name == "data":
            continue
        names = ["--" + f.name.replace("_", "-")]
        if m["flags"] and m["flags"][0].startswith("--no-"):
            names = list(m["flags"])  # a default-true switch: only its --no- form exists
        else:
            names += list(m["flags"])
        kw: dict[str, Any] = dict(help=argparse.SUPPRESS if m["hidden"] else _help(f, m))
        if f.name in ("lr", "update_freq"):  # fairseq accepts lists; TrainConfig.from_args reads them
            kw.update(default=str(f.default), metavar="N", type=lr_list if f.name == "lr" else int_list)
        elif f.name == "min_lr":  # None = not given: the pre-2021 names (--max-lr) give it another meaning
            kw.update(default=None, type=nonneg)
        elif f.type in ("bool", bool) and m["kind"] != "bool":
            kw.update(action="store_false" if f.default else "store_true", default=f.default)
        else:
            kind = m["kind"] or (float if "float" in str(f.type) else int if "int" in str(f.type) else None)
            metavar = m["metavar"] or ("N" if "int" in str(f.type) else "X" if "float" in str(f.type) else None)
            if m["choices"] and len(m["choices"]) > 6:  # list long choices in the help, not in the usage line
                metavar = f.name.upper()
                kw["help"] += f"; one of: {', '.join(m['choices'])}"
            kw.update(default=f.default, choices=m["choices"], metavar=metavar)
            if kind is not None:
                kw["type"] = _checked(kind)
        groups[m["group"]].add_argument(*names, dest=f.name, **kw)
    o = groups["optimization"]
    o.add_argument("--max-lr", type=positive, default=None, help="old name of the peak lr; then --lr is the floor")
    add_model_args(p)


def _help(f: dataclasses.Field, m: dict[str, Any]) -> str:
    text = m["help"].replace("%", "%%")  # argparse formats help strings with %
    if f.type in ("bool", bool) or f.default in (None, ""):
        return text
    return f"{text} (default: {f.default})"


# ---- model flags, generated from ModelConfig (fairseq's names) -----------------------------------------------
MODEL_HELP = {
    "decoder_normalize_before": "pre-LN (every named --arch forces it; plain transformer_lm is post-LN without it)",
    "decoder_input_dim": "embedding width (plain transformer_lm: 512 unless given; named archs: the model width)",
    "decoder_output_dim": "width fed to the softmax (as --decoder-input-dim)",
    "adaptive_input_cutoff": "comma-separated band ends, e.g. 20000,60000",
    "adaptive_softmax_cutoff": "comma-separated cluster ends, e.g. 20000,60000",
    "character_filters": "char-CNN (width, channels) list",
    "decoder_layers_to_keep": "build only these layers (e.g. 0,2)",
    "decoder_layerdrop": "LayerDrop probability (training)",
    "quant_noise_pq": "iPQ quant-noise probability (training; rewrites the noised weights as fairseq does)",
    "checkpoint_activations": "recompute each layer's activations in backward (less memory, same numbers)",
    "offload_activations": "checkpoint activations and keep them in CPU memory (GPU)",
    "scale_attn": "NormFormer: LayerNorm after attention",
    "scale_fc": "NormFormer: LayerNorm after the FFN activation",
    "scale_heads": "NormFormer: a learned scale per attention head",
    "scale_resids": "NormFormer: a learned scale on the FFN residual",
    "add_bos_token": "prepend <s> to every block (a task option in fairseq)",
}


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (fairseq's transformer_lm options; unset ones come from --arch)")
    for f in dataclasses.fields(ModelConfig):
        if f.name in ("vocab_size", "padding_idx"):
            continue
        flag = "--" + f.name.replace("_", "-")
        help_ = MODEL_HELP.get(f.name, f.name.replace("_", " "))
        t = str(f.type)
        if t == "bool":
            g.add_argument(flag, action="store_const", const=True, default=None, help=help_)
        elif "tuple" in t:
            g.add_argument(flag, default=None, metavar="N,N", help=help_)
        elif f.name == "activation_fn":
            g.add_argument(flag, default=None, choices=ACTIVATIONS, help=help_)
        elif "float" in t:
            g.add_argument(flag, type=nonneg, default=None, metavar="X", help=help_)
        elif "int" in t:
            g.add_argument(flag, type=nonneg, default=None, metavar="N", help=help_)
        else:
            g.add_argument(flag, default=None, help=help_)


def model_overrides(ns: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(ModelConfig):
        v = getattr(ns, f.name, None)
        if v is not None and f.name not in ("vocab_size", "padding_idx"):
            out[f.name] = v
    return out
