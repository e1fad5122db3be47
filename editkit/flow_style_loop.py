"""The loop of MM-DiT style transfer (:mod:`editkit.flow_style`), shared by SD3 / SD3.5 and FLUX.1.

Everything here talks to a :class:`~editkit.backbones.FlowBackbone`: the schedule of a generation
at a latent size, an Euler inversion that records features into a style cache, and the Euler
generation with an attached controller. The ``attach`` context (kernel options) is the caller's:
``attach_to(controller)`` returns a context manager installing it on the transformer.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch

from editkit.attention import AttentionController, compose
from editkit.backbones import FlowBackbone, FlowConditioning, euler_step
from editkit.conditioning import classifier_free_guidance
from editkit.flow_inversion import FlowSchedule, flow_invert, flow_schedule, flux_mu
from editkit.flow_style import FlowStyleFeatureRecorder, StepHook, flow_model_fingerprint, timestep_key
from editkit.style import StyleCache
from editkit.style_file import FEATURES_BY_KIND

__all__ = [
    "FLOW_FEATURE_TIMING",
    "flow_generation_schedule",
    "flow_injection_keys",
    "generate_stylized",
    "invert_recording",
    "schedule_extra",
]

#: The feature timing of flow caches: the inversion's own call at each generation timestep.
FLOW_FEATURE_TIMING = "flow_inverted_latent"
Attach = Callable[[AttentionController], contextlib.AbstractContextManager]


def flow_generation_schedule(backbone: FlowBackbone, steps: int, latent_hw: tuple[int, int]) -> FlowSchedule:
    """The schedule the family's diffusers pipeline generates with at this latent size.

    FLUX: ``sigmas = linspace(1, 1 / N, N)`` and ``mu`` of the packed token count (``FluxPipeline``);
    SD3: the scheduler's own (shift 3), with ``mu`` only under dynamic shifting (``StableDiffusion3Pipeline``).
    """
    scheduler = backbone.pipe.scheduler
    height, width = latent_hw
    if backbone.family == "flux":
        sigmas = np.linspace(1.0, 1 / steps, steps).tolist()
        return flow_schedule(scheduler, steps, sigmas=sigmas, mu=flux_mu((height // 2) * (width // 2), scheduler))
    mu = None
    if scheduler.config.get("use_dynamic_shifting", False):
        patch = int(backbone.denoiser.config.get("patch_size", 1) or 1)
        mu = flux_mu((height // patch) * (width // patch), scheduler)
    return flow_schedule(scheduler, steps, mu=mu)


def flow_injection_keys(schedule: FlowSchedule, sigma_window: tuple[float, float] | None = None) -> list[int]:
    """Timestep keys generation injects at: ``t_1 .. t_{N-1}`` (``t_0`` has no inversion call) with
    ``low <= sigma <= high`` for ``sigma_window = (low, high)``."""
    low, high = sigma_window or (0.0, 1.0)
    pairs = zip(schedule.timesteps[1:], schedule.sigmas[1:-1], strict=True)
    return [timestep_key(t) for t, sigma in pairs if low - 1e-6 <= sigma <= high + 1e-6]


def schedule_extra(schedule: FlowSchedule) -> dict[str, str]:
    """The schedule a cache was made with, for its header's ``extra`` (checked by ``check_flow_schedule``)."""
    return {
        "feature_timing": FLOW_FEATURE_TIMING,
        "schedule": json.dumps([round(s, 6) for s in schedule.sigmas]),
    }


def _velocity(backbone: FlowBackbone, conditioning: FlowConditioning, stepper: AttentionController):
    """The velocity callable of ``flow_invert``: each call tells the controllers its timestep first."""
    calls = {"count": 0}

    def velocity(latents: torch.Tensor, sigma: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        stepper.begin_step(calls["count"], float(timestep))
        calls["count"] += 1
        return backbone.denoise(latents, timestep, conditioning)

    return velocity


def invert_recording(
    backbone: FlowBackbone,
    latents: torch.Tensor,
    conditioning: FlowConditioning,
    schedule: FlowSchedule,
    *,
    kind: str,
    sites: Sequence[str],
    keys: Iterable[int],
    attach_to: Attach,
    offload: str | None = None,
    extra: Sequence[AttentionController] = (),
    header: dict[str, Any],
) -> StyleCache:
    """Invert one image's latents (Euler, N calls), keeping its ``kind`` features (``FEATURES_BY_KIND``).

    ``header``: the cache fields the caller knows (``size``, ``model_name``). The cache's ``final_latent``
    is the inverted latent at ``sigma_0``.
    """
    keys = sorted(set(keys), reverse=True)
    recorder = FlowStyleFeatureRecorder(sites, FEATURES_BY_KIND[kind], keys, offload=offload)
    stepper = compose(*extra, recorder)
    with attach_to(recorder) if sites else contextlib.nullcontext():
        result = flow_invert(_velocity(backbone, conditioning, stepper), latents, schedule, method="euler")
    return StyleCache(
        kind=kind,
        features=dict(recorder.features),
        final_latent=result.final.detach().contiguous(),
        model=flow_model_fingerprint(backbone.denoiser),
        family=backbone.family,
        num_inference_steps=len(schedule.timesteps),
        resample_steps=0,
        sites=tuple(sites),
        timesteps=tuple(keys),
        extra=schedule_extra(schedule),
        **header,
    )


def generate_stylized(
    backbone: FlowBackbone,
    start: torch.Tensor,
    conditioning: FlowConditioning,
    schedule: FlowSchedule,
    controller: AttentionController,
    *,
    uncond: FlowConditioning | None = None,
    guidance_scale: float = 1.0,
    step_hook: StepHook | None = None,
    progress: Callable[[Iterable], Iterable] = lambda steps: steps,
    interrupted: Callable[[], bool] = lambda: False,
) -> torch.Tensor:
    """Euler generation from ``start`` at ``sigma_0`` (``FlowMatchEulerDiscreteScheduler.step``'s float32
    arithmetic); ``controller`` must already be attached. ``step_hook(i, t_i, latents)`` runs after step
    ``i`` and may return replaced latents (``callback_on_step_end``).

    ``uncond`` (SD3): classifier-free guidance as ``StableDiffusion3Pipeline``, one batch ``[uncond, cond]``
    per step and ``v = v_u + guidance_scale (v_c - v_u)``; the controller sees (and injects) both rows."""
    x = start.float()
    sigmas = schedule.sigmas
    for index, timestep in enumerate(progress(schedule.timesteps)):
        controller.begin_step(index, timestep)
        t = torch.tensor(timestep, device=x.device, dtype=torch.float32)
        if uncond is None:
            velocity = backbone.denoise(x.to(start.dtype), t, conditioning).float()
        else:
            both = torch.cat([x, x]).to(start.dtype)
            v_uncond, v_cond = backbone.denoise(both, t, FlowConditioning.cat([uncond, conditioning])).float().chunk(2)
            velocity = classifier_free_guidance(v_uncond, v_cond, guidance_scale)
        x = euler_step(x, velocity, sigmas[index], sigmas[index + 1])
        if step_hook is not None:
            x = step_hook(index, timestep, x)
        if interrupted():
            break
    return x.to(start.dtype)
