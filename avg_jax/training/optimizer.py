"""Optimizers and learning-rate schedules from gin: AdamW or Adafactor, warm-up + decay, clipping."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import gin
import optax

SCHEDULES = ("constant", "linear", "cosine", "rsqrt")
OPTIMIZERS = ("adamw", "adafactor", "sgd")


@gin.configurable
def learning_rate_schedule(
    peak_value: float = 1e-3,
    name: str = "constant",
    warmup_steps: int = 0,
    decay_steps: int = 0,
    end_value_fraction: float = 0.0,
) -> optax.Schedule:
    """Linear warm-up to `peak_value`, then constant / linear / cosine decay over `decay_steps`, or rsqrt."""
    if name not in SCHEDULES:
        raise ValueError(f"learning_rate_schedule.name: unknown schedule {name!r}; expected one of {SCHEDULES}")
    if warmup_steps < 0 or decay_steps < 0:
        raise ValueError(f"learning_rate_schedule: warmup_steps ({warmup_steps}) and decay_steps "
                         f"({decay_steps}) must be >= 0")
    if name in ("linear", "cosine") and decay_steps == 0:
        raise ValueError(f"learning_rate_schedule: schedule {name!r} needs decay_steps > 0")
    end = peak_value * end_value_fraction
    if name == "constant":
        after = optax.constant_schedule(peak_value)
    elif name == "linear":
        after = optax.linear_schedule(peak_value, end, decay_steps)
    elif name == "cosine":
        after = optax.cosine_decay_schedule(peak_value, decay_steps, alpha=end_value_fraction)
    else:  # rsqrt: peak * sqrt(max(warmup, 1) / (step + max(warmup, 1))), continuous with the warm-up
        w = max(warmup_steps, 1)
        after = lambda step: peak_value * (w / (step + w)) ** 0.5  # noqa: E731
    if warmup_steps == 0:
        return after
    warmup = optax.linear_schedule(0.0, peak_value, warmup_steps)
    return optax.join_schedules([warmup, after], [warmup_steps])


@gin.configurable
def staged_learning_rate(values: Sequence[float] = gin.REQUIRED, boundaries: Sequence[int] = ()) -> optax.Schedule:
    """values[0] before boundaries[0], values[i] from boundaries[i-1] on: a constant rate per training stage
    (AVG: 1e-3 for the generative stage, 1e-4 once the discriminative loss starts)."""
    values, boundaries = [float(v) for v in values], [int(b) for b in boundaries]
    if len(values) != len(boundaries) + 1:
        raise ValueError(f"staged_learning_rate: {len(values)} values need {len(values) - 1} boundaries, got "
                         f"{len(boundaries)} ({boundaries})")
    if any(b <= 0 for b in boundaries) or any(b2 <= b1 for b1, b2 in itertools.pairwise(boundaries)):
        raise ValueError(f"staged_learning_rate.boundaries must be positive and increasing, got {boundaries}")
    return optax.join_schedules([optax.constant_schedule(v) for v in values], boundaries)


@gin.configurable
def make_optimizer(
    name: str = "adamw",
    schedule: optax.Schedule | None = None,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    clip_grad_norm: float | None = 1.0,
    adafactor_factored: bool = True,
    adafactor_momentum: float | None = None,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The gradient transformation (clipping first) and its learning-rate schedule (for logging)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"make_optimizer.name: unknown optimizer {name!r}; expected one of {OPTIMIZERS}")
    if clip_grad_norm is not None and clip_grad_norm <= 0:
        raise ValueError(f"make_optimizer.clip_grad_norm must be > 0 or None, got {clip_grad_norm}")
    schedule = learning_rate_schedule() if schedule is None else schedule
    if name == "adamw":
        tx = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    elif name == "adafactor":
        tx = optax.adafactor(schedule, factored=adafactor_factored, momentum=adafactor_momentum,
                             weight_decay_rate=weight_decay or None, multiply_by_parameter_scale=False)
    else:
        tx = optax.sgd(schedule, momentum=b1 or None)
    if clip_grad_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(clip_grad_norm), tx)
    return tx, schedule
