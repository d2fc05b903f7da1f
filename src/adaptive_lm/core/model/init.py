"""How fairseq draws and noises weights, shared by the modules: the default ``nn.Linear`` draws that fairseq makes
and then overwrites (consumed here so that a seed gives fairseq's initial weights), its re-initialised ``Linear``,
and its quant-noise."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from adaptive_lm.core.kernels import Linear


def _linear_init_draw(out_features: int, in_features: int) -> None:
    """Consume the random numbers that building a bias-free ``nn.Linear(in_features, out_features)`` draws."""
    nn.init.kaiming_uniform_(torch.empty(out_features, in_features), a=math.sqrt(5))


def fairseq_linear(in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
    """fairseq's ``transformer_decoder.Linear``: an ``nn.Linear`` (its default init draws), re-drawn xavier_uniform,
    bias 0 (``project_in_dim`` / ``project_out_dim``)."""
    m = Linear(in_features, out_features, bias)
    nn.init.xavier_uniform_(m.weight)
    if bias:
        nn.init.zeros_(m.bias)
    return m


@torch.no_grad()
def quant_noise_(weight: Tensor, p: float, block_size: int) -> None:
    """fairseq's iPQ quant-noise (``fairseq/modules/quant_noise.py``) on an ``(out, in)`` weight matrix.

    In each row, blocks of ``block_size`` input weights are dropped with probability ``p`` and the rest scaled by
    1 / (1 - p), the mask drawn as fairseq draws it. Like fairseq's forward pre-hook this **replaces the
    parameter's data** (``weight.data = ...``, at every training forward): the weights keep the noised values and
    the optimizer updates those. fairseq applies it to the feed-forward layers, the adaptive-input projections and
    the extra embedding Linear; its attention (fast path) and its adaptive softmax (never given the setting) escape.
    """
    out_f, in_f = weight.shape
    mask = torch.zeros(in_f // block_size * out_f, device=weight.device).bernoulli_(p)
    mask = mask.repeat_interleave(block_size, -1).view(-1, in_f).bool()  # (out, in)
    weight.data = weight.data.masked_fill(mask, 0) * (1 / (1 - p))
