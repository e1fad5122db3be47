"""Rectified-flow (flow matching) arithmetic of SD3 / SD3.5 and FLUX.1, as small pure functions.

Conventions are diffusers' ``FlowMatchEulerDiscreteScheduler``: ``sigma`` runs from 1 (pure noise)
to 0 (data), ``timestep = sigma * num_train_timesteps``, and the transformer predicts the velocity
``v = noise - x0`` of the straight path between data and noise (Liu et al. 2022, "Flow Straight
and Fast", eq. 1; Esser et al. 2024, "Scaling Rectified Flow Transformers", sec. 2 and eq. 3 with
``t = sigma``). Tensors broadcast: ``sigma`` may be a float, a 0-d tensor or one value per sample
shaped to broadcast (see :func:`sigma_like`).
"""

from __future__ import annotations

import torch

__all__ = [
    "euler_step",
    "flow_noise",
    "flow_noisy",
    "flow_velocity",
    "flow_x0",
    "shift_sigmas",
    "sigma_from_timestep",
    "sigma_like",
]

Sigma = torch.Tensor | float


def sigma_like(sigma: Sigma, sample: torch.Tensor) -> torch.Tensor:
    """``sigma`` as a tensor on ``sample``'s device and dtype, one value per sample broadcast over the rest."""
    sigma = torch.as_tensor(sigma, device=sample.device, dtype=sample.dtype)
    if sigma.ndim == 1 and sigma.numel() == sample.shape[0]:
        sigma = sigma.reshape(-1, *([1] * (sample.ndim - 1)))
    return sigma


def flow_noisy(x0: torch.Tensor, noise: torch.Tensor, sigma: Sigma) -> torch.Tensor:
    """x_t = (1 - sigma) x0 + sigma noise  (the rectified-flow forward process; Esser et al. eq. 3)."""
    sigma = sigma_like(sigma, x0)
    return (1 - sigma) * x0 + sigma * noise


def flow_velocity(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """v = noise - x0  (the velocity d x_t / d sigma the transformer is trained to predict)."""
    return noise - x0


def flow_x0(x_t: torch.Tensor, velocity: torch.Tensor, sigma: Sigma) -> torch.Tensor:
    """x0 = x_t - sigma v  (the data point the predicted straight path starts from)."""
    return x_t - sigma_like(sigma, x_t) * velocity


def flow_noise(x_t: torch.Tensor, velocity: torch.Tensor, sigma: Sigma) -> torch.Tensor:
    """noise = x_t + (1 - sigma) v  (the noise end of the predicted straight path)."""
    return x_t + (1 - sigma_like(sigma, x_t)) * velocity


def euler_step(x_t: torch.Tensor, velocity: torch.Tensor, sigma: Sigma, sigma_next: Sigma) -> torch.Tensor:
    """x_next = x_t + (sigma_next - sigma) v  (one Euler step of the flow ODE, either direction)."""
    return x_t + (sigma_like(sigma_next, x_t) - sigma_like(sigma, x_t)) * velocity


def sigma_from_timestep(timestep: torch.Tensor | float, num_train_timesteps: int = 1000) -> torch.Tensor:
    """sigma = t / num_train_timesteps  (how ``FlowMatchEulerDiscreteScheduler`` makes its timesteps)."""
    return torch.as_tensor(timestep, dtype=torch.float32) / num_train_timesteps


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """sigma' = shift sigma / (1 + (shift - 1) sigma)  (resolution-dependent timestep shift; Esser et al. eq. 23).

    SD3 / SD3.5 use ``shift = 3``; FLUX.1 uses ``shift = exp(mu)`` with ``mu`` growing with the
    image's token count (diffusers' ``calculate_shift``).
    """
    return shift * sigmas / (1 + (shift - 1) * sigmas)
