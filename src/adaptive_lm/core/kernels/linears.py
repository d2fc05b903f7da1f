"""fp32 CPU linears on the faster of MKL and oneDNN for each shape (``choice.py`` measures and caches): ``linear`` and
``Linear`` (``F.linear`` and ``nn.Linear`` that use them inside ``FastLinears``, a thread-local switch),
``fast_linears`` (the switch, where our CPU kernels run), ``recompute_contexts`` (it again when checkpointed
activations are recomputed)."""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaptive_lm.core.kernels import choice
from adaptive_lm.core.kernels.switch import SETTINGS


def _onednn_linear(x2: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """(N, in) x (out, in)^T (+ b) -> (N, out) in fp32 by oneDNN's GEMM."""
    return torch.ops.mkldnn._linear_pointwise(x2, w.contiguous(), b, "none", [], "")


def forward_gemm(x2: Tensor, w: Tensor, b: Tensor | None, packable: bool = False) -> Tensor:
    """y = x W^T (+ b), (N, in) -> (N, out), on the library measured fastest for this shape; with ``packable`` (no
    autograd) inside ``packed_weights``, oneDNN on its packed copy of W is a third candidate.

    Inside the block the call chosen for (W, b, N, in) is kept and reused while W is unchanged (the same tensor, memory
    and version): a decoding step runs a dozen small linears, and choosing afresh (the packed copy's key, the choice
    table) cost more than some of their GEMMs."""
    block = getattr(_PACK, "block", None) if packable else None
    if block is not None:
        key = (id(w), id(b), x2.shape[0], x2.shape[1])
        hit = block.calls.get(key)
        if hit is not None and hit[0] is w and hit[1] is b and hit[2] == _state(w):
            return hit[3](x2)
    calls: dict[str, Callable[[Tensor], Tensor]] = {
        "mkl": lambda x: F.linear(x, w, b),
        "onednn": lambda x: _onednn_linear(x, w, b),
    }
    kind = "fwd"
    wp = _packed(w, x2.shape[0]) if packable else None
    if wp is not None:
        calls["onednn-packed"] = lambda x: torch.ops.mkldnn._linear_pointwise(x, wp, b, "none", [], "")
        kind = "fwd-packed"  # its own entries: outside the block the packed candidate does not exist
    runs = {name: functools.partial(f, x2) for name, f in calls.items()}
    call = calls[choice.CHOICE.pick(kind, x2.shape[0], x2.shape[1], w.shape[0], runs)]
    if block is not None and (wp is not None or isinstance(w, nn.Parameter)):  # not a temporary: one entry per call
        block.calls[key] = (w, b, _state(w), call)  # holds w and b: their ids stay theirs while the block lasts
    return call(x2)


def _state(t: Tensor) -> tuple[int, int]:
    """A tensor's memory and version counter (-1 for an inference tensor, which has none): what a kept call checks."""
    return t.data_ptr(), -1 if t.is_inference() else t._version


PACK_MAX_BYTES = 64 << 20  # larger weights (a wiki103 head: 82 MB) stay unpacked: the copy would cost more memory
PACK_BUDGET_BYTES = 1 << 30  # packed copies kept per block at most (a 247M-parameter model's layers: about 0.8 GB)
_PACK = threading.local()  # .block: the open ``packed_weights`` block's ``_Block`` (None or absent outside)


class _Block:
    """What a ``packed_weights`` block keeps: packed copies {key: (weight, packed)}, weights made from parameters
    {sources' keys: (sources, weight)} and chosen calls (``forward_gemm``); each entry holds its tensors, so no
    address under a key can be reused by another tensor while the block lasts."""

    def __init__(self) -> None:
        self.packed: dict[tuple, tuple[Tensor, Tensor]] = {}
        self.made: dict[tuple, tuple[tuple[Tensor, ...], Tensor]] = {}
        self.calls: dict[tuple, tuple] = {}  # forward_gemm's chosen call per (W, b, N, in)

    def is_made(self, w: Tensor) -> bool:
        return any(m is w for _, m in self.made.values())  # a few entries: the head, the input table


@contextlib.contextmanager
def packed_weights() -> Iterator[None]:
    """Within (this thread): no-grad fp32 linears may run on oneDNN's packed layout of their weight, made on first
    use and kept until the block ends (one extra copy of each weight used, up to ``PACK_MAX_BYTES`` each and
    ``PACK_BUDGET_BYTES`` in all). Generation, evaluation, scoring and rescoring run in it
    (``fast_linears(device, packed=True)``).

    Why: they run the same weights on batch after batch, and oneDNN converts a plain weight to its blocked layout on
    every call; with the conversion done once the 80-row decoding linears took 0.65-0.8x the time (Zen 5, natively
    and under the AVX2 caps), rescoring 10,000 hypotheses 0.85x, evaluation 0.92x. Measured per shape against the
    other two like any linear. A weight changed in place (its version counter moves) is packed again; a change made
    through ``.data`` moves no counter and would not be seen: the block is for inference, not for an optimizer."""
    prev = getattr(_PACK, "block", None)
    _PACK.block = _Block() if prev is None else prev  # a nested block shares the outer one
    try:
        yield
    finally:
        _PACK.block = prev


def weights_fixed() -> bool:
    """Whether this thread is inside ``packed_weights`` (inference: the weights stay as they are for the block, so
    what is made from them may be kept: ``block_weight``)."""
    return getattr(_PACK, "block", None) is not None


def _key(t: Tensor) -> tuple:
    """What identifies a tensor's values within a block: its memory, version counter (moved by in-place changes),
    shape and strides. Only sound while the cache holds the tensor (its memory cannot be reused meanwhile). An
    inference tensor (made under ``torch.inference_mode``: a model loaded there) has no version counter; its values
    are taken as fixed for the block."""
    return (t.data_ptr(), -1 if t.is_inference() else t._version, tuple(t.shape), t.stride())


def block_weight(sources: tuple[Tensor, ...], make: Callable[[], Tensor]) -> Tensor:
    """``make()``, a weight computed from ``sources`` (the adaptive softmax's head is its word and cluster rows
    concatenated); inside ``packed_weights`` made once per block (again if a source changes in place) and packed
    like a parameter. Outside the block, or where autograd must see the sources, ``make()`` at every call.

    Why: a weight made afresh at every call cannot be packed (its packed copy would be made at every call too);
    made once, the head's linear runs on the packed layout (rescoring 10,000 hypotheses: 1.31 -> 1.22 s)."""
    block = getattr(_PACK, "block", None)
    if block is None or (torch.is_grad_enabled() and any(s.requires_grad for s in sources)):
        return make()
    key = tuple(_key(s) for s in sources)
    if key not in block.made:
        block.made[key] = (sources, make())
    return block.made[key][1]


def _packed(w: Tensor, rows: int) -> Tensor | None:
    """The packed copy of ``w`` inside ``packed_weights`` (None: outside, too large, or neither a parameter nor a
    ``block_weight``). Not a temporary weight: it would be packed anew at every call. The cache holds the weight
    itself, so its memory cannot be reused by another tensor under the same key."""
    block = getattr(_PACK, "block", None)
    size = w.numel() * w.element_size()
    if block is None or size > PACK_MAX_BYTES or not _packing_ok():
        return None
    if not (isinstance(w, nn.Parameter) or block.is_made(w)):
        return None
    key = _key(w)
    if key not in block.packed:
        if sum(p.numel() * p.element_size() for p, _ in block.packed.values()) + size > PACK_BUDGET_BYTES:
            return None
        block.packed[key] = (w, torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), rows))
    return block.packed[key][1]


