"""Text-driven editing of a real image with (dual) contrastive denoising score: DDS, CDS, DCDS.

One diffusers pipeline for SD 1.x/2.x and SDXL folders (SDXL's second text encoder and tokenizer
are optional components). It also works as a diffusers community pipeline (``custom_pipeline=``).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.image_processor import PipelineImageInput
from diffusers.utils import BaseOutput

from editkit.acceleration import frozen_for_backward
from editkit.attention import AttentionController, AttentionKernelMixin, attention_sites, compose, select_sites
from editkit.backbones.pipeline_bases import UNetComponents
from editkit.conditioning import TextConditioning, role_conditioning
from editkit.contrastive import (
    DEFAULT_SITES,
    DIRECTIONS,
    FEATURES,
    REFERENCE_LATENT_PIXELS,
    ContrastiveFeatureRecorder,
    contrastive_loss,
    dds_gradient,
    dds_latent_gradient,
    guided_eps,
    noise_latents,
    sample_noise,
    sample_timesteps,
)
from editkit.errors import InputError
from editkit.image import latent_edit_region
from editkit.models import model_family
from editkit.pipeline_io import (
    as_prompt_list,
    batch_size,
    callback_tensor_names,
    check_alpha_scheduler,
    check_generators,
    check_num_images,
    check_output_type,
    image_latents,
    pipeline_images,
    pixel_size,
    postprocess,
    step_callback,
    unet_call_kwargs,
)

logger = logging.getLogger(__name__)


@dataclass
class ContrastiveEditPipelineOutput(BaseOutput):
    """Edited images, the optimised latent and what each iteration drew and measured.

    ``timesteps[i]`` is iteration i's timestep; ``contrastive_losses[i]`` its contrastive loss
    (empty for plain DDS).
    """

    images: list[PIL.Image.Image] | torch.Tensor | np.ndarray
    latents: torch.Tensor
    timesteps: list[int]
    contrastive_losses: list[float]


class ContrastiveEditPipeline(AttentionKernelMixin, UNetComponents, DiffusionPipeline):
    r"""Edit a real image so it matches ``target_prompt`` and keeps the rest: DDS + (dual) contrastive loss.

    Each iteration draws one timestep and one noise, noises the source latent and the edited latent
    with both, and moves the edited latent along the delta denoising score
    ``eps_hat(z_t_trg, y_trg) - eps_hat(z_t_src, y_src)`` (classifier-free guidance on both). The
    contrastive term compares self-attention features of the two branches with PatchNCE so the
    layout stays (CDS anchors on source patches, CUT on edited ones, ``"dual"`` averages both).

    Example:
        >>> from pipelines.contrastive_edit import ContrastiveEditPipeline
        >>> from editkit.image import load_image
        >>> pipe = ContrastiveEditPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5").to("cuda")
        >>> image = load_image("cat.png")
        >>> generator = torch.Generator().manual_seed(0)
        >>> edited = pipe(image, "a photo of a cat", "a photo of a dog", generator=generator).images[0]
    """

    # -- inputs ----------------------------------------------------------------------------------
    def check_inputs(
        self,
        source_prompt: str | list[str] | None,
        target_prompt: str | list[str] | None,
        num_inference_steps: int,
        guidance_scale: float,
        learning_rate: float,
        min_timestep: int,
        max_timestep: int,
        contrast: str | None,
        contrast_weight: float,
        feature: str,
        patch_sizes: Sequence[int],
        num_patches: int,
        tau: float,
        output_type: str,
        source_prompt_embeds: torch.Tensor | None = None,
        target_prompt_embeds: torch.Tensor | None = None,
    ) -> None:
        """Short, specific InputErrors before any heavy work; a warning for identical prompts."""
        model_family(self.unet)
        check_alpha_scheduler(self.scheduler, "contrastive editing (DDS noising)")
        texts = {}
        for name, prompt, embeds in [
            ("source_prompt", source_prompt, source_prompt_embeds),
            ("target_prompt", target_prompt, target_prompt_embeds),
        ]:
            if (prompt is None) == (embeds is None):
                raise InputError(f"give {name} or {name}_embeds" + ("" if prompt is None else ", not both"))
            texts[name] = [] if prompt is None else as_prompt_list(prompt, name)
            if any(not p.strip() for p in texts[name]):
                raise InputError(f"{name} must be a non-empty string")
        sources, targets = texts["source_prompt"], texts["target_prompt"]
        count = max(len(sources), len(targets))  # pairs with a single prompt broadcast
        if any(s.strip() == t.strip() for s, t in zip(sources * count, targets * count)):
            warnings.warn("source and target prompts are identical: the edit will change little", stacklevel=3)
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise InputError(f"the number of iterations must be at least 1, got {num_inference_steps}")
        numbers = {"guidance_scale": guidance_scale, "learning_rate": learning_rate, "tau": tau}
        numbers["contrast_weight"] = contrast_weight
        for name, value in numbers.items():
            if not isinstance(value, int | float) or not math.isfinite(value):
                raise InputError(f"{name} must be a finite number, got {value!r}")
        if guidance_scale < 1 or learning_rate <= 0 or tau <= 0 or contrast_weight < 0:
            raise InputError("guidance_scale must be >= 1, learning_rate and tau > 0, contrast_weight >= 0")
        timesteps = self.scheduler.config.num_train_timesteps
        if not 0 <= min_timestep < max_timestep <= timesteps:
            raise InputError(
                f"need 0 <= min_timestep < max_timestep <= {timesteps}, got {min_timestep}, {max_timestep}"
            )
        if contrast is not None and contrast not in DIRECTIONS:
            raise InputError(f"contrast must be one of {DIRECTIONS} or None, got {contrast!r}")
        if feature not in FEATURES:
            raise InputError(f"feature must be one of {FEATURES}, got {feature!r}")
        if not patch_sizes or any(int(p) != p or p < 1 for p in patch_sizes) or num_patches < 2:
            raise InputError("patch_sizes must be positive integers and num_patches at least 2")
        check_output_type(output_type)

    # -- one iteration ---------------------------------------------------------------------------
    def _unet(self, latents, timestep, conditioning: TextConditioning, roles, controller) -> torch.Tensor:
        """One UNet call with its batch roles declared to the controllers."""
        controller.batch_roles = roles
        timestep = timestep.repeat(latents.shape[0] // timestep.shape[0])  # (batch,) per item, tiled per branch
        return self.unet(latents.to(self.unet.dtype), timestep, **conditioning.unet_kwargs(), return_dict=False)[0]

    def _eps(self, uncond, cond, z_t, alpha, guidance_scale) -> torch.Tensor:
        prediction_type = self.scheduler.config.get("prediction_type", "epsilon")
        return guided_eps(uncond, cond, z_t, alpha, guidance_scale=guidance_scale, prediction_type=prediction_type)

    def _dds_only(self, z_src_t, z_trg_t, timestep, alpha, text, guidance_scale, controller) -> torch.Tensor:
        """Plain DDS: one no-grad call on [src, trg] x [uncond, cond]; returns the DDS gradient."""
        latents = torch.cat([z_src_t, z_trg_t, z_src_t, z_trg_t])
        output = self._unet(latents, timestep, text["dds"], ("uncond", "cond"), controller)
        uncond_src, uncond_trg, cond_src, cond_trg = output.chunk(4)
        eps_src = self._eps(uncond_src, cond_src, z_src_t, alpha, guidance_scale)
        eps_trg = self._eps(uncond_trg, cond_trg, z_trg_t, alpha, guidance_scale)
        return dds_gradient(eps_trg, eps_src)

    def _contrastive_step(self, z_trg, noise, z_src_t, timestep, alpha, text, settings, controller, recorder):
        """DDS gradient and contrastive loss/gradient of one iteration.

        One no-grad call on [source uncond, source cond (source features), target uncond], target cond
        (grad, target features, its noise prediction reused), identity branch when asked: a compiled
        UNet sees two graphs (three with the identity branch).
        """
        z_trg_t = noise_latents(z_trg, noise, alpha)
        recorder.clear()
        recorder.branch = "source"
        roles = ("uncond", "cond", "target_uncond")
        latents = torch.cat([z_src_t, z_src_t, z_trg_t])
        uncond_src, cond_src, uncond_trg = self._unet(latents, timestep, text["no_grad"], roles, controller).chunk(3)
        recorder.branch = None
        if settings["identity_branch"]:
            recorder.branch = "identity"
            self._unet(z_trg_t, timestep, text["source_cond"], ("cond",), controller)
        with torch.enable_grad():
            z = z_trg.detach().requires_grad_(True)
            recorder.branch = "target"
            cond_trg = self._unet(noise_latents(z, noise, alpha), timestep, text["target_cond"], ("cond",), controller)
            recorder.branch = None
            loss = self._contrastive_loss(recorder, settings)
            # CDS: (cutloss * w_cut).backward(); the DDS scale (loss_scale / pixels) is not applied here.
            # The loss is a mean over batch items: times the batch size, each item gets its own step.
            (contrast_grad,) = torch.autograd.grad(loss * settings["contrast_weight"] * z.shape[0], z)
        eps_src = self._eps(uncond_src, cond_src, z_src_t, alpha, settings["guidance_scale"])
        eps_trg = self._eps(uncond_trg, cond_trg.detach(), z_trg_t, alpha, settings["guidance_scale"])
        return dds_gradient(eps_trg, eps_src), contrast_grad, loss.detach()

    def _iteration(self, index, latents, source_latents, text, settings, controller, recorder):
        """Draw t and eps, return (t, latent gradient of the total loss, contrastive loss or None)."""
        generator, device = settings["generator"], latents.device
        bounds = {"min_timestep": settings["min_timestep"], "max_timestep": settings["max_timestep"]}
        timestep = sample_timesteps(generator, latents.shape[0], **bounds).to(device)  # (batch,)
        noise = sample_noise(latents.shape, generator, device)
        alpha = settings["alphas"][timestep].view(-1, 1, 1, 1)
        t = timestep.tolist() if isinstance(generator, list) else int(timestep[0])
        controller.begin_step(index, int(timestep[0]))
        z_src_t = noise_latents(source_latents, noise, alpha)
        loss, contrast_grad = None, 0.0
        if recorder is None:
            z_trg_t = noise_latents(latents, noise, alpha)
            grad = self._dds_only(z_src_t, z_trg_t, timestep, alpha, text, settings["guidance_scale"], controller)
        else:
            grad, contrast_grad, loss = self._contrastive_step(
                latents, noise, z_src_t, timestep, alpha, text, settings, controller, recorder
            )
        scale = {"loss_scale": settings["loss_scale"], "reference_pixels": settings["reference_pixels"]}
        step = dds_latent_gradient(settings["dds_weight"] * grad, **scale) + contrast_grad
        if settings["region"] is not None:
            step = step * settings["region"]
        return t, step, loss

    @staticmethod
    def _contrastive_loss(recorder: ContrastiveFeatureRecorder, settings: dict) -> torch.Tensor:
        features = recorder.features
        if not features.get("target") or not features.get("source"):
            raise RuntimeError("no self-attention features were recorded at the contrastive sites")
        options = {k: settings[k] for k in ("direction", "patch_sizes", "num_patches", "tau", "generator", "region")}
        loss = contrastive_loss(features["source"], features["target"], recorder.grids, **options)
        if settings["identity_branch"]:
            identity = contrastive_loss(features["identity"], features["target"], recorder.grids, **options)
            loss = (loss + identity) / 2
        return loss

    @torch.no_grad()
    def __call__(
        self,
        image: PipelineImageInput,
        source_prompt: str | list[str] | None = None,
        target_prompt: str | list[str] | None = None,
        *,
        num_inference_steps: int = 200,
        guidance_scale: float = 7.5,
        learning_rate: float = 0.1,
        min_timestep: int = 50,
        max_timestep: int = 950,
        contrast: str | None = "dual",
        contrast_weight: float = 3.0,
        dds_weight: float = 1.0,
        num_patches: int = 256,
        patch_sizes: Sequence[int] = (1, 2),
        tau: float = 0.07,
        feature: str = "output",
        contrast_sites: str | Sequence[str] = DEFAULT_SITES,
        identity_branch: bool = False,
        mask: torch.Tensor | PIL.Image.Image | None = None,
        negative_prompt: str | list[str] | None = None,
        source_prompt_embeds: torch.Tensor | None = None,
        target_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        source_pooled_prompt_embeds: torch.Tensor | None = None,
        target_pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        num_images_per_prompt: int = 1,
        cross_attention_kwargs: dict | None = None,
        height: int | None = None,
        width: int | None = None,
        loss_scale: float = 2000.0,
        reference_latent_pixels: int = REFERENCE_LATENT_PIXELS,
        gradient_checkpointing: bool = False,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        attention_controllers: Sequence[AttentionController] | None = None,
        callback_on_step_end: Callable[[DiffusionPipeline, int, int, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ):
        r"""Edit ``image`` from ``source_prompt`` (what it shows) towards ``target_prompt``.

        Args:
            image: one image or a batch in diffusers' formats (``editkit.pipeline_io.prepare_images``):
                PIL, path, numpy (B, H, W, C) or torch (B, C, H, W) in [0, 1], lists, (B, 4, h, w) latents.
            source_prompt / target_prompt: text describing the input and the wanted result; one, or
                one per image (a single image or prompt is broadcast to the batch).
            num_inference_steps: number of optimisation iterations (200 in DDS/CDS).
            guidance_scale: classifier-free guidance on both branches (7.5).
            learning_rate: plain SGD step on the fp32 master latent (0.1; Adam's normalisation
                turns the noisy score into uniform global change).
            min_timestep / max_timestep: each iteration's t is uniform in [min, max) ([50, 950)).
            contrast: PatchNCE direction: ``"source"`` (CDS: source patch is the anchor),
                ``"target"`` (CUT: edited patch is the anchor), ``"dual"`` (mean of both), or
                ``None`` for plain DDS. ``"dual"`` is editkit's interpretation of the dual
                contrastive denoising score, which has no released code (DCLGAN's two NCE terms);
                the other readings are one option away: one direction alone,
                ``identity_branch=True``, another ``feature`` or ``contrast_sites``.
            contrast_weight: weight of the contrastive loss (3.0 in CDS).
            dds_weight: weight of the DDS term (1.0).
            num_patches: locations sampled per site and patch size (256), the same in both branches.
            patch_sizes: average-pooled patch sides (1 and 2).
            tau: PatchNCE temperature (0.07).
            feature: self-attention feature compared: ``"output"`` (after ``to_out``), ``"query"``,
                ``"key"`` or ``"value"``.
            contrast_sites: site patterns of the compared self-attention layers (the up blocks).
            identity_branch: also contrast the edited features with the edited latent under the
                source prompt (a second reading of "dual"); the two losses are averaged.
            mask: optional {0, 1} mask at the image's size or aspect ratio (another size is resized
                as diffusers' mask processor does: nearest, then binarised at 0.5): the edit (DDS gradient, contrastive
                patches and the update) is restricted to it; latents outside stay unchanged.
            negative_prompt: the unconditional prompt of classifier-free guidance (one or one per image;
                when neither it nor ``negative_prompt_embeds`` is given, ``""``, or on SDXL with
                ``force_zeros_for_empty_prompt`` zero embeddings, as diffusers does).
            source_prompt_embeds / target_prompt_embeds / negative_prompt_embeds: precomputed text
                embeddings ``(rows, tokens, dim)`` (e.g. from ``encode_prompt``) in place of the
                matching prompt, one row or one per image; on SDXL each needs its
                ``*_pooled_prompt_embeds`` too (diffusers' ``prompt_embeds`` convention, one set per role).
            num_images_per_prompt: edits per image (each its own noise and timestep draws).
            cross_attention_kwargs: passed to every UNet call, e.g. a LoRA ``{"scale": 0.5}``. DDS has
                no sampler, so diffusers' ``eta`` and ``guidance_rescale`` do not apply
                (``encode_prompt`` serves the pipeline's text encoders on its own).
            height, width: processing size (default: the first image's, rounded to the VAE factor).
            loss_scale: the reference code's 2000 of the DDS surrogate; with
                ``reference_latent_pixels`` (64 x 64) the per-element DDS step is the reference
                step at 512 px, at every resolution (the reference divides by the latent's own
                H x W). It does not touch the contrastive term, which CDS backpropagates as
                ``contrast_weight * loss`` alone.
            gradient_checkpointing: recompute UNet activations in the backward pass (less memory).
            generator: the only source of randomness (timesteps, noise, patch locations). One: the batch
                shares each iteration's timestep and patches; a list (one per output image): item i draws
                its own and equals a run of that image alone with generator i.
            output_type: ``"pil"``, ``"np"`` ((B, H, W, 3) in [0, 1]), ``"pt"`` ((B, 3, H, W) in
                [0, 1]) or ``"latent"``.
            return_dict: ``False`` returns ``(images,)``.
            attention_controllers: extra controllers (e.g. SoftREPA tokens) attached for the run;
                they learn one timestep per iteration, so they need a single generator.
            callback_on_step_end: ``fn(pipe, i, t, callback_kwargs) -> dict`` after each iteration;
                ``callback_kwargs`` holds ``callback_on_step_end_tensor_inputs`` (of
                ``_callback_tensor_inputs``); a returned ``"latents"`` replaces the edited latent.
                Setting ``pipe._interrupt = True`` stops after the current iteration.
        """
        # 1. Check inputs
        self.check_inputs(
            source_prompt, target_prompt, num_inference_steps, guidance_scale, learning_rate, min_timestep,
            max_timestep, contrast, contrast_weight, feature, patch_sizes, num_patches, tau, output_type,
            source_prompt_embeds=source_prompt_embeds, target_prompt_embeds=target_prompt_embeds,
        )  # fmt: skip
        check_num_images(num_images_per_prompt)
        names = callback_tensor_names(self, callback_on_step_end, callback_on_step_end_tensor_inputs)
        if contrast is not None:
            try:
                select_sites([s.name for s in attention_sites(self.unet)], contrast_sites, kind="self")
            except ValueError as error:
                raise InputError(str(error)) from None
        if isinstance(generator, list) and len(generator) > 1 and attention_controllers:
            raise InputError("attention_controllers need one generator (one timestep per iteration for the batch)")
        self._begin_run(guidance_scale, num_inference_steps)

        # 2. Encode the images (posterior mean: an fp32 master copy to optimise), one row per output
        pixels = pipeline_images(self, image, height=height, width=width)  # or (B, 4, h, w) latents
        size = pixel_size(pixels, self.vae, self.vae_scale_factor)
        source_latents = image_latents(self, pixels).float()
        roles = {
            "source": (source_prompt, source_prompt_embeds, source_pooled_prompt_embeds),
            "target": (target_prompt, target_prompt_embeds, target_pooled_prompt_embeds),
            "negative": (negative_prompt, negative_prompt_embeds, negative_pooled_prompt_embeds),
        }
        encoded = {
            role: role_conditioning(self, f"{role}_prompt", *given, height=int(size[0]), width=int(size[1]))
            for role, given in roles.items()
        }
        counts = {role: len(text.prompt_embeds) for role, text in encoded.items()}
        items = batch_size({"image": source_latents.shape[0], **counts})
        repeats = num_images_per_prompt * (items // source_latents.shape[0])
        source_latents = source_latents.repeat_interleave(repeats, dim=0)
        check_generators(generator, source_latents.shape[0])
        latents = source_latents.clone()
        region = latent_edit_region(mask, size, latents)

        # 3. Text conditioning: [uncond, cond] per branch, one row per output
        uncond, source, target = (
            encoded[role].repeat(num_images_per_prompt * (items // counts[role]))
            for role in ("negative", "source", "target")
        )
        text = {
            "dds": TextConditioning.cat([uncond, uncond, source, target]),
            "no_grad": TextConditioning.cat([uncond, source, uncond]),  # source uncond/cond, target uncond
            "source_cond": source,
            "target_cond": target,
        }

        # 4. Controllers: extra ones (SoftREPA) first, then the feature recorder
        recorder = ContrastiveFeatureRecorder(contrast_sites, feature=feature) if contrast is not None else None
        controller = compose(*(attention_controllers or ()), recorder)
        settings = {
            "direction": contrast,
            "patch_sizes": tuple(int(p) for p in patch_sizes),
            "num_patches": num_patches,
            "tau": tau,
            "generator": generator,
            "region": region,
            "identity_branch": identity_branch,
            "contrast_weight": contrast_weight,
            "loss_scale": loss_scale,
            "guidance_scale": guidance_scale,
            "dds_weight": dds_weight,
            "reference_pixels": reference_latent_pixels,
            "min_timestep": min_timestep,
            "max_timestep": max_timestep,
            "alphas": self.scheduler.alphas_cumprod.to(device=latents.device, dtype=torch.float32),
        }

        # 5. Optimise the edited latent
        drawn, losses = [], []
        with (
            self.attach_controllers(controller),
            frozen_for_backward(self.unet, gradient_checkpointing),
            unet_call_kwargs(self.unet, cross_attention_kwargs),
            self.progress_bar(total=num_inference_steps, desc="editing") as progress,
        ):
            for i in range(num_inference_steps):
                t, step, loss = self._iteration(i, latents, source_latents, text, settings, controller, recorder)
                latents = latents - learning_rate * step  # plain SGD
                drawn.append(t)
                if loss is not None:
                    losses.append(loss)
                state = step_callback(self, callback_on_step_end, i, t, {"latents": latents}, names)
                latents = state["latents"]
                progress.update()
                if self.interrupt:
                    break

        # 6. Decode
        images = postprocess(self.vae, latents, output_type)
        self.maybe_free_model_hooks()
        loss_values = [float(v) for v in torch.stack(losses).cpu()] if losses else []
        if not return_dict:
            return (images,)
        return ContrastiveEditPipelineOutput(
            images=images, latents=latents, timesteps=drawn, contrastive_losses=loss_values
        )
