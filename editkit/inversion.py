"""DDIM inversion (plain and resampled), epsilon / v / sample prediction, SD and SDXL; VAE helpers.

Conventions (they match diffusers' ``DDIMScheduler`` with eta 0, so generation retraces an
inversion exactly when the model's eps does not depend on the latent):

- Generation timesteps ``t_N > ... > t_1`` are those of ``DDIMScheduler.set_timesteps(N)``.
  The generation step at ``t`` goes from alpha ``a_t`` to ``a_prev(t) = alphas_cumprod[t - T // N]``,
  or ``final_alpha_cumprod`` (1 with ``set_alpha_to_one``, else ``alphas_cumprod[0]``) when that
  index is negative. Inversion undoes exactly those steps, in the order ``t_1, ..., t_N``.
- Like diffusers' ``DDIMInverseScheduler`` (and StyleID's diffusers port), the step to ``t``
  evaluates the model at the previous latent and the target timestep: ``eps = eps_theta(z_prev, t)``.
  StyleID's original (LDM) code instead evaluates ``eps_theta(x_t, t)`` to step from ``t`` to the next
  timestep, so its features of step t come from the call at ``x_t`` (``replay_inverted_latents``
  gives those calls; ``StyleTransferPipeline(feature_timing="inverted_latent")``). The model output is
  turned into eps with ``a_t``, as the generation scheduler does at ``t`` (``DDIMInverseScheduler``
  uses the lower timestep's alpha for v / sample models; for eps models the two agree).
- Model calls run in the latents' dtype; the DDIM arithmetic and the carried latent are float32;
  stored latents are cast back to the input dtype.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from editkit.conditioning import classifier_free_guidance
from editkit.numerics import check_finite, is_finite

if TYPE_CHECKING:
    from diffusers import AutoencoderKL
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

__all__ = [
    "InversionResult",
    "ddim_invert",
    "ddim_step",
    "decode_latents",
    "encode_image_latents",
    "execution_device",
    "model_eps",
    "predicted_x0",
    "replay_inverted_latents",
    "v_to_eps",
]

logger = logging.getLogger(__name__)

StepCallback = Callable[[int, int, torch.Tensor], None]


def predicted_x0(latents: torch.Tensor, eps: torch.Tensor, alpha_prod: torch.Tensor | float) -> torch.Tensor:
    """x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)  (DDIM, Song et al. 2021, eq. 12)."""
    return (latents - (1 - alpha_prod) ** 0.5 * eps) / alpha_prod**0.5


def ddim_step(x0: torch.Tensor, eps: torch.Tensor, alpha_prod_next: torch.Tensor | float) -> torch.Tensor:
    """x_s = sqrt(a_s) x0 + sqrt(1 - a_s) eps  (DDIM eq. 12, eta 0; either direction)."""
    return alpha_prod_next**0.5 * x0 + (1 - alpha_prod_next) ** 0.5 * eps


def v_to_eps(v: torch.Tensor, latents: torch.Tensor, alpha_prod: torch.Tensor | float) -> torch.Tensor:
    """eps = sqrt(a_t) v + sqrt(1 - a_t) x_t  (v-parameterisation, Salimans & Ho 2022, sec. 4)."""
    return alpha_prod**0.5 * v + (1 - alpha_prod) ** 0.5 * latents


def model_eps(
    model_output: torch.Tensor,
    latents: torch.Tensor,
    alpha_prod: torch.Tensor | float,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """eps from a model output: identity, ``v_to_eps``, or eps = (x_t - sqrt(a_t) x0) / sqrt(1 - a_t)."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return v_to_eps(model_output, latents, alpha_prod)
    if prediction_type == "sample":
        return (latents - alpha_prod**0.5 * model_output) / (1 - alpha_prod) ** 0.5
    raise ValueError(f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {prediction_type!r}")


@dataclass
class InversionResult:
    """Inverted latents keyed by the exact generation timestep (int)."""

    latents: dict[int, torch.Tensor]  # z_t: the latent generation sees at timestep t
    timesteps: list[int]  # generation order (descending), as DDIMScheduler.timesteps
    final: torch.Tensor  # z at timesteps[0]: the start latent for generation
    initial: torch.Tensor  # z_0: the clean latent that was inverted

    def latent_at(self, timestep: int) -> torch.Tensor:
        """The inverted latent at generation timestep ``timestep``."""
        key = int(timestep)
        if key not in self.latents:
            raise KeyError(f"no inverted latent at timestep {key}; timesteps are {self.timesteps}")
        return self.latents[key]


def generation_scheduler(scheduler, num_inference_steps: int):
    """A fresh DDIM scheduler (copy of ``scheduler``'s config) with its timesteps set; never the user's."""
    from diffusers import DDIMScheduler

    cls = type(scheduler) if isinstance(scheduler, DDIMScheduler) else DDIMScheduler
    ddim = cls.from_config(scheduler.config)
    ddim.set_timesteps(num_inference_steps)
    return ddim


def ddim_alphas(ddim, num_inference_steps: int, device: torch.device | str):
    """``alpha_pair(t) -> (alpha_t, alpha_prev)``, float32: DDIM's step t -> t - T / N.

    ``alpha_prev`` is ``final_alpha_cumprod`` past the start, as ``DDIMScheduler.step`` does; generation
    steps with the pair, inversion undoes it.
    """
    step_ratio = ddim.config.num_train_timesteps // num_inference_steps
    alphas = ddim.alphas_cumprod.to(device=device, dtype=torch.float32)
    final_alpha = ddim.final_alpha_cumprod.to(device=device, dtype=torch.float32)

    def alpha_pair(timestep: int) -> tuple[torch.Tensor, torch.Tensor]:
        return alphas[timestep], (alphas[timestep - step_ratio] if timestep - step_ratio >= 0 else final_alpha)

    return alpha_pair


def _conditioning(prompt_embeds, negative_prompt_embeds, added_cond_kwargs, negative_added_cond_kwargs, cfg):
    """Encoder states and added kwargs for one UNet call; with CFG the batch is [uncond, cond]."""
    if not cfg:
        return prompt_embeds, added_cond_kwargs
    if negative_prompt_embeds is None:
        raise ValueError("guidance_scale > 1 needs negative_prompt_embeds")
    if added_cond_kwargs is not None and negative_added_cond_kwargs is None:
        raise ValueError("guidance_scale > 1 with added_cond_kwargs needs negative_added_cond_kwargs")
    embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
    if added_cond_kwargs is None:
        return embeds, None
    if set(added_cond_kwargs) != set(negative_added_cond_kwargs):
        raise ValueError("added_cond_kwargs and negative_added_cond_kwargs must have the same keys")
    added = {key: torch.cat([negative_added_cond_kwargs[key], value]) for key, value in added_cond_kwargs.items()}
    return embeds, added


def _progress(iterable: Iterable, progress, total: int) -> Iterable:
    if progress is True:
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc="DDIM inversion", leave=False)
    if callable(progress):
        return progress(iterable)
    return iterable


