"""Dropout, causal attention and cross-entropy for CPU training, fast and memory-lean (GPUs mostly use PyTorch's
own kernels).

Why: on CPU, PyTorch's dropout draws one Mersenne-Twister number per element (a third of a small model's step
time) and ``scaled_dot_product_attention`` with dropout falls back to a math path that stores B x H x T x T
probabilities and masks per layer (gigabytes at the recipe's T = 3072). Here:

* ``dropout``: the keep-mask comes from 16-bit lanes of 64-bit random words (4 draws per word, numpy's
  PCG64-DXSM), seeded from the global torch RNG (so the trainer's per-update seeding makes resumed runs
  identical), and is kept for backward already scaled, in the input's dtype. Keep probability is quantised to
  1/65536 and the scale uses the exact quantised value, so the expectation is preserved.
* ``causal_attention``: at T x T small enough to keep, the probabilities are stored (``_StoredAttention``, a
  few heads at a time so that every pass over the scores stays in cache); above that, flash-attention-style
  (``_CausalAttention``): query blocks attend only to the keys at or before them (the masked upper triangle
  is skipped, about half the FLOPs at long T), softmax in fp32, attention dropout with regenerated masks;
  only q, k, v and one log-sum-exp per query are kept for backward. Without gradients or dropout and at
  T <= 128 (rescoring's sentences), scores, softmax and product a few heads at a time (``_short_attention``).
* ``one_query_attention``: a decoding step's one query over the cached keys, as two batched products.
* ``prefix_attention``: new positions after each row's own number of earlier ones (rescoring's shared prefixes).
* ``suffix_attention``: T queries after S - T earlier positions (evaluation's context window), the same way.
* ``add_dropout``: a residual ``x + dropout(h)`` in one ``addcmul`` pass.
* ``cross_entropy_sum``: summed cross-entropy whose backward is softmax - onehot in one pass (any device);
  ``log_softmax_``: the scorers' log-softmax written over their logits.
* ``pad_rows``: row counts rounded to a few sizes where oneDNN builds a kernel per shape (CPU half precision,
  and fp32 inside ``FastLinears``).
* ``FastLinears``: within it, fp32 ``linear`` / ``Linear`` (``F.linear`` / ``nn.Linear`` as the model's modules call
  them; forward, and both backward GEMMs under autograd) on the faster of MKL and oneDNN for each shape, measured
  once on the machine and cached (``choice.py``).
* ``packed_weights`` (inference, ``fast_linears(device, packed=True)``): within it, those linears may also run on
  oneDNN's packed copy of each weight, and what is made from the weights (``block_weight``: the adaptive softmax's
  concatenated head, the adaptive input's whole-vocabulary table; ``weights_fixed`` says whether one is inside) is
  made once per block.

Which kernels run is an explicit setting, ``use_plain_kernels(True)`` (``--kernels plain`` on the command line):
then CPU runs exactly what CUDA runs (PyTorch's dropout, ``F.scaled_dot_product_attention(is_causal=True)``, no
row padding, the sync-free branch of ``cross_entropy_sum``), which is how the GPU path is tested on CPU.

Importing this package first settles MKL VML's kernel choices on one thread (``vml``: a first call made by several
threads at once could run a 12-bit ``exp``). Modules, bottom to top: ``switch`` (the setting, the random numbers),
``vml`` <- ``dropout``, ``cross_entropy``, ``linears`` (fp32 linears; ``choice``: which library for which shape)
<- ``attention``. The row padding for oneDNN (``bucket``, ``wants_buckets``, ``pad_rows``) lives here rather
than in a submodule: it depends on the switch and on the linears' mode, and ``pad_rows`` reads ``wants_buckets``
from this package, so that setting ``adaptive_lm.core.kernels.wants_buckets`` (the tests force padding that way)
reaches every caller. The names below are the public ones, plus the private autograd functions and mask helpers
the kernel tests check directly.
"""

from __future__ import annotations

import torch
from torch import Tensor

