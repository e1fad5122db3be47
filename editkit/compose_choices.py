"""The names compose accepts for its two formulation choices, in a module with no heavy imports.

One home for the UNet and MM-DiT pipelines, :mod:`editkit.loss_presets` and the task layer (whose
CLI and app list the choices without importing diffusers or the refinement code).
"""

from __future__ import annotations

from editkit.errors import InputError

__all__ = ["LOSS_PRESETS", "NOISE_REFINERS", "check_compose_choices"]

#: ``loss_preset``: A&E-style losses (the default) or the paper's formulation (:mod:`editkit.loss_presets`).
LOSS_PRESETS = ("attend-excite", "paper")
#: ``noise_refiner``: the paper's single step per faulty entity, or InitNO's Adam on a mean / log-variance
#: parametrisation (:mod:`editkit.refine`).
NOISE_REFINERS = ("single-step", "initno")


def check_compose_choices(loss_preset: str, noise_refiner: str, noise_refinement_rounds: int = 1) -> None:
    """Raise :class:`~editkit.errors.InputError` naming the choices when a name is unknown or the rounds < 1."""
    if loss_preset not in LOSS_PRESETS:
        raise InputError(f"unknown loss preset {loss_preset!r}; use {', '.join(LOSS_PRESETS)}")
    if noise_refiner not in NOISE_REFINERS:
        raise InputError(f"unknown noise refiner {noise_refiner!r}; use {', '.join(NOISE_REFINERS)}")
    rounds = noise_refinement_rounds
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise InputError(f"noise_refinement_rounds must be an integer >= 1 (1: the paper's stage 2), got {rounds!r}")