@torch.no_grad()
def ddim_invert(
    unet: Callable,
    scheduler: SchedulerMixin,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    *,
    num_inference_steps: int = 50,
    guidance_scale: float = 1.0,
    negative_prompt_embeds: torch.Tensor | None = None,
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    negative_added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    resample_steps: int = 0,
    average_early_steps: int | None = 5,
    early_timestep: int = 250,
    callback: StepCallback | None = None,
    progress: bool | Callable[[Iterable], Iterable] | None = None,
) -> InversionResult:
    """Invert clean ``latents`` (z_0, already scaled) along DDIM's generation timesteps.

    ``unet`` is any callable with the diffusers UNet signature ``unet(sample, timestep,
    encoder_hidden_states=..., added_cond_kwargs=..., return_dict=False)[0]``; ``scheduler`` gives
    ``alphas_cumprod``, ``final_alpha_cumprod`` and the timestep spacing (its config is copied into a
    fresh ``DDIMScheduler``; the object passed in is not touched). ``added_cond_kwargs`` (SDXL
    ``text_embeds``, ``time_ids``) reach every UNet call. ``guidance_scale > 1`` runs classifier-free
    guidance on a batch ``[uncond, cond]``: ``out = u + guidance_scale * (c - u)``, then to eps.

    Style-preserving inversion (AttenST; this is our reading of the method note): with
    ``resample_steps = r`` each step to ``t`` computes ``eps_0 = eps(z_prev, t)`` and the DDIM estimate
    ``z^0``; then for ``i = 1..r``: ``eps_i = eps(z^{i-1}, t)`` and ``z^i`` = the inverse step from
    ``z_prev`` with ``eps_i`` (1 + r model calls per step; a fixed point makes generation's step
    from ``z_t`` land exactly on ``z_prev``). For ``t < early_timestep`` (250) the step finally uses
    the mean of the first ``average_early_steps`` estimates ``eps_0, ..., eps_4`` (5, the reference:
    ReNoise's ``average_first_step_range = (0, 5)``, which AttenST's resampling follows; None: all
    1 + r). Other steps use the last estimate (ReNoise averages its estimates 8-9 there, which r <= 7
    never reaches; with AttenST's r = 5 the last estimate is what both use). ReNoise also caps r at
    5 for t < 250; editkit does not (same result for r <= 5). ``resample_steps=0`` is plain DDIM
    inversion (StyleID).

    ``callback(step_index, timestep, latents)`` runs once per step, before that step's model
    call(s), with the latent about to be evaluated; steps are in inversion order (ascending
    timesteps). When resampling, feature recorders that overwrite per site and timestep keep the
    last call's features. ``progress``: True for a tqdm bar, or a callable wrapping the step
    iterable (e.g. a pipeline's ``progress_bar``). Deterministic: no randomness.
    """
    if num_inference_steps < 1 or resample_steps < 0:
        raise ValueError("num_inference_steps must be >= 1 and resample_steps >= 0")
    if average_early_steps is not None and average_early_steps < 1:
        raise ValueError("average_early_steps must be >= 1 or None")
    ddim = generation_scheduler(scheduler, num_inference_steps)
    prediction_type = ddim.config.prediction_type
    device, dtype = latents.device, latents.dtype
    alpha_pair = ddim_alphas(ddim, num_inference_steps, device)
    cfg = guidance_scale > 1.0
    embeds, added = _conditioning(
        prompt_embeds, negative_prompt_embeds, added_cond_kwargs, negative_added_cond_kwargs, cfg
    )

    def eps_at(sample: torch.Tensor, timestep: torch.Tensor, alpha_t: torch.Tensor) -> torch.Tensor:
        model_input = torch.cat([sample] * 2) if cfg else sample
        output = unet(
            model_input.to(dtype),
            timestep,
            encoder_hidden_states=embeds,
            added_cond_kwargs=added,
            return_dict=False,
        )[0].float()
        if cfg:
            output = classifier_free_guidance(*output.chunk(2), guidance_scale)
        return model_eps(output, sample, alpha_t, prediction_type)

    generation_timesteps = [int(t) for t in ddim.timesteps]
    z = latents.float()
    inverted: dict[int, torch.Tensor] = {}
    steps = enumerate(reversed(generation_timesteps))
    for index, t in _progress(steps, progress, total=num_inference_steps):
        alpha_t, alpha_prev = alpha_pair(t)
        timestep = torch.tensor(t, device=device)
        if callback is not None:
            callback(index, t, z.to(dtype))
        estimates = [eps_at(z, timestep, alpha_t)]
        z_t = ddim_step(predicted_x0(z, estimates[0], alpha_prev), estimates[0], alpha_t)
        for _ in range(resample_steps):
            estimates.append(eps_at(z_t, timestep, alpha_t))
            z_t = ddim_step(predicted_x0(z, estimates[-1], alpha_prev), estimates[-1], alpha_t)
        if resample_steps and t < early_timestep:
            eps = torch.stack(estimates[:average_early_steps]).mean(dim=0)
            z_t = ddim_step(predicted_x0(z, eps, alpha_prev), eps, alpha_t)
        z = z_t
        inverted[t] = z.to(dtype)
    return InversionResult(
        latents=inverted,
        timesteps=generation_timesteps,
        final=inverted[generation_timesteps[0]],
        initial=latents,
    )


