"""Samplers: one algorithm per file, each a ``Sampler`` of pure functions (see base.py).

``make_sampler(name, cfg, num_steps, **kw)`` builds one by name from ``SAMPLERS``.
"""
from __future__ import annotations

import inspect

from jaxdiff.samplers.base import Sampler, SampleState
from jaxdiff.samplers.ddim import ddim_step, ddim_update, make_ddim
from jaxdiff.samplers.ddpm import make_ddpm
from jaxdiff.samplers.dpmpp_2m import DPMState, make_dpmpp_2m
from jaxdiff.samplers.euler import make_euler
from jaxdiff.samplers.euler_ancestral import make_euler_ancestral
from jaxdiff.samplers.heun import HeunState, make_heun

SAMPLERS = {
    "ddim": make_ddim,
    "ddpm": make_ddpm,
    "dpmpp_2m": make_dpmpp_2m,
    "euler": make_euler,
    "euler_a": make_euler_ancestral,
    "heun": make_heun,
}

# Accepted by every name so callers can pass them uniformly; used only where meaningful.
_UNIVERSAL_KWARGS = ("eta",)


def make_sampler(name: str, cfg, num_steps: int, **kw) -> Sampler:
    """Builds the sampler ``name`` for ``num_steps`` steps of schedule ``cfg``.

    Args:
      name: a key of ``SAMPLERS``.
      cfg: a ``jaxdiff.schedules.SchedulerConfig``.
      **kw: factory options, e.g. ``eta`` (DDIM; may be traced). ``eta`` is accepted and
        ignored by the other samplers.
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid names: {sorted(SAMPLERS)}.")
    factory = SAMPLERS[name]
    accepted = inspect.signature(factory).parameters
    unknown = [k for k in kw if k not in accepted and k not in _UNIVERSAL_KWARGS]
    if unknown:
        raise ValueError(f"sampler {name!r} does not take {unknown}; it accepts "
                         f"{[p for p in accepted if p not in ('cfg', 'num_steps')]}.")
    return factory(cfg, num_steps, **{k: v for k, v in kw.items() if k in accepted})


__all__ = ["SAMPLERS", "DPMState", "HeunState", "SampleState", "Sampler", "ddim_step",
           "ddim_update", "make_ddim", "make_ddpm", "make_dpmpp_2m", "make_euler",
           "make_euler_ancestral", "make_heun", "make_sampler"]
