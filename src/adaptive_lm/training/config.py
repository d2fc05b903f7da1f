"""The training configuration: one flat dataclass whose fields *are* ``adaptive-lm train``'s flags.

Each field carries its help text, group, choices and fairseq aliases as metadata (``core.options.opt``);
``adaptive_lm.cli.train`` generates the flags from them (model flags come from ``ModelConfig``) and reads a parsed
command line back, the few fields that need logic included (fairseq's pre-2021 lr names, ``--update-freq`` lists,
``--criterion``). Defaults are written once, here. Tests and library users build a ``TrainConfig(...)`` directly.

Flag names and meanings are fairseq-train's (``fairseq/dataclass/configs.py``), so published recipes run
unchanged with ``fairseq-train`` replaced by ``adaptive-lm train``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from adaptive_lm.core.data import DATASET_IMPLS
from adaptive_lm.core.errors import UserError
from adaptive_lm.core.options import opt
from adaptive_lm.core.presets import ARCH_CHOICES

GROUPS = {
    "dataset": "dataset and batching",
    "optimization": "optimization (NAG, cosine schedule)",
    "checkpoint": "checkpoints",
    "distributed": "distributed (torchrun)",
    "logging": "logging",
    "hardware": "hardware and precision",
}


@dataclass
class TrainConfig:
    # ---- dataset ----
    data: str = opt("", "binarised data folder (dict.txt, train.bin/.idx, valid.bin/.idx)", "dataset", positional=True)
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
    dataset_impl: str | None = opt(
        None,
        "fairseq's index format (mmap, lazy, cached); default: read from the files",
        "dataset",
        choices=list(DATASET_IMPLS),
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
        None, "validate on N + 1 batches at most (fairseq's count)", "dataset", kind="positive", flags=("--nval",)
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
        "cosine",
        "cosine (fairseq's cosine with linear warmup) or fixed (an lr per epoch from the --lr list)",
        "optimization",
        choices=["cosine", "fixed"],
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
    lr_shrink: float = opt(
        0.1, "peak lr factor per cosine restart (fixed: per epoch from --force-anneal)", "optimization", kind="positive"
    )
    force_anneal: int | None = opt(
        None, "fixed schedule: from this epoch on, the last --lr times --lr-shrink per epoch", "optimization",
        kind="nonneg",
    )  # fmt: skip
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
    reset_optimizer: bool = opt(
        False, "do not restore the momentum buffers (nor the best loss, as fairseq)", "checkpoint"
    )
    reset_lr_scheduler: bool = opt(
        False,
        "forget the saved schedule state (fixed: the saved epoch's lr, which --stop-min-lr checks at the start; "
        "cosine keeps none: its lr follows the update count)",
        "checkpoint",
    )
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
    fp16_init_scale: float = opt(
        128.0, "initial loss scale for --fp16/--amp (fairseq's --amp-init-scale for --amp; both default to 128)",
        "hardware", kind="positive", flags=("--amp-init-scale",),
    )  # fmt: skip
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
    lr_scheduler_given: bool = True  # False: the command line had no --lr-scheduler (fairseq's default is fixed)
    lr_epochs: tuple[float, ...] = ()  # the fixed schedule's --lr list (one lr per epoch); () = (lr,)
    update_freq_epochs: tuple[int, ...] = ()  # the --update-freq list (one per epoch, the last repeated); () = (uf,)

    def update_freq_at(self, epoch: int) -> int:
        """fairseq's ``update_freq[epoch - 1]``, the list's last value after its end."""
        freqs = self.update_freq_epochs or (self.update_freq,)
        return freqs[min(epoch, len(freqs)) - 1]

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
        top = 2**32 - 2  # numpy (fairseq's too) seeds the batch order with seed + epoch, at most 2**32 - 1
        if not 0 <= self.seed <= top:
            raise UserError(f"--seed {self.seed}: give a seed from 0 to {top} (numpy seeds the batches with seed + 1)")
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
        if self.lr_scheduler == "fixed":
            cosine_only = {"--lr-period-updates": self.lr_period_updates != -1, "--t-mult": self.t_mult != 1.0,
                           "--warmup-init-lr": self.warmup_init_lr != -1.0}  # fmt: skip
            given = [flag for flag, on in cosine_only.items() if on]
            if given:  # fairseq's parser has them only with --lr-scheduler cosine
                raise UserError(f"{', '.join(given)} belong to the cosine schedule, not --lr-scheduler fixed")
        elif self.force_anneal is not None:
            raise UserError("--force-anneal belongs to --lr-scheduler fixed (fairseq's cosine has no such option)")
        elif len(self.lr_epochs) > 1:
            raise UserError("--lr takes one value with the cosine schedule (fairseq rejects a list too)")
        if self.lr_scheduler == "cosine" and self.max_update == 0 and self.lr_period_updates <= 0:  # fairseq asserts
            raise UserError(
                "the cosine schedule needs --max-update or --lr-period-updates (the recipe passes --max-update 286000)"
            )