@torch.no_grad()
def replay_inverted_latents(
    unet: Callable,
    result: InversionResult,
    prompt_embeds: torch.Tensor,
    *,
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    timesteps: Iterable[int] | None = None,
    callback: StepCallback | None = None,
) -> None:
    """One call ``unet(z_t, t)`` per inverted latent, in inversion order, for attached recorders.

    StyleID's feature timing: its reverse DDIM records step t's features from the call at x_t.
    ``callback(step_index, timestep, latents)`` runs before each call, as in ``ddim_invert``; only
    ``timesteps`` (all when None) are evaluated.
    """
    wanted = None if timesteps is None else {int(t) for t in timesteps}
    for index, t in enumerate(reversed(result.timesteps)):
        if wanted is not None and t not in wanted:
            continue
        latent = result.latent_at(t)
        if callback is not None:
            callback(index, t, latent)
        timestep = torch.tensor(t, device=latent.device)
        unet(latent, timestep, encoder_hidden_states=prompt_embeds, added_cond_kwargs=added_cond_kwargs)


@contextlib.contextmanager
def _vae_precision(vae: AutoencoderKL, *, force: bool = False) -> Iterator[torch.dtype]:
    """Run a float16 VAE with ``force_upcast`` (SDXL: fp16 overflow), or ``force``, in float32, restoring it after."""
    dtype = vae.dtype
    upcast = dtype == torch.float16 and (force or getattr(vae.config, "force_upcast", False))
    if upcast:  # .float()/.half(), not .to(dtype): diffusers' to() warns about an empty fp32-module list
        vae.float()
    try:
        yield torch.float32 if upcast else dtype
    finally:
        if upcast:
            vae.half()  # upcast only happens from float16


