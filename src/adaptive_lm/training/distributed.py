"""Multi-process training through torchrun: process group setup, the gradient all-reduce, agreeing on decisions.

The gradient reduction is fairseq's ``legacy_ddp`` (``fairseq/distributed/legacy_distributed_data_parallel.py``):
every parameter takes part, a parameter without a gradient on a rank counts as zeros (an adaptive-softmax tail
without targets in that rank's batch), and the sum is all-reduced. Unlike fairseq's (one pass after the backward)
the buckets are launched *during* the last micro-batch's backward, as soon as all their parameters' gradients are
complete, so communication overlaps the rest of the backward; a bucket whose parameters got no gradient is
zero-filled and sent at the end.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from adaptive_lm.core.errors import UserError

BUCKET_BYTES = 25 << 20  # like DistributedDataParallel's default


def setup_distributed(cpu: bool) -> tuple[int, int, torch.device]:
    """torchrun's environment -> (rank, world, device); gloo on CPU, NCCL on GPUs."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as e:
        raise UserError(f"WORLD_SIZE, RANK and LOCAL_RANK must be integers ({e}): use torchrun") from None
    starting = world > 1 and not dist.is_initialized()
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if starting and v not in os.environ]
    if missing:  # init_process_group's env:// rendezvous would fail with a traceback
        raise UserError(
            f"WORLD_SIZE is {world} but {' and '.join(missing)} not set: start the processes with torchrun "
            "(torchrun --nproc_per_node N -m adaptive_lm train ...), which sets them"
        )
    use_cuda = torch.cuda.is_available() and not cpu
    device = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if starting:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return rank, world, device


class GradReducer:
    """Bucketed, overlapped all-reduce of the gradients of ``params`` (summed over ranks).

    ``arm()`` before the last micro-batch's backward registers nothing new: the hooks (one per parameter,
    ``register_post_accumulate_grad_hook``) are always installed but only act while armed. ``finish()`` after the
    backward sends what is left (parameters without a gradient this step as zeros), waits, and writes the sums back
    into ``.grad``.
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], bucket_bytes: int = BUCKET_BYTES) -> None:
        self.params = list(params)
        self.buckets: list[list[int]] = []  # parameter indices, in reverse order (backward produces them so)
        size = 0
        for i in reversed(range(len(self.params))):
            p = self.params[i]
            if not self.buckets or size + p.numel() * 4 > bucket_bytes:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(i)
            size += p.numel() * 4
        self.bucket_of = {i: b for b, idx in enumerate(self.buckets) for i in idx}
        self.armed = False
        self.ready: list[set[int]] = []
        self.pending: dict[int, tuple[Tensor, object]] = {}
        self.handles = [p.register_post_accumulate_grad_hook(self._hook(i)) for i, p in enumerate(self.params)]

    def _hook(self, i: int):
        def hook(p: Tensor) -> None:
            if not self.armed:
                return
            b = self.bucket_of[i]
            self.ready[b].add(i)
            if len(self.ready[b]) == len(self.buckets[b]):
                self._launch(b)

        return hook

    def arm(self) -> None:
        self.armed = True
        self.ready = [set() for _ in self.buckets]
        self.pending = {}

    def _launch(self, b: int) -> None:
        grads = []
        for i in self.buckets[b]:
            p = self.params[i]
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            grads.append(g.reshape(-1).float())
        flat = torch.cat(grads)
        self.pending[b] = (flat, dist.all_reduce(flat, async_op=True))

    def finish(self) -> None:
        """Send the buckets not sent yet, wait for all, and copy the summed gradients back."""
        self.armed = False
        for b in range(len(self.buckets)):
            if b not in self.pending:
                self._launch(b)
        for b, (flat, work) in self.pending.items():
            work.wait()  # type: ignore[attr-defined]
            offset = 0
            for i in self.buckets[b]:
                p = self.params[i]
                n = p.numel()
                g = flat[offset : offset + n].view_as(p).to(p.dtype)
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)
                offset += n
        self.pending = {}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum over ranks (identity in one process). NCCL reduces device tensors only: keep ``t`` on the device."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def all_gather_ints(value: int, device: torch.device) -> list[int]:
    """Every rank's ``value`` (one process: just ``[value]``)."""
    return [v[0] for v in all_gather_int_lists([value], device)]


def all_gather_int_lists(values: Sequence[int], device: torch.device) -> list[list[int]]:
    """Every rank's ``values`` (the same number on every rank; one process: just ``[values]``)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [list(values)]
    t = torch.tensor(list(values), dtype=torch.long, device=device)
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [[int(v) for v in x.tolist()] for x in out]
