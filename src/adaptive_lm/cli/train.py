"""``adaptive-lm train``: fairseq-train's flags (generated from ``TrainConfig`` and ``ModelConfig``), the run, the
exit code of a signal."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import signal
from typing import Any

from adaptive_lm.cli.common import (
    add_config_flags,
    add_refused_fairseq_flags,
    config_from_args,
    console_log,
    nonneg_float,
    nonneg_int,
    positive,
)
from adaptive_lm.core.config import ACTIVATIONS, ModelConfig
from adaptive_lm.core.errors import UserError
from adaptive_lm.training.config import GROUPS, TrainConfig

HELP = "train a language model (fairseq-train's flags)"


def lr_list(s: str) -> str:
    """fairseq's ``--lr`` is a comma-separated list of positive numbers (one per epoch for the fixed schedule; the
    cosine one takes one)."""
    for x in s.split(","):
        positive(x)
    return s


def int_list(s: str) -> str:
    """fairseq's ``--update-freq`` is a comma-separated list of positive integers (one per epoch, the last one
    repeated)."""
    for x in s.split(","):
        v = positive(x)
        if not isinstance(v, int):
            raise argparse.ArgumentTypeError(f"{x!r} must be a positive integer")
    return s


def add_args(p: argparse.ArgumentParser) -> None:
    """``adaptive-lm train``'s flags from TrainConfig's and ModelConfig's fields, in fairseq-train's sections."""
    groups = {k: p.add_argument_group(title) for k, title in GROUPS.items()}
    special = {  # fairseq accepts lists here; train_config reads them. min_lr None = not given (see --max-lr)
        "lr": dict(default=str(TrainConfig.lr), metavar="LR", type=lr_list),
        "update_freq": dict(default=str(TrainConfig.update_freq), metavar="N", type=int_list),
        "min_lr": dict(default=None, help=f"floor of the cosine schedule (default: {TrainConfig.min_lr})"),
        "lr_scheduler": dict(
            default=None,
            help="cosine (fairseq's cosine with linear warmup) or fixed (an lr per epoch from the --lr list); "
            "unset: cosine, with a note (fairseq's default is fixed)",
        ),  # fmt: skip
    }
    add_config_flags(p, TrainConfig, groups, special=special)
    groups["optimization"].add_argument(
        "--max-lr", type=positive, default=None, help="old name of the peak lr; then --lr is the floor"
    )
    add_model_args(p)
    for flag in DISTRIBUTED_FLAGS:  # fairseq's own launcher: named, and pointed to torchrun
        p.add_argument(flag, action=_UseTorchrun, nargs="?", help=argparse.SUPPRESS)
    add_refused_fairseq_flags(p)


# fairseq-train's flags for starting its own processes: here torchrun starts them and sets the environment
DISTRIBUTED_FLAGS = ("--distributed-world-size", "--distributed-rank", "--distributed-init-method",
                     "--distributed-port", "--distributed-backend", "--device-id", "--nprocs-per-node",
                     "--distributed-num-procs", "--distributed-no-spawn")  # fmt: skip


class _UseTorchrun(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, ns: argparse.Namespace, values: Any, opt: Any = None) -> None:
        parser.error(f"{opt}: processes are started by torchrun here, not by fairseq's launcher: "
                     "torchrun --nproc_per_node N -m adaptive_lm train ... (see docs/from-fairseq.md)")  # fmt: skip


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
    "scale_attn": "NormFormer: LayerNorm after attention (accepted, but fairseq 0.12 and train build no such layer)",
    "scale_fc": "NormFormer: LayerNorm after the FFN activation (accepted, not built: as in fairseq 0.12)",
    "scale_heads": "NormFormer: a learned scale per attention head (accepted, not built: as in fairseq 0.12)",
    "scale_resids": "NormFormer: a learned scale on the FFN residual (accepted, not built: as in fairseq 0.12)",
    "add_bos_token": "prepend <s> to every block (a task option in fairseq)",
    "tpu": "refused: TPUs are not supported (train on CPUs or CUDA GPUs with torchrun)",
    "base_layers": "refused: fairseq's BASE layers are not reproduced",
    "base_sublayers": "BASE layers' sublayers (only with --base-layers, which is refused)",
    "base_shuffle": "BASE layers' shuffle (only with --base-layers, which is refused)",
    "quant_noise_scalar": "refused: fairseq's scalar quant-noise (int8 emulation) is not reproduced",
    "decoder_xformers_att_config": "refused: xFormers attention variants are not reproduced",
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
            g.add_argument(flag, type=nonneg_float, default=None, metavar="X", help=help_)
        elif "int" in t:
            g.add_argument(flag, type=nonneg_int, default=None, metavar="N", help=help_)
        else:
            g.add_argument(flag, default=None, help=help_)


def model_overrides(ns: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(ModelConfig):
        v = getattr(ns, f.name, None)
        if v is not None and f.name not in ("vocab_size", "padding_idx"):
            out[f.name] = v
    return out


def train_config(ns: argparse.Namespace) -> TrainConfig:
    """A parsed ``adaptive-lm train`` command line -> TrainConfig: fairseq's pre-2021 lr names (``--max-lr`` peak,
    ``--lr`` floor, ``--min-lr`` stop threshold), ``--lr``/``--update-freq`` given as fairseq's lists, and
    ``--criterion cross_entropy`` switching the tail quirk off."""
    lrs = [float(x) for x in str(ns.lr).split(",")]  # checked by the parser (lr_list)
    given: dict[str, Any] = {"lr": lrs[0], "lr_epochs": tuple(lrs)}
    if ns.lr_scheduler == "fixed" and (ns.max_lr is not None or ns.min_lr is not None):
        raise UserError("--max-lr and --min-lr belong to the cosine schedule, not --lr-scheduler fixed")
    if ns.max_lr is not None:  # pre-2021 names
        given.update(lr=ns.max_lr, min_lr=lrs[0], stop_min_lr=ns.min_lr if ns.min_lr is not None else ns.stop_min_lr)
    elif ns.min_lr is None:
        given["min_lr"] = TrainConfig.min_lr
    freqs = [int(x) for x in str(ns.update_freq).split(",")]  # checked by the parser (int_list)
    given["update_freq"], given["update_freq_epochs"] = freqs[0], tuple(freqs)
    if ns.lr_scheduler is None:  # said at the start of training (report.start_lines)
        given["lr_scheduler"], given["lr_scheduler_given"] = "cosine", False
    given["tail_ignore_quirk"] = ns.tail_ignore_quirk and ns.criterion == "adaptive_loss"
    given["model_overrides"] = model_overrides(ns)
    return config_from_args(TrainConfig, ns, **given)


def run(ns: argparse.Namespace) -> int:
    from adaptive_lm.training.loop import train

    cfg = train_config(ns)
    with console_log():
        try:
            result = train(cfg)
        except RuntimeError as e:  # gloo/NCCL: another process of the run died (killed, out of memory, a node lost)
            if not _peer_lost(e):
                raise
            raise UserError(
                f"another process of this run stopped ({_first_words(e)}); the last checkpoint in "
                f"{cfg.save_dir} is kept: run the same torchrun command again to resume"
            ) from None
    if result["signal"]:  # saved and stopping: a repeated signal must not turn the exit into a crash
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        return 128 + result["signal"]
    return 0


def _peer_lost(e: RuntimeError) -> bool:
    """A collective failed because a peer went away (what the surviving processes see when one is killed); the
    process group is already destroyed by then, so the run's size comes from torchrun's environment."""
    import torch.distributed as dist

    if os.environ.get("WORLD_SIZE", "1") in ("", "0", "1"):
        return False
    return isinstance(e, getattr(dist, "DistError", ())) or any(
        w in str(e) for w in ("gloo", "NCCL", "Connection reset", "Connection closed")
    )


def _first_words(e: Exception) -> str:
    """The gloo/NCCL message's first line without its source-location prefix, at most 100 characters."""
    line = re.sub(r"^\[[^\]]*\]\s*", "", (str(e).splitlines() or [""])[0])
    return line if len(line) <= 100 else line[:97] + "..."
