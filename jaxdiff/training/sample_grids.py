"""Sample grids during training: the ``on_sample(params, step)`` callback of the recipes."""
from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

from jaxdiff.data.images import make_grid, save_png
from jaxdiff.sampling import generate


def sample_grid_callback(pipe, prompts: Sequence[str], folder: str, *, per_prompt: int = 4,
                         columns: Optional[int] = None, sampler: str = "dpmpp_2m",
                         steps: int = 20, guidance_scale: float = 5.0) -> Callable:
    """``on_sample(params, step)`` writing ``<folder>/step_XXXXXX.png`` atomically.

    Every call generates ``per_prompt`` images of each prompt with the same seeds, so grids
    are comparable over training.

    Args:
      pipe: the pipeline to sample (its tokenizer must know the prompts' tokens).
      prompts: the prompts, in grid order.
      folder: where the grids go (created on the first call).
      per_prompt: images per prompt.
      columns: grid columns (default ``per_prompt``: one row per prompt).
      sampler, steps, guidance_scale: the sampling settings (also in the PNG metadata).
    """
    batch = [p for p in prompts for _ in range(per_prompt)]
    cols = per_prompt if columns is None else columns
    settings = dict(sampler=sampler, steps=steps, guidance=guidance_scale, seed=0)

    def on_sample(params, step):
        images = generate(pipe, params, batch, sampler=sampler, steps=steps,
                          guidance_scale=guidance_scale, seed=0)
        os.makedirs(folder, exist_ok=True)
        save_png(os.path.join(folder, f"step_{step:06d}.png"), make_grid(images, cols),
                 dict(settings, step=step, prompts=" | ".join(prompts)))

    return on_sample
