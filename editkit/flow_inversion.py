"""Inversion of the rectified-flow ODE (SD3 / SD3.5 / FLUX): Euler, RF-Solver's midpoint step, FireFlow.

Conventions (those of diffusers' ``FlowMatchEulerDiscreteScheduler`` and the flow pipelines):

- The schedule is the generation one: ``scheduler.set_timesteps(N, sigmas=..., mu=...)`` on a copy
  of the scheduler (shift, FLUX's dynamic shift ``mu``, ``shift_terminal`` and Karras / exponential /
  beta sigmas included) gives ``sigma_0 > ... > sigma_{N-1} > sigma_N`` (``sigma_N`` = 0, or the
  terminal value) and the timesteps ``t_i`` the model sees (``scheduler.timesteps``, ``sigma_i * T``
  with ``T = num_train_timesteps``). Generation steps ``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v``.
- ``x_sigma = (1 - sigma) x0 + sigma noise``; the model predicts the velocity ``v = noise - x0``,
  so ``dx / dsigma = v`` and inversion integrates the same ODE from ``sigma_N`` up to ``sigma_0``.
- Every solver step from ``sigma_a`` to ``sigma_b`` evaluates the velocity first at its start
  ``(x_a, sigma_a, t_a)``, as the reference implementations do (RF-Solver's and FireFlow's
  ``for t_curr, t_prev in zip(timesteps[:-1], timesteps[1:])`` loops). In inversion that is the
  clean latent at timestep ``sigma_N * T`` (0) for the first step, then the inverted latent at each
  generation timestep ``t_{N-1}, ..., t_1``: the call generation makes at that timestep.
- ``velocity(latents, sigma, timestep) -> v`` is any callable (a backbone's denoiser call with its
  conditioning and classifier-free guidance folded in); ``sigma`` and ``timestep`` are 0-d float32
  tensors on the latents' device. Velocity calls run in the latents' dtype; the solver arithmetic
  and the carried latent are float32 (float64 for float64 latents); stored latents are cast back to
  the input dtype.

Solvers (``method``):

- ``"euler"``: ``x_b = x_a + h v(x_a, sigma_a)``, ``h = sigma_b - sigma_a``; 1 call per step.
- ``"midpoint"``: RF-Solver's second-order step (Wang et al. 2024, "Taming Rectified Flow for
  Inversion and Editing", arXiv:2411.04746, eq. 9-10): ``x_b = x_a + h v + h^2 / 2 v'`` with
  ``v' = (v(x_mid, sigma_mid) - v) / (h / 2)``, ``x_mid = x_a + h / 2 v``,
  ``sigma_mid = sigma_a + h / 2``; algebraically the explicit midpoint rule
  ``x_b = x_a + h v(x_mid, sigma_mid)``. 2 calls per step.
- ``"fireflow"``: FireFlow (Deng et al. 2025, "FireFlow: Fast Inversion of Rectified Flow for Image
  Semantic Editing", arXiv:2412.07517, Alg. 1): the midpoint step whose start velocity is the
  previous step's midpoint velocity (``v(x_a, sigma_a) ~ v(x_mid', sigma_mid')``), so 1 call per step
  after the first (N + 1 in all), with second-order accuracy on smooth fields.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "FLOW_METHODS",
    "FlowInversionResult",
    "FlowSchedule",
    "flow_invert",
    "flow_sample",
    "flow_schedule",
    "flux_mu",
]

logger = logging.getLogger(__name__)

FLOW_METHODS = ("euler", "midpoint", "fireflow")
# (latents, sigma, timestep) -> velocity
Velocity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# (step_index, timestep, latents): before each step's first velocity call, with the latent it evaluates
FlowStepCallback = Callable[[int, float, torch.Tensor], None]


@dataclass(frozen=True)
class FlowSchedule:
    """A generation schedule: ``sigmas`` (N + 1, descending) and the N model ``timesteps``."""

    sigmas: tuple[float, ...]
    timesteps: tuple[float, ...]
    num_train_timesteps: int

    def timestep_of(self, index: int) -> float:
        """The model timestep at ``sigmas[index]`` (the scheduler's own value; ``sigma * T`` past the end)."""
        if index < len(self.timesteps):
            return self.timesteps[index]
        return self.sigmas[index] * self.num_train_timesteps


def flow_schedule(
    scheduler,
    num_inference_steps: int,
    *,
    sigmas: list[float] | None = None,
    mu: float | None = None,
) -> FlowSchedule:
    """The exact generation schedule of a ``FlowMatchEulerDiscreteScheduler`` (a copy; yours is untouched).

    ``sigmas`` and ``mu`` are what the pipeline passes to ``set_timesteps`` (FLUX: ``sigmas =
    linspace(1, 1 / N, N)`` and ``mu`` from :func:`flux_mu`; SD3: neither). Stochastic sampling has
    no ODE to invert and is refused.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        raise ValueError(f"flow inversion needs a FlowMatchEulerDiscreteScheduler, got {type(scheduler).__name__}")
    if scheduler.config.get("stochastic_sampling", False):
        raise ValueError("the scheduler samples stochastically (stochastic_sampling=True): no ODE to invert")
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    if scheduler.config.get("use_dynamic_shifting", False) and mu is None:
        raise ValueError("the scheduler uses dynamic shifting: pass mu (FLUX: flux_mu(image_seq_len, scheduler))")
    fresh = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    fresh.set_timesteps(num_inference_steps, device="cpu", sigmas=sigmas, mu=mu)
    return FlowSchedule(
        sigmas=tuple(float(s) for s in fresh.sigmas),
        timesteps=tuple(float(t) for t in fresh.timesteps),
        num_train_timesteps=int(fresh.config.num_train_timesteps),
    )


def flux_mu(image_seq_len: int, scheduler) -> float:
    """FLUX's resolution-dependent shift: ``mu`` linear in the packed image sequence length.

    The line through ``(base_image_seq_len, base_shift)`` and ``(max_image_seq_len, max_shift)`` of the
    scheduler's config (256 -> 0.5, 4096 -> 1.15 for FLUX.1), as the FLUX pipeline's ``calculate_shift``.
    """
    config = scheduler.config
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return float(image_seq_len * slope + base_shift - slope * base_len)


@dataclass
class FlowInversionResult:
    """Inverted latents keyed by the exact generation timestep (the scheduler's float values)."""

    latents: dict[float, torch.Tensor]  # x at sigma_i: the latent generation sees at timestep t_i
    schedule: FlowSchedule
    final: torch.Tensor  # x at sigma_0: the start latent for generation
    initial: torch.Tensor  # the clean latent that was inverted
    velocity_calls: int = 0

    @property
    def timesteps(self) -> list[float]:
        """Generation order (descending), as ``scheduler.timesteps``."""
        return list(self.schedule.timesteps)

    def latent_at(self, timestep: float) -> torch.Tensor:
        """The inverted latent at generation timestep ``timestep`` (matched to 1e-3)."""
        for key, value in self.latents.items():
            if math.isclose(key, float(timestep), abs_tol=1e-3):
                return value
        raise KeyError(f"no inverted latent at timestep {float(timestep):g}; timesteps are {self.timesteps}")


class _Solver:
    """One solver's steps along a list of sigmas (either direction), counting velocity calls."""

    def __init__(self, velocity: Velocity, method: str, dtype: torch.dtype, num_train_timesteps: int):
        if method not in FLOW_METHODS:
            raise ValueError(f"method must be one of {FLOW_METHODS}, got {method!r}")
        self.velocity, self.method, self.dtype, self.scale = velocity, method, dtype, num_train_timesteps
        self.calls = 0
        self.carried: torch.Tensor | None = None  # FireFlow: the last midpoint velocity

    def _v(self, latents: torch.Tensor, sigma: float, timestep: float) -> torch.Tensor:
        self.calls += 1
        device = latents.device
        sigma_t = torch.tensor(sigma, dtype=torch.float32, device=device)
        timestep_t = torch.tensor(timestep, dtype=torch.float32, device=device)
        return self.velocity(latents.to(self.dtype), sigma_t, timestep_t).to(latents.dtype)

    def step(self, x: torch.Tensor, sigma_a: float, sigma_b: float, timestep_a: float) -> torch.Tensor:
        """``x`` at ``sigma_a`` -> ``x`` at ``sigma_b`` (float32)."""
        h = sigma_b - sigma_a
        if self.method == "fireflow" and self.carried is not None:
            v_start = self.carried
        else:
            v_start = self._v(x, sigma_a, timestep_a)
        if self.method == "euler":
            return x + h * v_start
        sigma_mid = sigma_a + h / 2
        v_mid = self._v(x + (h / 2) * v_start, sigma_mid, sigma_mid * self.scale)
        self.carried = v_mid
        return x + h * v_start + 0.5 * h**2 * (v_mid - v_start) / (h / 2)  # RF-Solver eq. 10 (= x + h v_mid)


def _working(latents: torch.Tensor) -> torch.Tensor:
    """The carried latent: float32, or float64 when given float64."""
    return latents.to(torch.promote_types(latents.dtype, torch.float32))


def _check(latents: torch.Tensor, method: str) -> None:
    if not torch.is_tensor(latents) or not latents.is_floating_point():
        raise ValueError("latents must be a floating-point tensor")
    if method not in FLOW_METHODS:
        raise ValueError(f"method must be one of {FLOW_METHODS}, got {method!r}")


@torch.no_grad()
def flow_invert(
    velocity: Velocity,
    latents: torch.Tensor,
    schedule: FlowSchedule,
    *,
    method: str = "euler",
    callback: FlowStepCallback | None = None,
) -> FlowInversionResult:
    """Integrate ``dx / dsigma = v`` from the clean ``latents`` (at ``sigma_N``) up to ``sigma_0``.

    ``schedule`` comes from :func:`flow_schedule` with the arguments generation will use. Step ``k``
    (``k = 0..N-1``) goes from ``sigma_{N-k}`` to ``sigma_{N-k-1}``; ``callback(k, timestep,
    latents)`` runs before its velocity calls with the latent the step starts from and its timestep
    (0 for ``k = 0``, then ``t_{N-1}, ..., t_1``: the timestep of the step's first call for Euler and
    midpoint), as ``editkit.inversion.ddim_invert``'s callback does. The latent reached at
    ``sigma_i`` is stored under ``t_i``. Deterministic.
    """
    _check(latents, method)
    solver = _Solver(velocity, method, latents.dtype, schedule.num_train_timesteps)
    n = len(schedule.timesteps)
    x = _working(latents)
    inverted: dict[float, torch.Tensor] = {}
    for k in range(n):
        start, end = n - k, n - k - 1
        timestep = schedule.timestep_of(start)
        if callback is not None:
            callback(k, timestep, x.to(latents.dtype))
        x = solver.step(x, schedule.sigmas[start], schedule.sigmas[end], timestep)
        inverted[schedule.timesteps[end]] = x.to(latents.dtype)
    return FlowInversionResult(
        latents=inverted,
        schedule=schedule,
        final=inverted[schedule.timesteps[0]],
        initial=latents,
        velocity_calls=solver.calls,
    )


@torch.no_grad()
def flow_sample(
    velocity: Velocity,
    latents: torch.Tensor,
    schedule: FlowSchedule,
    *,
    method: str = "euler",
    callback: FlowStepCallback | None = None,
) -> torch.Tensor:
    """Generation along ``schedule`` from ``latents`` at ``sigma_0`` down to ``sigma_N``, with ``method``.

    ``method="euler"`` is ``FlowMatchEulerDiscreteScheduler.step`` (float32 arithmetic); the other
    solvers generate with the step their inversion used (RF-Solver and FireFlow edit that way).
    ``callback(i, t_i, latents)`` runs before step ``i``'s velocity calls.
    """
    _check(latents, method)
    solver = _Solver(velocity, method, latents.dtype, schedule.num_train_timesteps)
    x = _working(latents)
    for i, timestep in enumerate(schedule.timesteps):
        if callback is not None:
            callback(i, timestep, x.to(latents.dtype))
        x = solver.step(x, schedule.sigmas[i], schedule.sigmas[i + 1], timestep)
    return x.to(latents.dtype)