def execution_device(module: torch.nn.Module) -> torch.device:
    """Where ``module`` computes: its offload hook's execution device (model CPU offload keeps the
    weights on the CPU between calls), else the device of its weights.

    diffusers' ``AutoencoderKL.encode``/``decode`` move the weights on entry but not the inputs
    (only ``forward`` calls move both), so their inputs must be sent here, not to ``module.device``.
    """
    device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    return torch.device(device) if device is not None else module.device


@torch.no_grad()
def encode_image_latents(
    vae: AutoencoderKL, image: torch.Tensor, *, generator: torch.Generator | None = None, sample: bool = False
) -> torch.Tensor:
    """Image in [-1, 1], (batch, 3, H, W) -> scaled latents: posterior mean (or a sample), in the VAE's dtype.

    A VAE without a posterior (``AutoencoderTiny``) gives its deterministic latents, as diffusers'
    ``retrieve_latents`` (used here) does.
    """
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents

    original_dtype = vae.dtype
    with _vae_precision(vae) as dtype:
        encoded = vae.encode(image.to(device=execution_device(vae), dtype=dtype))
        latents = retrieve_latents(encoded, generator, sample_mode="sample" if sample else "argmax")  # argmax: mean
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((latents - shift) * vae.config.scaling_factor).to(original_dtype)


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> image in [-1, 1], (batch, 3, H, W), float32.

    NaN/inf latents raise NumericalError; a float16 decode that overflows is retried once in float32.
    """
    check_finite(latents, "the denoising loop (the latents to decode)")
    image = _decode(vae, latents, upcast=False)
    if not is_finite(image) and vae.dtype == torch.float16:
        logger.warning("the float16 VAE decode overflowed (NaN/inf); retrying in float32")
        image = _decode(vae, latents, upcast=True)
    check_finite(image, "the VAE decode", advice="try --dtype fp32 or a VAE fixed for float16")
    return image.float().clamp(-1, 1)


def _decode(vae: AutoencoderKL, latents: torch.Tensor, *, upcast: bool) -> torch.Tensor:
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    with _vae_precision(vae, force=upcast) as dtype:
        latents = latents.to(device=execution_device(vae), dtype=dtype) / vae.config.scaling_factor + shift
        return vae.decode(latents, return_dict=False)[0]
