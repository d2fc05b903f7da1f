"""Validation during training: fairseq's summed loss over the validation batches, all processes together."""

from __future__ import annotations

import math

import torch

from adaptive_lm.core.metrics import perplexity
from adaptive_lm.core.progress import Progress
from adaptive_lm.training.checkpoint import metric_value
from adaptive_lm.training.distributed import all_reduce_sum
from adaptive_lm.training.trainer import Trainer


@torch.no_grad()
def validate(t: Trainer) -> float | None:
    """The validation loss (bits per token, summed over processes), logged; None without a validation split or
    when a signal abandons it (one process: the checkpoint comes first)."""
    if t.valid_batches is None:
        return None
    with t.kernel_choice():
        return _validate(t)


def _validate(t: Trainer) -> float | None:
    t.model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=t.device)  # nats, summed on the device
    tokens = sentences = steps = 0
    n = len(t.valid_batches)
    if t.cfg.max_valid_steps:  # fairseq breaks at ``i > max_valid_steps``: N + 1 batches
        n = min(n, t.cfg.max_valid_steps + 1)
    with Progress(n, f"valid on '{t.cfg.valid_subset}'", t.cfg.progress_bar and t.rank == 0) as bar:
        for s in t.valid_batches.iterate(epoch=1, stop=n):
            if t.world == 1 and t.stop_requested:  # a signal: abandon it, the checkpoint comes first
                t.log.info("validation abandoned (signal); saving checkpoint_last.pt")
                return None
            bar.update(1)
            steps += 1  # every process walks the same number (its shard padded with empty batches, as fairseq's)
            if s["ntokens"] == 0:
                continue
            src, tgt = s["src_tokens"].to(t.device), s["target"].to(t.device)
            with t.autocast():
                loss = t.model.loss(src, tgt, t.cfg.tail_ignore_quirk)
            loss_sum += loss.detach().double()
            tokens += s["ntokens"]
            sentences += s["src_tokens"].shape[0]
    stats = torch.stack([loss_sum, *(loss_sum.new_full((), float(v)) for v in (tokens, sentences))])
    loss_sum, tokens, sentences = all_reduce_sum(stats).tolist()
    val = loss_sum / max(tokens, 1) / math.log(2)
    t.valid_history.append(val)
    metric = t.cfg.best_checkpoint_metric
    now = metric_value(t.cfg, val)  # fairseq logs best_<metric> = best(save_checkpoint.best, this one)
    best = (
        now
        if t.state.best_val is None
        else (max if t.cfg.maximize_best_checkpoint_metric else min)(now, t.state.best_val)
    )
    t.log.log(
        "valid",
        {
            "epoch": t.state.epoch,
            "loss": round(val, 3),
            "ppl": round(perplexity(val), 2),
            "num_updates": t.state.num_updates,
            f"best_{metric}": best,
            # fairseq logs one value per validation step, summed over the processes' batches (round=1): per batch
            # with one process; with several, what the processes' batches of a step hold together
            "wpb": round(tokens / max(steps, 1), 1),
            "bsz": round(sentences / max(steps, 1), 1),
            "tokens": int(tokens),
        },
        t.state.num_updates,
    )
    return val
