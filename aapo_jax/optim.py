"""The optimizer: global-norm clipping, then AdamW on the paper's learning-rate schedules."""

from __future__ import annotations

import optax

from aapo_jax.configs import OptimConfig


def make_schedule(config: OptimConfig) -> optax.Schedule:
    """Linear warmup, then constant or cosine decay to `final_lr_fraction` of the peak."""
    warmup = config.warmup_steps
    peak = config.learning_rate
    if config.schedule == "constant":
        after = optax.constant_schedule(peak)
    else:
        after = optax.cosine_decay_schedule(
            peak, max(config.total_steps - warmup, 1), alpha=config.final_lr_fraction
        )
    if warmup == 0:
        return after
    # "above_zero": the first step already moves; "transformers": step s < w gets peak · s/w.
    start = 0.0 if config.warmup_style == "transformers" else peak / (warmup + 1)
    ramp = optax.linear_schedule(start, peak, warmup)
    return optax.join_schedules([ramp, after], [warmup])


def make_optimizer(config: OptimConfig) -> optax.GradientTransformation:
    """Global-norm clipping (when `max_grad_norm` > 0) then AdamW on the schedule."""
    parts = []
    if config.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(config.max_grad_norm))
    parts.append(
        optax.adamw(
            make_schedule(config),
            b1=config.b1,
            b2=config.b2,
            eps=config.eps,
            weight_decay=config.weight_decay,
        )
    )
    return optax.chain(*parts)
