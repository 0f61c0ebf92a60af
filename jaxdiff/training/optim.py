"""The optimizers of the training recipes (optax transforms with global-norm clipping)."""
from __future__ import annotations

import optax


def adamw_with_warmup(lr: float, warmup_steps: int, total_steps: int, weight_decay=1e-2,
                      clip_norm: float = 1.0) -> optax.GradientTransformation:
    """AdamW with linear warm-up (none when ``warmup_steps`` is 0: ``lr`` from the first
    step) then cosine decay to ``lr / 10`` at ``total_steps``, and global-norm clipping."""
    if warmup_steps > 0:
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, lr, warmup_steps, max(total_steps, warmup_steps + 1), lr * 0.1)
    else:
        schedule = optax.cosine_decay_schedule(lr, max(1, total_steps), alpha=0.1)
    return optax.chain(optax.clip_by_global_norm(clip_norm),
                       optax.adamw(schedule, weight_decay=weight_decay))


def constant_adamw(lr: float, warmup: int = 0, weight_decay: float = 1e-2,
                   clip_norm: float = 1.0) -> optax.GradientTransformation:
    """AdamW at a constant learning rate after an optional linear warm-up, with global-norm
    clipping: diffusers' DreamBooth / Textual Inversion defaults (``lr_scheduler="constant"``,
    ``adam_weight_decay=1e-2``, ``max_grad_norm=1``). ``warmup=0`` uses ``lr`` from step 0."""
    schedule = optax.linear_schedule(0.0, lr, warmup) if warmup > 0 else lr
    return optax.chain(optax.clip_by_global_norm(clip_norm),
                       optax.adamw(schedule, weight_decay=weight_decay))