# the private names (``_Dropout as _Dropout``, ...) are re-exported for the kernel tests, which check the autograd
# functions and the masks directly
from adaptive_lm.core.kernels.attention import (
    MATH_PATH_MAX_SCORES,
    causal_attention,
    one_query_attention,
    prefix_attention,
    suffix_attention,
)
from adaptive_lm.core.kernels.attention import _CausalAttention as _CausalAttention
from adaptive_lm.core.kernels.attention import _chunk as _chunk
from adaptive_lm.core.kernels.attention import _StoredAttention as _StoredAttention
from adaptive_lm.core.kernels.cross_entropy import cross_entropy_sum, linear_cross_entropy_sum, log_softmax_
from adaptive_lm.core.kernels.dropout import _Dropout as _Dropout
from adaptive_lm.core.kernels.dropout import _DropoutAdd as _DropoutAdd
from adaptive_lm.core.kernels.dropout import _keep_mask as _keep_mask
from adaptive_lm.core.kernels.dropout import _scale as _scale
from adaptive_lm.core.kernels.dropout import add_dropout, dropout
from adaptive_lm.core.kernels.linears import (
    FastLinears,
    Linear,
    block_weight,
    fast_linears,
    linear,
    packed_weights,
    recompute_contexts,
    weights_fixed,
)
from adaptive_lm.core.kernels.switch import SETTINGS, ours, plain_kernels, prepare_for_compile, use_plain_kernels
from adaptive_lm.core.kernels.topk import topk_rows
from adaptive_lm.core.kernels.vml import warm_vml

warm_vml()  # before any op can make VML's first, racy, multi-threaded call (vml.py)


# ---- row padding for oneDNN ------------------------------------------------------------------------------------
def bucket(n: int) -> int:
    """``n`` rounded up to a coarse size: a multiple of 64 up to 128, then of half the power of two below ``n``
    (128, 192, 256, 384, 512, 768, ...; at most 50% padding, a handful of sizes per octave).

    Why: the rows of an adaptive-softmax tail or an adaptive-input band change with every batch, and CPU bf16
    matmuls (oneDNN) build and cache a kernel per shape; with rounded sizes the few shapes repeat across steps.
    """
    if n <= 128:
        return -(-n // 64) * 64
    step = 1 << (n.bit_length() - 2)  # half of the power of two at or below n
    return -(-n // step) * step


def wants_buckets(device: torch.device, dtype: torch.dtype) -> bool:
    """Row bucketing pays only where oneDNN runs the matmuls: CPU in bf16/fp16 (autocast or half weights), and fp32
    inside ``FastLinears``. Plain fp32 on CPU goes to MKL, which caches nothing per shape; there the padding was
    pure cost (3% of a small step)."""
    if device.type != "cpu" or SETTINGS.plain:
        return False
    return dtype in (torch.bfloat16, torch.float16) or torch.is_autocast_enabled(device.type) or FastLinears.active()


def pad_rows(rows: Tensor, weight: Tensor) -> Tensor:
    """``rows`` (a 1-D index list) extended to ``bucket(len)`` entries by repeating its first one where the
    matmuls with ``weight`` run on oneDNN (see ``wants_buckets``); callers keep the first ``len(rows)`` results,
    so only the matmul shapes change (and repeat across batches). Elsewhere ``rows`` unchanged."""
    n = rows.numel()
    if n == 0 or not wants_buckets(weight.device, weight.dtype) or bucket(n) == n:
        return rows
    return torch.cat([rows, rows[:1].expand(bucket(n) - n)])


__all__ = [
    "MATH_PATH_MAX_SCORES",
    "SETTINGS",
    "FastLinears",
    "Linear",
    "add_dropout",
    "block_weight",
    "bucket",
    "causal_attention",
    "cross_entropy_sum",
    "dropout",
    "fast_linears",
    "linear",
    "linear_cross_entropy_sum",
    "log_softmax_",
    "one_query_attention",
    "prefix_attention",
    "ours",
    "packed_weights",
    "pad_rows",
    "plain_kernels",
    "prepare_for_compile",
    "recompute_contexts",
    "suffix_attention",
    "topk_rows",
    "use_plain_kernels",
    "wants_buckets",
    "warm_vml",
    "weights_fixed",
]
