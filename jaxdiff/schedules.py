"""Noise schedules and timestep spacings as pure functions, matching diffusers.

Tables (betas, alphas_cumprod, sigmas, timesteps) are built once on the host in numpy and
cast to float32 exactly where diffusers' PyTorch schedulers hold float32, so the samplers
in ``jaxdiff.samplers`` reproduce diffusers within float32 round-off. ``add_noise`` and
``velocity`` are jax functions for training and editing.

diffusers' schedulers disagree on timestep spacing; ``timesteps(cfg, n, family=...)``
names the family:

* ``"ddim"``  -- DDIMScheduler / DDPMScheduler: int timesteps.
* ``"k"``     -- EulerDiscrete / EulerAncestralDiscrete / HeunDiscrete: float32
  timesteps (no rounding in "linspace"), sigmas interpolated at those timesteps.
* ``"dpm"``   -- DPMSolverMultistepScheduler: int timesteps; "leading" and "linspace"
  space ``n + 1`` points and drop the last one.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
TIMESTEP_FAMILIES = ("ddim", "k", "dpm")

# diffusers config keys jaxdiff does not model, with the values under which ignoring them
# is exact. Any other value would change the math, so it is refused instead of ignored.
_ACCEPTED_FOREIGN = {
    "trained_betas": (None,),
    "thresholding": (False,),
    "variance_type": (None, "fixed_small", "fixed_small_log"),
    "algorithm_type": ("dpmsolver++",),
    "solver_order": (2,),
    "solver_type": ("midpoint",),
    "final_sigmas_type": ("zero",),
    "interpolation_type": ("linear",),
    "timestep_type": ("discrete",),
    "use_exponential_sigmas": (False, None),
    "use_beta_sigmas": (False, None),
    "use_lu_lambdas": (False, None),
    "use_flow_sigmas": (False, None),
    "use_dynamic_shifting": (False, None),
    "sigma_min": (None,),
    "sigma_max": (None,),
    "lambda_min_clipped": (-math.inf,),
}


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The training noise schedule and inference spacing, with diffusers' field names.

    Note ``clip_sample`` defaults to False here (diffusers' DDIM/DDPM default to True);
    ``to_dict`` always writes it, so a round trip through diffusers is exact.
    """
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    set_alpha_to_one: bool = True
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    use_karras_sigmas: bool = False
    rescale_betas_zero_snr: bool = False

    def __post_init__(self):
        for name, value, valid in (("beta_schedule", self.beta_schedule, BETA_SCHEDULES),
                                   ("prediction_type", self.prediction_type, PREDICTION_TYPES),
                                   ("timestep_spacing", self.timestep_spacing,
                                    TIMESTEP_SPACINGS)):
            if value not in valid:
                raise ValueError(f"unsupported {name}={value!r}; expected one of {valid}.")
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got "
                             f"{self.num_train_timesteps=}.")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SchedulerConfig":
        """Builds a config from a diffusers scheduler config dict.

        Keys starting with "_" and diffusers keys jaxdiff does not model are ignored when
        their value leaves the math unchanged (``trained_betas=None``,
        ``thresholding=False``, ``skip_prk_steps``, ...); values that would change it
        (``thresholding=True``, explicit ``trained_betas``, ``algorithm_type="sde-..."``)
        raise ``ValueError``.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in d.items():
            if key.startswith("_"):
                continue
            if key in fields:
                kwargs[key] = value
            elif key in _ACCEPTED_FOREIGN and value not in _ACCEPTED_FOREIGN[key]:
                raise ValueError(
                    f"scheduler config has {key}={value!r}, which jaxdiff does not support "
                    f"(supported: {_ACCEPTED_FOREIGN[key]}).")
        if kwargs.get("use_karras_sigmas") is None:
            kwargs.pop("use_karras_sigmas", None)
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str) -> "SchedulerConfig":
        """Reads a diffusers ``scheduler/scheduler_config.json``."""
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict:
        """The fields as a dict every diffusers scheduler constructor accepts."""
        return dataclasses.asdict(self)


def betas(cfg: SchedulerConfig) -> np.ndarray:
    """float32 [T] betas as diffusers builds them (zero-terminal-SNR rescaled if asked)."""
    n = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":
        b = np.linspace(cfg.beta_start, cfg.beta_end, n).astype(np.float32)
    elif cfg.beta_schedule == "scaled_linear":
        b = np.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, n).astype(np.float32) ** 2
    else:
        b = _cosine_betas(n)
    if cfg.rescale_betas_zero_snr:
        b = _rescale_zero_terminal_snr(b)
    return b


def _cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal's squaredcos_cap_v2 schedule."""
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - f((i + 1) / n) / f(i / n), max_beta) for i in range(n)],
                    np.float32)


