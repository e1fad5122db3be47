"""Flow-ODE inversion: schedules equal the scheduler's, round trips on stub velocity fields, callbacks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from editkit.flow_inversion import flow_invert, flow_sample, flow_schedule, flux_mu

A, C = 0.7, -0.4  # the linear field v(x, sigma) = A x + C sigma


def linear_velocity(latents, sigma, timestep):
    return A * latents + C * sigma


def linear_solution(x0: torch.Tensor, sigma: float) -> torch.Tensor:
    """Closed form of dx/dsigma = A x + C sigma from x(0) = x0: x = (x0 - Q) e^(A s) + P s + Q."""
    p, q = -C / A, -C / A**2
    return (x0.double() - q) * math.exp(A * sigma) + p * sigma + q


def smooth_velocity(latents, sigma, timestep):
    """A nonlinear smooth field (bounded Lipschitz constant)."""
    return torch.tanh(latents) * (1 + sigma) + torch.sin(3 * sigma) - 0.5 * latents


def _x0() -> torch.Tensor:
    return torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))


def _schedule(steps: int, shift: float = 3.0):
    return flow_schedule(FlowMatchEulerDiscreteScheduler(shift=shift), steps)


def test_schedule_is_the_shifted_generation_schedule():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    schedule = flow_schedule(scheduler, 28)
    scheduler.set_timesteps(28)
    assert schedule.sigmas == tuple(float(s) for s in scheduler.sigmas)
    assert schedule.timesteps == tuple(float(t) for t in scheduler.timesteps)
    # SD3 (Esser et al. 2024, eq. 23): sigma' = shift s / (1 + (shift - 1) s), then a final 0; diffusers spaces
    # s from 1 to the shifted smallest training sigma (1/1000), so the shift formula meets that value twice
    shifted = lambda s: 3 * s / (1 + 2 * s)  # noqa: E731
    expected = [*shifted(np.linspace(1.0, shifted(1 / 1000), 28)), 0.0]
    np.testing.assert_allclose(schedule.sigmas, expected, atol=1e-6)
    np.testing.assert_allclose(schedule.timesteps, np.array(expected[:-1]) * 1000, atol=1e-3)


def test_flux_dynamic_shift_schedule():
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    )
    assert flux_mu(256, scheduler) == pytest.approx(0.5)  # FLUX: mu linear from (256, 0.5) to (4096, 1.15)
    assert flux_mu(4096, scheduler) == pytest.approx(1.15)
    sigmas = list(np.linspace(1.0, 1 / 10, 10))
    mu = flux_mu(1024, scheduler)
    schedule = flow_schedule(scheduler, 10, sigmas=sigmas, mu=mu)
    shifted = [math.exp(mu) / (math.exp(mu) + (1 / s - 1)) for s in sigmas]  # FLUX time_shift, exponent 1
    np.testing.assert_allclose(schedule.sigmas, [*shifted, 0.0], atol=1e-6)
    with pytest.raises(ValueError, match="pass mu"):
        flow_schedule(scheduler, 10, sigmas=sigmas)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="FlowMatchEulerDiscreteScheduler"):
        from diffusers import DDIMScheduler

        flow_schedule(DDIMScheduler(), 10)
    with pytest.raises(ValueError, match="stochastic"):
        flow_schedule(FlowMatchEulerDiscreteScheduler(stochastic_sampling=True), 10)
    with pytest.raises(ValueError, match="method"):
        flow_invert(linear_velocity, _x0(), _schedule(4), method="rk4")
    with pytest.raises(ValueError, match="floating-point"):
        flow_invert(linear_velocity, torch.zeros(2, dtype=torch.long), _schedule(4))


def test_euler_inversion_follows_the_closed_form_and_higher_order_beats_it():
    x0 = _x0()
    errors = {}
    for method in ("euler", "midpoint", "fireflow"):
        schedule = _schedule(10)
        result = flow_invert(linear_velocity, x0, schedule, method=method)
        errors[method] = (result.final.double() - linear_solution(x0, schedule.sigmas[0])).abs().max().item()
    assert errors["midpoint"] < errors["euler"] / 5
    assert errors["fireflow"] < errors["euler"] / 2
    fine = flow_invert(linear_velocity, x0, _schedule(4000, shift=1.0))
    assert (fine.final.double() - linear_solution(x0, 1.0)).abs().max() < 1e-3


def _scaled(field, scale: float):
    return lambda latents, sigma, timestep: scale * field(latents, sigma, timestep)


# Euler is first order (round-trip error ~ 3 / N on these fields): it gets the linear field 5x gentler and
# 2000 steps; its order on the nonlinear field is checked by test_convergence_order
@pytest.mark.parametrize(
    ("field", "method", "steps", "scale"),
    [
        (linear_velocity, "euler", 2000, 0.2),
        (linear_velocity, "midpoint", 100, 1.0),
        (linear_velocity, "fireflow", 200, 1.0),
        (smooth_velocity, "midpoint", 100, 1.0),
        (smooth_velocity, "fireflow", 200, 1.0),
    ],
    ids=["linear-euler", "linear-midpoint", "linear-fireflow", "smooth-midpoint", "smooth-fireflow"],
)
def test_round_trip(field, method, steps, scale):
    x0 = _x0()
    schedule = _schedule(steps)
    field = _scaled(field, scale)
    result = flow_invert(field, x0, schedule, method=method)
    assert not torch.allclose(result.final, x0, atol=1e-2)  # it moved
    back = flow_sample(field, result.final, schedule, method=method)
    assert (back - x0).abs().max() < 1e-4


@pytest.mark.parametrize(("method", "order"), [("euler", 1), ("midpoint", 2), ("fireflow", 2)])
def test_convergence_order(method, order):
    """Round-trip error on the nonlinear field falls at least as N^-order (doubling the steps divides it by
    2^order or more: the midpoint rule's round trip cancels its leading term); Euler's by 2, no more."""
    x0 = _x0().double()

    def round_trip_error(steps: int) -> float:
        schedule = _schedule(steps)
        final = flow_invert(smooth_velocity, x0, schedule, method=method).final
        return (flow_sample(smooth_velocity, final, schedule, method=method) - x0).abs().max().item()

    ratio = round_trip_error(100) / round_trip_error(200)
    assert ratio > 2**order * 0.8, ratio
    if order == 1:
        assert ratio < 2.5, ratio


def test_higher_order_beats_euler_on_a_nonlinear_field():
    x0 = _x0()
    reference = flow_invert(smooth_velocity, x0.double(), _schedule(4000), method="midpoint").final
    for steps in (10, 28):
        schedule = _schedule(steps)
        euler = (flow_invert(smooth_velocity, x0, schedule).final - reference).abs().max()
        for method in ("midpoint", "fireflow"):
            better = (flow_invert(smooth_velocity, x0, schedule, method=method).final - reference).abs().max()
            assert better < euler / 2, (steps, method, better, euler)


def test_euler_sampling_is_the_scheduler_step():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    schedule = flow_schedule(scheduler, 12)
    scheduler.set_timesteps(12)
    start = _x0()
    latents = start.clone()
    for t in scheduler.timesteps:
        sigma = scheduler.sigmas[scheduler.index_for_timestep(t)]
        latents = scheduler.step(smooth_velocity(latents, sigma, t), t, latents).prev_sample
    torch.testing.assert_close(flow_sample(smooth_velocity, start, schedule), latents, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["euler", "midpoint", "fireflow"])
def test_callback_and_velocity_calls_are_keyed_by_the_generation_timesteps(method):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    schedule = flow_schedule(scheduler, 6)
    scheduler.set_timesteps(6)
    seen, calls = [], []

    def velocity(latents, sigma, timestep):
        calls.append((float(sigma), float(timestep)))
        return smooth_velocity(latents, sigma, timestep)

    result = flow_invert(velocity, _x0(), schedule, method=method, callback=lambda i, t, x: seen.append((i, t, x)))
    generation = [float(t) for t in scheduler.timesteps]
    assert [i for i, _, _ in seen] == list(range(6))
    assert [t for _, t, _ in seen] == [0.0, *reversed(generation[1:])]  # 0, t_{N-1}, ..., t_1
    torch.testing.assert_close(seen[0][2], result.initial)
    for index, t in enumerate(generation[1:], start=1):  # the latent a step starts from is stored under its t
        torch.testing.assert_close(seen[6 - index][2], result.latent_at(t))
    assert result.timesteps == generation
    assert result.velocity_calls == len(calls) == {"euler": 6, "midpoint": 12, "fireflow": 7}[method]
    starts = [t for t in (c[1] for c in calls) if t in (0.0, *generation)]
    # FireFlow evaluates the start of a step only once: later steps reuse the last midpoint velocity
    assert starts == ([0.0] if method == "fireflow" else [0.0, *reversed(generation[1:])])
    with pytest.raises(KeyError, match="no inverted latent"):
        result.latent_at(1.5)
