"""fairseq's NAG optimizer, cosine and fixed learning-rate schedules and dynamic loss scaler (``fairseq/optim/nag.py``,
``fairseq/optim/lr_scheduler/{cosine_lr_scheduler,fixed_schedule}.py``, ``fairseq/optim/dynamic_loss_scaler.py``).

NAG is the "reformulated" Nesterov momentum whose buffer already holds the -lr factor; ``lr_old`` rescales
the stored velocity when the schedule changes the lr. Weight decay is multiplicative on the weights.
The cosine schedule is a pure function of the number of updates done, so resuming only needs that number; the fixed
one also follows the epoch, as fairseq's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class NAG:
    """p <- p*(1 - lr*wd) + m^2*c*buf - (1+m)*lr*g;  buf <- m*c*buf - lr*g;  c = lr / lr_old.

    A plain class with the parts of ``torch.optim.Optimizer`` the trainer uses (``param_groups``, ``state``,
    ``step``, ``zero_grad``). Why not a subclass: constructing any ``torch.optim.Optimizer`` imports TorchDynamo,
    0.7 s of every run's startup on CPU (7% of the small training benchmark). Same operations, in fairseq's
    order, so the numbers are fairseq's to the bit; ``_foreach`` kernels do them a list at a time.
    """

    def __init__(self, params, lr: float, momentum: float = 0.99, weight_decay: float = 0.0) -> None:
        params = list(params)
        if not params:
            raise ValueError("NAG got an empty parameter list")
        self.param_groups: list[dict] = [
            dict(params=params, lr=lr, lr_old=lr, momentum=momentum, weight_decay=weight_decay)
        ]
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            wd, m, lr = group["weight_decay"], group["momentum"], group["lr"]
            lr_old = group.get("lr_old", lr)
            lr_correct = lr / lr_old if lr_old > 0 else lr
            ws, gs, bufs = [], [], []
            for p in group["params"]:
                if p.grad is None:  # fairseq skips parameters without a gradient (single process)
                    continue
                g = p.grad.float()
                state = self.state.setdefault(p, {})
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(g)
                buf = state["momentum_buffer"]
                if p.dtype == torch.float32:
                    ws.append(p.data)
                    gs.append(g)
                    bufs.append(buf)
                    continue
                w = p.data.float()  # half-precision weights: the update in fp32, then rounded once
                _nag_update([w], [g], [buf], lr, m, wd, lr_correct)
                p.data.copy_(w)
            if ws:
                _nag_update(ws, gs, bufs, lr, m, wd, lr_correct)
            group["lr_old"] = lr


def _nag_update(ws: list, gs: list, bufs: list, lr: float, m: float, wd: float, lr_correct: float) -> None:
    """fairseq's FairseqNAG.step arithmetic, in its order, on lists of fp32 tensors."""
    if wd != 0:
        torch._foreach_mul_(ws, 1 - lr * wd)
    torch._foreach_add_(ws, bufs, alpha=m * m * lr_correct)
    torch._foreach_add_(ws, gs, alpha=-(1 + m) * lr)
    torch._foreach_mul_(bufs, m * lr_correct)
    torch._foreach_add_(bufs, gs, alpha=-lr)


@dataclass
class CosineSchedule:
    """Linear warmup from ``warmup_init_lr`` to ``max_lr``, then cosine periods (``t_mult``, ``lr_shrink``)."""

    max_lr: float
    min_lr: float = 0.0
    warmup_updates: int = 0
    warmup_init_lr: float = -1.0
    period: float = -1
    t_mult: float = 1.0
    lr_shrink: float = 0.1
    max_update: int = 0

    def __post_init__(self) -> None:
        if self.max_lr < self.min_lr:
            self.min_lr = self.max_lr
        if self.warmup_init_lr < 0:
            self.warmup_init_lr = self.min_lr
        if self.period <= 0:
            if self.max_update <= 0:
                raise ValueError("--lr-period-updates or --max-update is needed for the cosine schedule")
            self.period = self.max_update - self.warmup_updates  # <= 0: training ends within the warmup
        self.lr_step = (self.max_lr - self.warmup_init_lr) / self.warmup_updates if self.warmup_updates > 0 else 1

    def initial_lr(self) -> float:
        return self.warmup_init_lr

    def lr_at(self, num_updates: int) -> float:
        """The lr for the update after ``num_updates`` updates (fairseq's ``step_update(num_updates)``)."""
        if num_updates < self.warmup_updates:
            return self.warmup_init_lr + num_updates * self.lr_step
        t = num_updates - self.warmup_updates
        if self.period <= 0:  # --max-update <= --warmup-updates: the lr after the last update (fairseq: 0 / 0)
            return self.max_lr
        if self.t_mult != 1:
            i = math.floor(math.log(1 - t / self.period * (1 - self.t_mult), self.t_mult))
            t_i = self.t_mult**i * self.period
            t_cur = t - (1 - self.t_mult**i) / (1 - self.t_mult) * self.period
        else:
            i = math.floor(t / self.period)
            t_i = self.period
            t_cur = t - self.period * i
        shrink = self.lr_shrink**i
        lo, hi = self.min_lr * shrink, self.max_lr * shrink
        return lo + 0.5 * (hi - lo) * (1 + math.cos(math.pi * t_cur / t_i))

    def step_begin_epoch(self, epoch: int) -> None:
        """The cosine schedule follows the update count only: nothing changes at an epoch's start."""