@functools.cache
def _packing_ok() -> bool:
    """Whether this PyTorch packs linear weights for oneDNN and the packed call computes x W^T (checked once)."""
    op, pack = torch.ops.mkldnn._linear_pointwise, torch.ops.mkldnn._reorder_linear_weight
    return _computes(  # x = b^T (4, 5), W = a^T (3, 5)
        lambda a, b: op(b.t().contiguous(), pack(a.t().contiguous(), 4), None, "none", [], ""), lambda a, b: b.t() @ a
    )


def input_grad_gemm(gy2: Tensor, w: Tensor) -> Tensor:
    """dx = dy W, (N, out) -> (N, in): MKL reads W as it is, oneDNN takes a transposed copy."""
    runs = {"mkl": lambda: gy2 @ w, "onednn": lambda: _onednn_linear(gy2, w.t(), None)}
    return runs[choice.CHOICE.pick("dx", gy2.shape[0], w.shape[0], w.shape[1], runs)]()


def _onednn_weight_grad(gy2: Tensor, x2: Tensor) -> Tensor:
    """dy^T x, (out, in), by oneDNN's inner-product backward-weights primitive: it reduces over the rows of both
    operands as they lie (no transposed copies, which ``_onednn_linear`` needs here); the two conversions to its
    layout are plain copies. The third argument only gives the result's dtype and device."""
    op = torch.ops.aten.mkldnn_linear_backward_weights
    return op(gy2.contiguous().to_mkldnn(), x2.contiguous().to_mkldnn(), gy2, False)[0]