def _rescale_zero_terminal_snr(b: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1 (in float32, as diffusers computes it)."""
    abar_sqrt = np.sqrt(_cumprod(1.0 - b))
    first, last = abar_sqrt[0], abar_sqrt[-1]
    abar_sqrt = (abar_sqrt - last) * (first / (first - last))
    abar = abar_sqrt ** 2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return (1.0 - alphas).astype(np.float32)


def _cumprod(a: np.ndarray) -> np.ndarray:
    # torch's CPU cumprod accumulates float32 in double; this reproduces it bit for bit.
    return np.cumprod(a.astype(np.float64)).astype(np.float32)


def alphas_cumprod(cfg: SchedulerConfig) -> np.ndarray:
    """float32 [T] cumulative products of ``1 - betas`` (alpha-bar)."""
    return _cumprod(1.0 - betas(cfg))


def sigma_alphas_cumprod(cfg: SchedulerConfig) -> np.ndarray:
    """alpha-bar as the sigma-based (Euler/DPM) schedulers use it.

    With zero terminal SNR the last entry is 0 (infinite sigma); diffusers' Euler and
    DPM-Solver replace it by 2**-24.
    """
    ac = alphas_cumprod(cfg)
    if cfg.rescale_betas_zero_snr:
        ac = ac.copy()
        ac[-1] = 2.0 ** -24
    return ac


def sigmas_from_alphas_cumprod(ac: np.ndarray) -> np.ndarray:
    """float32 [T] ``sqrt((1 - abar) / abar)``, the noise level of the VE-scaled sample."""
    ac = np.asarray(ac, np.float32)
    return np.sqrt((1 - ac) / ac).astype(np.float32)


def _check_steps(cfg: SchedulerConfig, num_steps: int) -> int:
    if int(num_steps) != num_steps or not 1 <= num_steps <= cfg.num_train_timesteps:
        raise ValueError(f"num_steps must be an integer in [1, num_train_timesteps="
                         f"{cfg.num_train_timesteps}], got {num_steps=}.")
    return int(num_steps)


def timesteps(cfg: SchedulerConfig, num_steps: int, family: str = "ddim") -> np.ndarray:
    """Inference timesteps, high to low, as the diffusers scheduler family computes them.

    Args:
      num_steps: number of denoising steps, in [1, num_train_timesteps].
      family: "ddim" (DDIM/DDPM, int64), "k" (Euler/Euler-ancestral/Heun, float32,
        before any Karras conversion) or "dpm" (DPMSolverMultistep, int64, before any
        Karras conversion). See the module docstring.
    Returns:
      [num_steps] timesteps.
    """
    n = _check_steps(cfg, num_steps)
    if family not in TIMESTEP_FAMILIES:
        raise ValueError(f"unknown timestep family {family!r}; expected one of "
                         f"{TIMESTEP_FAMILIES}.")
    T, spacing = cfg.num_train_timesteps, cfg.timestep_spacing
    if family == "dpm":
        return _dpm_timesteps(T, n, spacing, cfg.steps_offset)
    dtype = np.int64 if family == "ddim" else np.float32
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, n)
        ts = ts.round()[::-1] if family == "ddim" else ts.astype(np.float32)[::-1]
    elif spacing == "leading":
        ts = (np.arange(n) * (T // n)).round()[::-1].astype(dtype) + cfg.steps_offset
    else:
        ts = np.round(np.arange(T, 0, -T / n)).astype(dtype) - 1
    ts = np.ascontiguousarray(ts).astype(dtype)
    if ts.max() >= T:
        raise ValueError(f"steps_offset={cfg.steps_offset} pushes timestep {ts.max()} past "
                         f"num_train_timesteps={T} for {num_steps=}.")
    return ts


def _dpm_timesteps(T, n, spacing, steps_offset):
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, n + 1).round()[::-1][:-1]
    elif spacing == "leading":
        ts = (np.arange(n + 1) * (T // (n + 1))).round()[::-1][:-1] + steps_offset
    else:
        ts = np.arange(T, 0, -T / n).round() - 1
    return np.ascontiguousarray(ts).astype(np.int64)


def interp_sigmas(sigmas: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Sigma at (possibly fractional) timesteps by linear interpolation (float64)."""
    return np.interp(ts, np.arange(len(sigmas)), sigmas)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """[n] noise levels of Karras et al. 2022 (eq. 5), from sigma_max down to sigma_min.

    References: Karras et al., "Elucidating the Design Space of Diffusion-Based Generative
    Models", 2022.
    """
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timesteps whose (log-linearly interpolated) sigma equals ``sigma``."""
    sigma = np.asarray(sigma)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(sigma.shape)


def expand_like(v, x):
    """Per-sample values ``v`` [B] (or a scalar) reshaped to broadcast against x [B, ...]."""
    v = jnp.asarray(v)
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def add_noise(alphas_cumprod, x0, noise, t):
    """Forward diffusion ``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``.

    Args:
      alphas_cumprod: [T] alpha-bar table.
      x0, noise: [B, ...] clean samples and N(0, 1) noise.
      t: int [B] (or scalar) timesteps.
    Returns:
      [B, ...] noisy samples x_t.
    """
    a = expand_like(jnp.asarray(alphas_cumprod, x0.dtype)[t], x0)
    return a ** 0.5 * x0 + (1 - a) ** 0.5 * noise


def velocity(alphas_cumprod, x0, noise, t):
    """v-prediction target ``sqrt(abar_t) noise - sqrt(1 - abar_t) x0`` (Salimans & Ho 2022).

    Shapes as in ``add_noise``.
    """
    a = expand_like(jnp.asarray(alphas_cumprod, x0.dtype)[t], x0)
    return a ** 0.5 * noise - (1 - a) ** 0.5 * x0


def k_sigmas(cfg: SchedulerConfig, num_steps: int, use_karras: bool = None):
    """Timesteps and sigmas of diffusers' Euler/Euler-ancestral/Heun schedulers.

    Args:
      use_karras: Karras spacing between the interpolated sigma range (default:
        ``cfg.use_karras_sigmas``); timesteps then come from ``sigma_to_t``.
    Returns:
      (timesteps float32 [n], sigmas float32 [n + 1] ending in 0).
    """
    use_karras = cfg.use_karras_sigmas if use_karras is None else use_karras
    ts = timesteps(cfg, num_steps, "k")
    table_sigmas = sigmas_from_alphas_cumprod(sigma_alphas_cumprod(cfg))
    sig = interp_sigmas(table_sigmas, ts)
    if use_karras:
        sig = karras_sigmas(sig[-1].item(), sig[0].item(), int(num_steps))
        ts = sigma_to_t(sig, np.log(table_sigmas))
    return ts.astype(np.float32), np.concatenate([sig, [0.0]]).astype(np.float32)


def dpm_sigmas(cfg: SchedulerConfig, num_steps: int, use_karras: bool = None):
    """Timesteps and sigmas of diffusers' DPMSolverMultistepScheduler (final sigma 0).

    With Karras spacing the range is the whole training table and the timesteps are
    ``sigma_to_t`` rounded (except for squaredcos_cap_v2), as diffusers does.
    Returns:
      (timesteps int64 [n], sigmas float32 [n + 1] ending in 0).
    """
    use_karras = cfg.use_karras_sigmas if use_karras is None else use_karras
    ts = timesteps(cfg, num_steps, "dpm")
    table_sigmas = sigmas_from_alphas_cumprod(sigma_alphas_cumprod(cfg))
    if use_karras:
        sig = karras_sigmas(table_sigmas[0].item(), table_sigmas[-1].item(), num_steps)
        ts = sigma_to_t(sig, np.log(table_sigmas))
        if cfg.beta_schedule != "squaredcos_cap_v2":
            ts = ts.round()
    else:
        sig = interp_sigmas(table_sigmas, ts)
    return ts.astype(np.int64), np.concatenate([sig, [0.0]]).astype(np.float32)
