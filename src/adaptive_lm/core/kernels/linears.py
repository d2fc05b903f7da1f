"""fp32 linears on oneDNN instead of MKL: ``OneDNNLinears`` (a torch function mode), ``fast_linears`` (it, where our
CPU kernels run), ``recompute_contexts`` (it again when checkpointed activations are recomputed)."""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from adaptive_lm.core.kernels.switch import SETTINGS


def _onednn_linear(x2: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """(N, in) x (out, in)^T (+ b) -> (N, out) in fp32 by oneDNN's GEMM."""
    return torch.ops.mkldnn._linear_pointwise(x2, w.contiguous(), b, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """``F.linear`` whose forward and backward GEMMs all run on oneDNN: d(x) = dy @ W and d(W) = dy^T @ x as linears
    over transposed operands (a copy of W and of x per backward: bandwidth, small next to the GEMMs' flops)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:  # type: ignore[override]
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        ctx.save_for_backward(x2, w)
        ctx.x_shape, ctx.has_bias = x.shape, b is not None
        return _onednn_linear(x2, w, b).view(*x.shape[:-1], w.shape[0])  # (..., out)

    @staticmethod
    def backward(ctx, gy: Tensor):  # type: ignore[override]
        x2, w = ctx.saved_tensors
        gy2 = gy.reshape(-1, gy.shape[-1]).contiguous()  # (N, out)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _onednn_linear(gy2, w.t(), None).view(ctx.x_shape)  # (N, out) @ (out, in)
        if ctx.needs_input_grad[1]:
            gw = _onednn_linear(gy2.t(), x2.t(), None)  # (out, N) @ (N, in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy2.sum(0)  # (out,)
        return gx, gw, gb


class OneDNNLinears(TorchFunctionMode):
    """Within ``with OneDNNLinears():``, fp32 CPU ``F.linear`` calls run on oneDNN, not MKL; under autograd the
    backward's two GEMMs too (``_OneDNNLinear``).

    Why: MKL takes a slower path on AMD CPUs; on an AMD EPYC (Zen 5) its fp32 GEMMs of our shapes run at 40-45%
    of oneDNN's (2048^3: 217 vs 460 GFLOP/s on 2 cores; 4096 x 128 x 2002, the fixture's softmax head: 139 vs
    384), forward + backward of a linear layer 1.5-1.9x faster at the 14M model's shapes, with fp32 results equal
    up to summation order. A torch function mode is thread-local and ends with the block, so no other code is
    affected; every other call (other dtypes or devices, autocast, a PyTorch without the op) goes through
    unchanged. Used by training, validation, evaluation, scoring and rescoring on our CPU kernels."""

    _ok: bool | None = None
    _depth = threading.local()  # how many of these blocks this thread is in (row bucketing asks)

    @classmethod
    def active(cls) -> bool:
        return getattr(cls._depth, "n", 0) > 0

    def __enter__(self) -> OneDNNLinears:
        OneDNNLinears._depth.n = getattr(OneDNNLinears._depth, "n", 0) + 1
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        OneDNNLinears._depth.n -= 1
        super().__exit__(*exc)

    @classmethod
    def available(cls) -> bool:
        if cls._ok is None:
            op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
            try:
                g = torch.Generator().manual_seed(0)  # never the global generator: it is the user's
                x, w, b = (torch.randn(*s, generator=g) for s in ((3, 8), (5, 8), (5,)))
                cls._ok = bool(
                    op is not None
                    and torch.backends.mkldnn.is_available()
                    and torch.allclose(op(x, w, b, "none", [], ""), F.linear(x, w, b), atol=1e-5)
                )
            except (RuntimeError, TypeError):
                cls._ok = False
        return cls._ok

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func is F.linear and not torch.is_autocast_enabled("cpu"):
            x, w = args[0], args[1]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            if x.dtype == torch.float32 and w.dtype == torch.float32 and x.device.type == "cpu" and x.dim() >= 1:
                if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w, b)):
                    return _OneDNNLinear.apply(x, w, b)
                y = _onednn_linear(x.reshape(-1, x.shape[-1]), w, b)  # (N, out)
                return y.view(*x.shape[:-1], w.shape[0])
        return func(*args, **kwargs)


def recompute_contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """``context_fn`` for ``torch.utils.checkpoint``: the recomputation in backward runs under the same linear
    kernels as the forward did (a torch function mode is not active inside the autograd engine), so it saves the
    same tensors and computes the same numbers."""
    again = OneDNNLinears() if OneDNNLinears.active() else contextlib.nullcontext()
    return contextlib.nullcontext(), again


def fast_linears(device: torch.device) -> contextlib.AbstractContextManager:
    """``OneDNNLinears`` on our CPU kernels (not with plain kernels: CUDA's path has no such mode)."""
    ok = device.type == "cpu" and not SETTINGS.plain and OneDNNLinears.available()
    return OneDNNLinears() if ok else contextlib.nullcontext()
