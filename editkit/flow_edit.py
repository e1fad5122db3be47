"""Text-driven editing on flow-matching transformers (SD3 / SD3.5, FLUX.1): FlowEdit and flow DDS, with PatchNCE.

Both methods compare the velocities of the target and the source prompt at coupled noisy points
with the SAME sigma and noise (rectified flow: ``z_t = (1 - sigma) x0 + sigma noise``, velocity
``v = noise - x0``; :mod:`editkit.backbones.flow_matching`):

- ``"flowedit"`` (Kulikov et al., "FlowEdit: Inversion-Free Text-Based Editing Using Pre-Trained
  Flow Models", ICCV 2025, Alg. 1 and the authors' release): inversion-free, it integrates the delta
  velocity along the generation schedule from step ``T - n_max``:
  ``z_src_t = (1 - sigma_i) x_src + sigma_i noise`` (fresh noise each step),
  ``z_tar_t = z_edit + z_src_t - x_src``,
  ``z_edit <- z_edit + (sigma_{i+1} - sigma_i) (v(z_tar_t, y_tar) - v(z_src_t, y_src))``, the
  velocities with classifier-free guidance (SD3: source 3.5, target 13.5, ``T = 50``, ``n_max = 33``;
  FLUX.1-dev: distilled guidance 1.5 / 5.5, ``T = 28``, ``n_max = 24``); the last ``n_min`` steps
  (0 by default) are plain target sampling from the coupled point, ``n_avg`` noise draws per step
  are averaged (1).
- ``"dds"``: delta denoising score (Hertz et al., ICCV 2023) with the score difference replaced by the
  velocity difference: each iteration draws one timestep uniform in ``[min_timestep, max_timestep)``
  (scheduler units, ``sigma = t / 1000``) and one noise, noises the source and the edited latent with
  both, and takes a plain SGD step ``z <- z - lr * scale * (v_tar - v_src)`` (``scale`` = the DDS
  surrogate's 2000 / 4096, as on UNets). The sign follows from SDS with ``v = noise - x0``: the
  omitted Jacobian d z_t / d z = (1 - sigma) is positive, as sqrt(alpha_t) is for epsilon.

The contrastive term (CDS, Nam et al., CVPR 2024; dual: editkit's reading of DCDS, see
:mod:`editkit.contrastive`) compares image-token attention outputs of the source branch (no grad)
and the target branch (backpropagated to the edited latent) with PatchNCE. On ``"dds"`` it enters
as in CDS: the latent step is ``lr * (scale * dds + contrast_weight * dNCE/dz)``. FlowEdit has no
contrastive term in its paper; editkit adds the same per-step correction
``z_edit <- z_edit - lr * contrast_weight * dNCE/dz`` at each FlowEdit step (an extension, stated
in the pipeline's docstring). The target branch's grad-enabled call also gives its velocity, so the
contrastive term costs one backward, not an extra forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from editkit.attention import IMAGE_KINDS, Site, site_matches
from editkit.backbones import FlowBackbone, FlowConditioning, flow_noisy
from editkit.conditioning import classifier_free_guidance
from editkit.contrastive import (
    ContrastiveFeatureRecorder,
    contrastive_loss,
    sample_noise,
    sample_timestep,
)
from editkit.flow_inversion import FlowSchedule

__all__ = [
    "FLOW_EDIT_DEFAULTS",
    "FLOW_EDIT_METHODS",
    "FlowContrastFeatureRecorder",
    "FlowEditDefaults",
    "FlowEditSettings",
    "FlowEditText",
    "FlowVelocities",
    "contrast_sites_of",
    "coupled_target",
    "default_contrast_sites",
    "flow_dds_loop",
    "flowedit_loop",
    "flowedit_step",
    "patch_generator",
    "recorded_contrastive_loss",
    "scaled_n_max",
    "velocity_dds_step",
]

FLOW_EDIT_METHODS = ("flowedit", "dds")


@dataclass(frozen=True)
class FlowEditDefaults:
    """FlowEdit's published settings for one family (the authors' release, ``SD3_exp.yaml`` / ``FLUX_exp.yaml``)."""

    num_inference_steps: int  # T: the generation schedule's steps
    n_max: int  # steps actually run (the last n_max of T)
    source_guidance_scale: float
    target_guidance_scale: float


#: FlowEdit's defaults: SD3 (CFG) and FLUX.1-dev (distilled guidance).
FLOW_EDIT_DEFAULTS = {
    "sd3": FlowEditDefaults(num_inference_steps=50, n_max=33, source_guidance_scale=3.5, target_guidance_scale=13.5),
    "flux": FlowEditDefaults(num_inference_steps=28, n_max=24, source_guidance_scale=1.5, target_guidance_scale=5.5),
}


def default_contrast_sites(family: str) -> tuple[str, ...]:
    """The contrast sites of a family: every joint block (SD3; SD3.5's ``attn2`` too), FLUX's double-stream blocks.

    FLUX's 38 single-stream blocks are left out by default (memory: their features would be recorded
    with grad at every step); name them in ``contrast_sites`` to include them.
    """
    return ("transformer_blocks",)


# -- numerics -------------------------------------------------------------------------------------
def coupled_target(z_edit: torch.Tensor, z_source_t: torch.Tensor, x_source: torch.Tensor) -> torch.Tensor:
    """z_tar_t = z_edit + z_src_t - x_src  (FlowEdit Alg. 1: the target point shares the source's noise)."""
    return z_edit + z_source_t - x_source


def flowedit_step(z_edit: torch.Tensor, delta_velocity: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """z_edit + (sigma_next - sigma) (v_tar - v_src)  (FlowEdit Alg. 1: one Euler step of the delta ODE)."""
    return z_edit + (sigma_next - sigma) * delta_velocity


def velocity_dds_step(v_target: torch.Tensor, v_source: torch.Tensor, scale: float) -> torch.Tensor:
    """scale (v_tar - v_src): the DDS direction for a flow model (minus the SGD step's direction)."""
    return scale * (v_target.float() - v_source.float())


# -- features -------------------------------------------------------------------------------------
class FlowContrastFeatureRecorder(ContrastiveFeatureRecorder):
    """:class:`ContrastiveFeatureRecorder` on MM-DiT sites: image-token features of joint / image-only / single layers.

    ``on_output`` already holds the image part there; for ``feature`` query / key / value the image
    tokens are cut from the joint q/k/v with the site's token layout.
    """

    def applies_to(self, site: Site) -> bool:
        return site.kind in IMAGE_KINDS and site_matches(site.name, self.site_patterns)

    def on_qkv(self, site, query, key, value):
        if self.feature != "output":
            tensor = {"query": query, "key": key, "value": value}[self.feature][:, :, site.layout.image]
            self._record(site, tensor.transpose(1, 2).flatten(2))  # (batch, image tokens, heads * head_dim)
        return query, key, value


# -- velocity calls -------------------------------------------------------------------------------
@dataclass
class FlowEditText:
    """Encoded prompts: ``negative`` is None for distilled guidance (FLUX.1-dev: no classifier-free guidance)."""

    source: FlowConditioning
    target: FlowConditioning
    negative: FlowConditioning | None


class FlowVelocities:
    """The guided source and target velocities of one step, on a backbone, with the controller's roles declared.

    Classifier-free guidance (SD3, FLUX without distilled guidance): one no-grad call on
    ``[src uncond, src cond, tar uncond, tar cond]``; with the contrastive term ``[src uncond, src cond,
    tar uncond]`` no-grad plus the target cond with grad. Distilled guidance (FLUX.1-dev): the source and
    the target call, each with its own guidance input.
    """

    def __init__(
        self,
        backbone: FlowBackbone,
        text: FlowEditText,
        source_guidance_scale: float,
        target_guidance_scale: float,
        controller,
    ) -> None:
        self.backbone, self.text, self.controller = backbone, text, controller
        self.scales = (source_guidance_scale, target_guidance_scale)
        self._batched: dict[str, FlowConditioning] = {}  # concatenated once, not at every step

    def _cat(self, key: str, parts: list[FlowConditioning]) -> FlowConditioning:
        if key not in self._batched:
            self._batched[key] = FlowConditioning.cat(parts)
        return self._batched[key]

    def _call(self, latents, timestep, conditioning, roles, guidance=None) -> torch.Tensor:
        self.controller.batch_roles = roles
        backbone = self.backbone
        extra = {} if guidance is None else {"guidance_scale": guidance}
        return backbone.denoise(latents.to(backbone.dtype), timestep, conditioning, **extra).float()

    def _guided(self, uncond, cond, scale) -> torch.Tensor:
        return classifier_free_guidance(uncond, cond, scale)

    def plain(self, z_source_t, z_target_t, timestep) -> tuple[torch.Tensor, torch.Tensor]:
        """(v_src, v_tar), no grad."""
        text, (s_src, s_tar) = self.text, self.scales
        if text.negative is None:
            v_src = self._call(z_source_t, timestep, text.source, ("cond",), s_src)
            return v_src, self._call(z_target_t, timestep, text.target, ("cond",), s_tar)
        latents = torch.cat([z_source_t, z_source_t, z_target_t, z_target_t])
        conditioning = self._cat("both", [text.negative, text.source, text.negative, text.target])
        u_src, c_src, u_tar, c_tar = self._call(latents, timestep, conditioning, ("uncond", "cond") * 2).chunk(4)
        return self._guided(u_src, c_src, s_src), self._guided(u_tar, c_tar, s_tar)

    def target_only(self, z_target_t, timestep) -> torch.Tensor:
        """v_tar alone, no grad (FlowEdit's last n_min steps)."""
        text, scale = self.text, self.scales[1]
        if text.negative is None:
            return self._call(z_target_t, timestep, text.target, ("cond",), scale)
        conditioning = self._cat("target", [text.negative, text.target])
        uncond, cond = self._call(torch.cat([z_target_t] * 2), timestep, conditioning, ("uncond", "cond")).chunk(2)
        return self._guided(uncond, cond, scale)

    def with_contrast(self, z_source_t, target_point, z_edit, timestep, recorder, loss_fn, weight: float):
        """(v_src, v_tar, d(weight * loss)/dz_edit, loss): the target cond call runs with grad from ``z_edit``.

        ``target_point(z)`` maps the edited latent to the target branch's noisy point; ``loss_fn(recorder)``
        is the contrastive loss of the recorded features.
        """
        text, (s_src, s_tar) = self.text, self.scales
        recorder.clear()
        recorder.branch = "source"
        z_target_t = target_point(z_edit).detach()
        if text.negative is None:
            v_src = self._call(z_source_t, timestep, text.source, ("cond",), s_src)
        else:
            latents = torch.cat([z_source_t, z_source_t, z_target_t])
            conditioning = self._cat("no_grad", [text.negative, text.source, text.negative])
            roles = ("uncond", "cond", "target_uncond")
            u_src, c_src, u_tar = self._call(latents, timestep, conditioning, roles).chunk(3)
            v_src = self._guided(u_src, c_src, s_src)
        recorder.branch = None
        with torch.enable_grad():
            z = z_edit.detach().requires_grad_(True)
            recorder.branch = "target"
            guidance = s_tar if text.negative is None else None
            c_tar = self._call(target_point(z), timestep, text.target, ("cond",), guidance)
            recorder.branch = None
            loss = loss_fn(recorder)
            (gradient,) = torch.autograd.grad(loss * weight, z)
        c_tar = c_tar.detach()
        v_tar = c_tar if text.negative is None else self._guided(u_tar, c_tar, s_tar)
        return v_src, v_tar, gradient, loss.detach()


def recorded_contrastive_loss(recorder: ContrastiveFeatureRecorder, options: dict) -> torch.Tensor:
    """PatchNCE between the recorded source and target features (``options``: :func:`contrastive_loss`'s)."""
    features = recorder.features
    if not features.get("target") or not features.get("source"):
        raise RuntimeError("no image-token attention features were recorded at the contrastive sites")
    return contrastive_loss(features["source"], features["target"], recorder.grids, **options)


def scaled_n_max(family: str, num_inference_steps: int) -> int:
    """FlowEdit's n_max for a step count: the paper's value at the paper's T, the same share of T otherwise."""
    defaults = FLOW_EDIT_DEFAULTS[family]
    if num_inference_steps == defaults.num_inference_steps:
        return defaults.n_max
    return max(1, round(num_inference_steps * defaults.n_max / defaults.num_inference_steps))


def contrast_sites_of(family: str, sites: str | Sequence[str] | None) -> str | Sequence[str]:
    """``sites`` or the family's default (:func:`default_contrast_sites`)."""
    return default_contrast_sites(family) if sites is None else sites


# -- the loops ------------------------------------------------------------------------------------
@dataclass
class FlowEditSettings:
    """The knobs of one edit run (the pipeline's arguments, checked there)."""

    method: str = "flowedit"
    n_max: int = 33
    n_min: int = 0
    n_avg: int = 1
    num_iterations: int = 200  # "dds" only
    min_timestep: int = 50  # "dds" only
    max_timestep: int = 950
    learning_rate: float = 0.1
    dds_weight: float = 1.0
    dds_scale: float = 2000.0 / 4096  # the DDS surrogate's loss_scale / reference latent pixels
    contrast_weight: float = 3.0
    contrast_options: dict | None = None  # contrastive_loss's options; None: no contrastive term
    region: torch.Tensor | None = None  # (batch, 1, h, w) latent mask


#: on_step(step index, timestep, latents) -> (latents, stop)
StepHook = Callable[[int, float, torch.Tensor], tuple[torch.Tensor, bool]]


def _timestep(value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32, device=like.device)


def _delta(velocities, x_source, z_edit, sigma, timestep, settings, generator, recorder):
    """FlowEdit's averaged delta velocity at one step and the averaged contrastive gradient (or 0)."""
    delta, contrast, losses = 0.0, 0.0, []
    loss_fn, weight = _loss_fn(settings, generator), _weight(settings, z_edit.shape[0])
    for _ in range(settings.n_avg):
        noise = sample_noise(x_source.shape, generator, x_source.device)
        z_source_t = flow_noisy(x_source, noise, sigma)
        if recorder is None:
            v_src, v_tar = velocities.plain(z_source_t, coupled_target(z_edit, z_source_t, x_source), timestep)
        else:
            point = lambda z, z_src=z_source_t: coupled_target(z, z_src, x_source)  # noqa: E731
            v_src, v_tar, gradient, loss = velocities.with_contrast(
                z_source_t, point, z_edit, timestep, recorder, loss_fn, weight
            )
            contrast, losses = contrast + gradient / settings.n_avg, [*losses, loss]
        delta = delta + (v_tar - v_src) / settings.n_avg
    loss = torch.stack(losses).mean() if losses else None
    return delta, contrast, loss


#: Mixed into the seed of the patch-location generator (see :func:`patch_generator`).
PATCH_SEED_OFFSET = 0x5EED


def patch_generator(generator: torch.Generator | None) -> torch.Generator:
    """The generator of PatchNCE's patch locations: seeded from ``generator``'s seed, without drawing from it.

    So the noise (and DDS timestep) draws of a seed are the same with and without the contrastive term,
    and ``contrast_weight=0`` is exactly the plain method. Without a generator: seeded from torch's global RNG.
    """
    if generator is None:
        return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
    return torch.Generator(generator.device).manual_seed(generator.initial_seed() ^ PATCH_SEED_OFFSET)


def _loss_fn(settings: FlowEditSettings, generator):
    """The recorded-feature loss (a mean over batch items), patch locations from :func:`patch_generator`."""
    options = dict(settings.contrast_options or {}, generator=patch_generator(generator), region=settings.region)
    return lambda recorder: recorded_contrastive_loss(recorder, options)


def _weight(settings: FlowEditSettings, batch: int) -> float:
    """The contrastive gradient's factor: CDS's weight, times the batch (each item gets its own step)."""
    return settings.contrast_weight * batch


def flowedit_loop(
    velocities: FlowVelocities,
    x_source: torch.Tensor,
    schedule: FlowSchedule,
    settings: FlowEditSettings,
    generator: torch.Generator | None,
    recorder: FlowContrastFeatureRecorder | None,
    on_step: StepHook,
) -> tuple[torch.Tensor, list[float], list[float]]:
    """FlowEdit (Kulikov et al. 2025, Alg. 1) from step ``T - n_max``; returns (latents, timesteps, losses).

    ``schedule`` is :func:`editkit.flow_inversion.flow_schedule`'s for ``T`` steps; latents are float32.
    """
    n = len(schedule.timesteps)
    z_edit, z_target, used, losses = x_source.float().clone(), None, [], []
    x_source = x_source.float()
    for i in range(n - settings.n_max, n):
        sigma, sigma_next, t = schedule.sigmas[i], schedule.sigmas[i + 1], schedule.timesteps[i]
        timestep = _timestep(t, x_source)
        velocities.controller.begin_step(i, t)
        if n - i > settings.n_min:
            delta, contrast, loss = _delta(velocities, x_source, z_edit, sigma, timestep, settings, generator, recorder)
            # the contrastive gradient already carries contrast_weight (CDS: (cutloss * w).backward())
            step = flowedit_step(z_edit, delta, sigma, sigma_next) - settings.learning_rate * contrast - z_edit
            z_edit = z_edit + (step if settings.region is None else step * settings.region)
            if loss is not None:
                losses.append(float(loss))
        else:  # the last n_min steps: plain target sampling from the coupled point
            if z_target is None:
                noise = sample_noise(x_source.shape, generator, x_source.device)
                z_target = coupled_target(z_edit, flow_noisy(x_source, noise, sigma), x_source)
            z_target = z_target + (sigma_next - sigma) * velocities.target_only(z_target, timestep)
        used.append(t)
        current, stop = on_step(len(used) - 1, t, z_edit if z_target is None else z_target)
        z_edit, z_target = (current, None) if z_target is None else (z_edit, current)
        if stop:
            break
    return (z_edit if z_target is None else z_target), used, losses


def flow_dds_loop(
    velocities: FlowVelocities,
    x_source: torch.Tensor,
    settings: FlowEditSettings,
    generator: torch.Generator | None,
    recorder: FlowContrastFeatureRecorder | None,
    on_step: StepHook,
) -> tuple[torch.Tensor, list[int], list[float]]:
    """Flow DDS (+ PatchNCE): ``num_iterations`` SGD steps on the edited latent -> (latents, timesteps, losses)."""
    x_source = x_source.float()
    z, used, losses = x_source.clone(), [], []
    loss_fn, weight = _loss_fn(settings, generator), _weight(settings, z.shape[0])
    backbone = velocities.backbone
    for i in range(settings.num_iterations):
        t = sample_timestep(generator, min_timestep=settings.min_timestep, max_timestep=settings.max_timestep)
        timestep, sigma = _timestep(t, x_source), float(backbone.sigma(t))
        noise = sample_noise(x_source.shape, generator, x_source.device)
        velocities.controller.begin_step(i, t)
        z_source_t = flow_noisy(x_source, noise, sigma)
        contrast = 0.0
        if recorder is None:
            v_src, v_tar = velocities.plain(z_source_t, flow_noisy(z, noise, sigma), timestep)
        else:
            point = lambda latent, noise=noise, sigma=sigma: flow_noisy(latent, noise, sigma)  # noqa: E731
            v_src, v_tar, contrast, loss = velocities.with_contrast(
                z_source_t, point, z, timestep, recorder, loss_fn, weight
            )
            losses.append(float(loss))
        step = velocity_dds_step(v_tar, v_src, settings.dds_weight * settings.dds_scale) + contrast
        z = z - settings.learning_rate * (step if settings.region is None else step * settings.region)
        used.append(t)
        z, stop = on_step(i, t, z)
        if stop:
            break
    return z, used, losses