def _computes(op: Callable[[Tensor, Tensor], Tensor], reference: Callable[[Tensor, Tensor], Tensor]) -> bool:
    """Whether ``op`` exists in this PyTorch and gives what ``reference`` gives on small seeded (5, 3) and (5, 4)
    operands: the check a fast path runs once before it trusts a oneDNN op (some builds lack the op, or oneDNN)."""
    try:
        g = torch.Generator().manual_seed(0)  # never the global generator: it is the user's
        a, b = torch.randn(5, 3, generator=g), torch.randn(5, 4, generator=g)
        return bool(torch.allclose(op(a, b), reference(a, b), atol=1e-5))
    except (AttributeError, RuntimeError, TypeError):
        return False


@functools.cache
def _weight_grad_primitive_ok() -> bool:
    """Whether this PyTorch has the backward-weights primitive and it computes dy^T x (checked once)."""
    return _computes(_onednn_weight_grad, lambda gy, x: gy.t() @ x)


def weight_grad_gemm(gy2: Tensor, x2: Tensor) -> Tensor:
    """dW = dy^T x, (out, in): MKL reads both transposed in place, oneDNN's GEMM takes transposed copies, its
    backward-weights primitive (``onednn-ip``) reads them as they are. On a Zen 5 the primitive ran the weight
    gradients of training at 0.6-0.8x the time of the better of the other two; under AVX2 MKL wins most shapes."""
    runs = {"mkl": lambda: gy2.t() @ x2, "onednn": lambda: _onednn_linear(gy2.t(), x2.t(), None)}
    if _weight_grad_primitive_ok():
        runs["onednn-ip"] = lambda: _onednn_weight_grad(gy2, x2)
    return runs[choice.CHOICE.pick("dw", gy2.shape[0], gy2.shape[1], x2.shape[1], runs)]()