@dataclass
class FixedSchedule:
    """fairseq's ``fixed`` schedule (``fixed_schedule.py``; fairseq-train's default ``--lr-scheduler``): each epoch
    takes its lr from the ``--lr`` list (the last one for the epochs after it); from epoch ``force_anneal`` on, the
    list's last lr times ``lr_shrink`` per epoch; the first ``warmup_updates`` updates scale it by a linear factor.
    fairseq's trainer follows every ``step_begin_epoch`` with ``step_update(num_updates)``: the lr at an epoch's
    start is ``lr_at`` of the new epoch's value, warmup included (so resuming needs the epoch and update count)."""

    lrs: tuple[float, ...]
    force_anneal: int | None = None
    lr_shrink: float = 0.1
    warmup_updates: int = 0

    def __post_init__(self) -> None:
        self.lr = self.lrs[0]

    def step_begin_epoch(self, epoch: int) -> None:
        """Take epoch ``epoch``'s lr (1-based) at its start."""
        if self.force_anneal is None or epoch < self.force_anneal:
            self.lr = self.lrs[min(epoch - 1, len(self.lrs) - 1)]
        else:
            self.lr = self.lrs[-1] * self.lr_shrink ** (epoch + 1 - self.force_anneal)

    def lr_at(self, num_updates: int) -> float:
        """The lr for the update after ``num_updates`` updates (``step_update``)."""
        if self.warmup_updates > 0 and num_updates < self.warmup_updates:
            return (num_updates + 1) / float(self.warmup_updates) * self.lr
        return self.lr


@torch.no_grad()
def clip_grad_norm_(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """fairseq's ``clip_grad_norm_``: total L2 norm (fp32) over existing grads, scaled by min(1, max/(norm+1e-6)).
    One ``_foreach`` kernel per step, no host sync (the norm stays a device tensor)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    norms = torch._foreach_norm([g.float() if g.dtype in (torch.float16, torch.bfloat16) else g for g in grads])
    total = torch.linalg.vector_norm(torch.stack(norms))
    if max_norm > 0:
        coef = (max_norm / (total + 1e-6)).clamp_(max=1)
        torch._foreach_mul_(grads, coef.to(grads[0].dtype))
    return total


class LossScaler:
    """fairseq's ``DynamicLossScaler`` (``fairseq/optim/dynamic_loss_scaler.py``) for ``--fp16``/``--amp``: the loss
    is multiplied by ``scale`` before backward; an update whose gradient norm is not finite is skipped and the scale
    halved; after ``window`` updates without overflow it doubles. Below ``min_scale`` training stops (the loss is
    exploding, not underflowing). ``scale`` 1 with ``enabled=False``: a no-op for fp32 and bf16."""

    def __init__(self, enabled: bool, init_scale: float = 128.0, window: int = 2000, min_scale: float = 1e-4) -> None:
        self.enabled = enabled
        self.scale = init_scale if enabled else 1.0
        self.window, self.min_scale = window, min_scale
        self.iter, self.last_overflow, self.last_rescale = 0, -1, -1

    def step_ok(self) -> None:
        """After an update that went through: maybe raise the scale (fairseq's ``update``)."""
        if not self.enabled:
            return
        if (self.iter - self.last_overflow) % self.window == 0:
            self.scale *= 2.0
            self.last_rescale = self.iter
        self.iter += 1

    def overflow(self) -> None:
        """After a non-finite gradient norm: halve the scale (fairseq's ``check_overflow``, tolerance 0)."""
        prev = self.scale
        self.last_overflow = self.iter
        self.scale /= 2.0
        self.last_rescale = self.iter
        if self.scale <= self.min_scale:
            self.scale = prev
            raise FloatingPointError(
                f"minimum loss scale reached ({self.min_scale:g}): the loss is exploding; lower --lr, use "
                f"--clip-norm or a larger batch"
            )
        self.iter += 1

    def state(self) -> dict[str, float | int]:
        return dict(
            loss_scale=self.scale,
            scaler_iter=self.iter,
            scaler_last_rescale=self.last_rescale,
            scaler_last_overflow=self.last_overflow,
        )

    def load(self, d: dict[str, float | int]) -> None:
        if self.enabled:
            self.scale = float(d.get("loss_scale", self.scale))
        self.iter = int(d.get("scaler_iter", 0))
        self.last_rescale = int(d.get("scaler_last_rescale", -1))
        self.last_overflow = int(d.get("scaler_last_overflow", -1))
