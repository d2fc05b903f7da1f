"""Loss and perplexity: one place for the conversion every report uses."""

from __future__ import annotations

import math


def perplexity(loss_base2: float) -> float:
    """2 ** loss (loss in bits per token), or inf where that overflows (a diverged model), never an OverflowError."""
    try:
        return 2.0**loss_base2
    except OverflowError:
        return math.inf


def perplexity_nats(loss_nats: float) -> float:
    """exp(loss) for a loss in nats per token (an entropy rate, a mean ln p), inf on overflow."""
    return perplexity(loss_nats / math.log(2))