class _FastLinear(torch.autograd.Function):
    """``F.linear`` whose forward and two backward GEMMs each run on the library measured fastest for its shape."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:  # type: ignore[override]
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        ctx.save_for_backward(x2, w)
        ctx.x_shape, ctx.has_bias = x.shape, b is not None
        return forward_gemm(x2, w, b).view(*x.shape[:-1], w.shape[0])  # (..., out)

    @staticmethod
    def backward(ctx, gy: Tensor):  # type: ignore[override]
        x2, w = ctx.saved_tensors
        gy2 = gy.reshape(-1, gy.shape[-1]).contiguous()  # (N, out)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = input_grad_gemm(gy2, w).view(ctx.x_shape)  # (..., in)
        if ctx.needs_input_grad[1]:
            gw = weight_grad_gemm(gy2, x2)  # (out, in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy2.sum(0)  # (out,)
        return gx, gw, gb


class FastLinears:
    """Within ``with FastLinears():`` (this thread), fp32 CPU linears through ``linear`` / ``Linear`` (forward, and
    under autograd both backward GEMMs: ``_FastLinear``) run on MKL or oneDNN, whichever ``choice.CHOICE`` measured
    faster for the shape.

    Why: the faster library depends on the CPU and the shape (``choice.py``): on an AMD Zen 5 oneDNN's fp32 GEMMs ran
    at twice MKL's, on a Zen 4 they are even for square shapes and MKL wins the weight gradients and small row counts.
    The results are equal up to summation order. A thread-local flag, not a torch function mode: a mode passes every
    torch call in the block through Python (about 1 us each), 8% of beam search's time on the fixture model; here
    only the linears look. Every other call (other dtypes or devices, autocast, a PyTorch without oneDNN's op) goes
    through unchanged. Used by training, validation, evaluation, scoring, rescoring and generation on our CPU
    kernels; a model of one's own gets it through ``Linear`` (an ``nn.Linear``) or ``linear``."""

    _ok: bool | None = None
    _depth = threading.local()  # how many of these blocks this thread is in (row bucketing asks too)

    @classmethod
    def active(cls) -> bool:
        return getattr(cls._depth, "n", 0) > 0

    def __enter__(self) -> FastLinears:
        FastLinears._depth.n = getattr(FastLinears._depth, "n", 0) + 1
        return self

    def __exit__(self, *exc: object) -> None:
        FastLinears._depth.n -= 1

    @classmethod
    def available(cls) -> bool:
        if cls._ok is None:  # x (5, 3), W (4, 3) and a bias (4,), cut from the check's operands
            cls._ok = torch.backends.mkldnn.is_available() and _computes(
                lambda a, b: torch.ops.mkldnn._linear_pointwise(a, b.t()[:, :3].contiguous(), b[0], "none", [], ""),
                lambda a, b: F.linear(a, b.t()[:, :3], b[0]),
            )
        return cls._ok


def linear(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """``F.linear(x, w, b)``, (..., in) -> (..., out); inside ``FastLinears`` an fp32 CPU call runs on the library
    measured fastest for its shape (with autograd, both backward GEMMs too)."""
    if (
        not torch.compiler.is_compiling()  # first: a compiled graph never reads the thread-local flag
        and FastLinears.active()
        and x.dtype == torch.float32
        and w.dtype == torch.float32
        and x.device.type == "cpu"
        and x.dim() >= 1
        and not torch.is_autocast_enabled("cpu")
    ):
        if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)):
            return _FastLinear.apply(x, w, b)
        y = forward_gemm(x.reshape(-1, x.shape[-1]), w, b, packable=True)  # (N, out)
        return y.view(*x.shape[:-1], w.shape[0])
    return F.linear(x, w, b)


class Linear(nn.Linear):
    """``nn.Linear`` (the same parameters, initialisation and state-dict keys) whose call goes through ``linear``."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


def recompute_contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """``context_fn`` for ``torch.utils.checkpoint``: the recomputation in backward runs under the same linear
    kernels as the forward did (backward may run outside the forward's block), so it saves the same tensors and
    computes the same numbers."""
    again = FastLinears() if FastLinears.active() else contextlib.nullcontext()
    return contextlib.nullcontext(), again


def fast_linears(device: torch.device, packed: bool = False) -> contextlib.AbstractContextManager:
    """``FastLinears`` on our CPU kernels (not with plain kernels: CUDA's path has no such switch); with ``packed``
    (inference, the weights fixed for the block) inside ``packed_weights`` too."""
    if not (device.type == "cpu" and not SETTINGS.plain and FastLinears.available()):
        return contextlib.nullcontext()
    return _fast_and_packed() if packed else FastLinears()


@contextlib.contextmanager
def _fast_and_packed() -> Iterator[None]:
    with FastLinears(), packed_weights():
        yield
