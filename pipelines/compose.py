"""Compositional text-to-image: constraint losses on cross-attention maps, a verifier, noise refinement.

"Fine-Grained Alignment and Noise Refinement for Compositional Text-to-Image Generation"
(arXiv 2503.06506), with Attend-and-Excite's guided latent updates, on editkit's shared
attention layer, for SD 1.x/2.x and SDXL.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from diffusers.utils import BaseOutput

from editkit.acceleration import frozen_weights
from editkit.attention import AttentionController, AttentionKernelMixin, compose
from editkit.backbones.pipeline_bases import UNetComponents
from editkit.compose_choices import check_compose_choices
from editkit.conditioning import EMBEDDING_NAMES, TextConditioning, classifier_free_guidance, guidance_conditioning
from editkit.constraints import AlignedConstraints, Constraints, align, constraints_from_dict, parse_prompt
from editkit.errors import InputError
from editkit.inversion import decode_latents
from editkit.loss_presets import preset_weights, unified_loss
from editkit.pipeline_io import (
    as_list,
    as_prompt_list,
    broadcast,
    callback_tensor_names,
    check_generators,
    check_num_images,
    check_output_type,
    postprocess,
    prepare_noise,
    scheduler_step_kwargs,
    step_callback,
    unet_call_kwargs,
)
from editkit.refine import (
    GUIDANCE_BLOCKS,
    GuidanceMapStore,
    LossPlan,
    LossWeights,
    MapsCaptured,
    initno_refine,
    loss_plan,
    map_divisor,
    map_grid,
    min_peak,
    refine_in_rounds,
    single_step_refine,
    step_sizes,
    token_maps,
)
from editkit.verifiers import ConstraintStatus, Verifier, make_verifier

logger = logging.getLogger(__name__)


@dataclass
class ComposePipelineOutput(BaseOutput):
    """Images and the constraint report; with several images (a prompt list, ``num_images_per_prompt``)
    every field but ``images`` is a list with one entry per image.

    ``report_before``/``report_after``: each constraint's status after stage 1 and after noise
    refinement (``None`` when not run); ``chosen``: ``"stage1"`` or ``"refined"``;
    ``initial_noise``: the stage-1 z_T; ``refined_noise``: stage 2's z_T (or ``None``).
    """

    images: Any
    constraints: Constraints
    report_before: list[ConstraintStatus] | None
    report_after: list[ConstraintStatus] | None
    chosen: str
    initial_noise: torch.Tensor
    refined_noise: torch.Tensor | None
    warnings: list[str]


@dataclass
class _Run:
    """What one generation needs besides the noise (kept together to keep the loop readable)."""

    cond: TextConditioning
    cfg: TextConditioning | None
    aligned: AlignedConstraints
    weights: LossWeights
    loss_preset: str
    store: GuidanceMapStore
    store_grid: tuple[int, int]
    controller: AttentionController
    guided_steps: int
    map_kwargs: dict
    step_sizes: torch.Tensor  # (num_inference_steps,) fp32 on the device: a step's size is a tensor, not a constant
    thresholds: dict[int, float]
    max_refinement_steps: int
    guidance_scale: float
    capture_steps: int
    unet_dtype: torch.dtype
    guidance_rescale: float = 0.0
    eta: float = 0.0
    loss_plan: LossPlan | None = None  # the guided steps' loss constants, made once per generation


class ComposePipeline(AttentionKernelMixin, UNetComponents, DiffusionPipeline):
    r"""Text-to-image with compositional constraints (entities, attribute bindings, relations).

    Stage 1 guides the latents of the first ``max_iter_to_alter`` steps with losses on the
    cross-attention maps; a verifier scores each constraint; stage 2 refines the SAME initial
    noise on the faulty constraints and regenerates; the verifier picks the better image.

    Example:
        ```py
        >>> from pipelines.compose import ComposePipeline
        >>> pipe = ComposePipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5").to("cuda")
        >>> out = pipe("a red car on the left of a blue bird", generator=torch.Generator().manual_seed(0))
        >>> out.images[0].save("car.png")
        >>> out.chosen, [(status.description, status.satisfied) for status in out.report_before]
        ```
    """

    # -- inputs -------------------------------------------------------------------------------
    def check_inputs(self, prompt, height, width, num_inference_steps, max_iter_to_alter, verifier, guidance_scale=7.5):
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError("prompt must be a non-empty string (one prompt per call)")
        if not (isinstance(guidance_scale, int | float) and math.isfinite(guidance_scale) and guidance_scale >= 0):
            raise InputError(f"guidance_scale must be a finite number >= 0, got {guidance_scale}")
        if height % 8 or width % 8:
            raise InputError(f"height and width must be multiples of 8, got {height}x{width}")
        if num_inference_steps < 1:
            raise InputError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        if not 0 <= max_iter_to_alter <= num_inference_steps:
            raise InputError(f"max_iter_to_alter must be in 0..num_inference_steps, got {max_iter_to_alter}")
        if not (isinstance(verifier, Verifier) or verifier in ("attention", "shapes")):
            raise InputError(
                f"verifier must be 'attention', 'shapes' or a Verifier instance (vqa/detector), got {verifier!r}"
            )

    def prepare_constraints(
        self, prompt: str, constraints: Constraints | dict | None, parser: str, notes: list[str]
    ) -> tuple[Constraints, AlignedConstraints]:
        """Parse (or take) the constraints and align them to token indices; note what is not constrained."""
        if isinstance(constraints, dict):
            constraints = constraints_from_dict(constraints, prompt)
        elif constraints is None:
            constraints = parse_prompt(prompt, parser)
        elif constraints.prompt != prompt:
            raise InputError("the constraints were made for another prompt")
        tokens = len(self.tokenizer(prompt, add_special_tokens=False).input_ids)
        if tokens > self.tokenizer.model_max_length - 2:
            notes.append(
                f"prompt has {tokens} tokens; truncated to the text encoder's {self.tokenizer.model_max_length}"
            )
        aligned = align(constraints, self.tokenizer)
        notes.extend(f"not constrained: {part}" for part in constraints.unparsed + aligned.dropped)
        if aligned.empty:
            notes.append("no entity found in the prompt; generating without constraint guidance")
        for note in notes:
            logger.warning(note)
        return constraints, aligned

    # -- guidance -----------------------------------------------------------------------------
    def attention_maps(self, latents: torch.Tensor, t, run: _Run) -> tuple[torch.Tensor, torch.Tensor]:
        """One conditional UNet forward: its float32 ``(h, w, keys)`` attention and ``(tokens, h, w)`` token maps."""
        run.store.clear()
        run.store.active = run.store.early_exit = True
        run.controller.batch_roles = ("cond",)
        try:
            latent_in = self.scheduler.scale_model_input(latents, t).to(run.unet_dtype)
            self.unet(latent_in, t, **run.cond.unet_kwargs(), return_dict=False)
        except MapsCaptured:  # every needed map is in: the later UNet layers are skipped
            pass
        finally:
            run.store.active = run.store.early_exit = False
        run.store.learn_last_site()
        probs = run.store.aggregate(run.store_grid)[0].float()  # (h, w, keys)
        run.store.clear()  # nothing in the autograd graph outlives the pass (a captured step returns only these)
        return probs, token_maps(probs, run.aligned.last_token, **run.map_kwargs)

    def guided_step(
        self, latents: torch.Tensor, t, step_size: float | torch.Tensor, run: _Run
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One A&E update ``z_t - step_size * grad_z loss(z_t)`` (fp32) and the token maps at ``z_t``.

        Written to be captured whole (a CUDA graph, ``torch.compile(fullgraph=True)``): the conditional
        forward with grad to the map layers, the loss and ``autograd.grad``, with static shapes, no host
        synchronisation and no branch on a tensor's value. ``step_size`` may be a 0-d tensor, so one
        capture replays at every step; so does ``t`` with a scheduler whose ``scale_model_input`` is the
        identity (DDIM, DDPM, PNDM). Eagerly the forward stops after the last map layer (``MapsCaptured``,
        caught inside).
        """
        with torch.enable_grad():
            current = latents.detach().float().requires_grad_(True)
            probs, maps = self.attention_maps(current, t, run)
            loss, _ = unified_loss(run.loss_preset, probs, maps, run.aligned, run.weights, plan=run.loss_plan)
            (grad,) = torch.autograd.grad(loss, current) if loss.requires_grad else (torch.zeros_like(current),)
        return (current - step_size * grad).detach(), maps.detach()

    def guided_update(self, latents: torch.Tensor, i: int, t, run: _Run) -> tuple[torch.Tensor, torch.Tensor]:
        """A&E step ``i`` (:meth:`guided_step`), with iterative refinement at the steps of ``run.thresholds``.

        Refinement repeats the step until every entity's peak reaches the step's threshold (at most
        ``max_refinement_steps`` more): the one host-side test on a tensor's value, between steps. A
        repeat whose maps already pass is not applied (as A&E; its backward is spent).
        """
        current = latents.detach().float()
        target = run.thresholds.get(i)
        for iteration in range(1 + (run.max_refinement_steps if target is not None else 0)):
            updated, maps = self.guided_step(current, t, run.step_sizes[i], run)
            if iteration > 0 and min_peak(maps, run.aligned) >= target:
                break
            current = updated
        return current.to(latents.dtype), maps

    def denoise(self, noise: torch.Tensor, timesteps, run: _Run, generator, callback, label: str = "stage 1"):
        """Stage 1 from ``noise`` (z_T): guided steps, then plain CFG steps; returns (latents, mean maps).

        ``label`` names the progress bar ("stage 1", or "refinement" for the regeneration from the refined noise)."""
        latents = noise * self.scheduler.init_noise_sigma
        captured: list[torch.Tensor] = []
        extra = scheduler_step_kwargs(self.scheduler, generator, run.eta)
        with self.progress_bar(total=len(timesteps), desc=label) as progress_bar:
            for i, t in enumerate(timesteps):
                run.controller.begin_step(i, t)
                if i < run.guided_steps:
                    latents, maps = self.guided_update(latents, i, t, run)
                    captured.append(maps)
                capture = i < run.capture_steps and i >= run.guided_steps
                run.store.clear()
                run.store.active = capture
                run.controller.batch_roles = ("uncond", "cond") if run.cfg is not None else ("cond",)
                text = run.cfg if run.cfg is not None else run.cond
                latent_in = torch.cat([latents] * 2) if run.cfg is not None else latents
                latent_in = self.scheduler.scale_model_input(latent_in, t)
                noise_pred = self.unet(latent_in, t, **text.unet_kwargs(), return_dict=False)[0]
                run.store.active = False
                if capture:
                    probs = run.store.aggregate(run.store_grid)[0].float()
                    captured.append(token_maps(probs, run.aligned.last_token, **run.map_kwargs))
                if run.cfg is not None:
                    uncond, cond = noise_pred.chunk(2)
                    noise_pred = classifier_free_guidance(uncond, cond, run.guidance_scale)
                    if run.guidance_rescale > 0:  # Lin et al. 2024, eq. 16, as diffusers' pipelines
                        noise_pred = rescale_noise_cfg(noise_pred, cond, guidance_rescale=run.guidance_rescale)
                latents = self.scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]
                callback_on_step_end, names = callback
                latents = step_callback(self, callback_on_step_end, i, t, {"latents": latents}, names)["latents"]
                progress_bar.update()
                if self.interrupt:
                    break
        return latents, (torch.stack(captured).mean(dim=0) if captured else None)

    def refine_noise(self, noise, faulty, timesteps, run: _Run, refiner: str, step_size: float, initno_steps: int):
        """Stage 2: optimise z_T with the selective loss of the faulty entities (same noise tensor)."""
        t = timesteps[0]

        def loss_fn(z_t: torch.Tensor, entities: set[int]) -> torch.Tensor:
            probs, maps = self.attention_maps(z_t * self.scheduler.init_noise_sigma, t, run)
            return unified_loss(run.loss_preset, probs, maps, run.aligned, run.weights, entities=entities)[0]

        run.controller.begin_step(0, t)
        if refiner == "initno":
            return initno_refine(noise, faulty, loss_fn, steps=initno_steps)
        return single_step_refine(noise, faulty, loss_fn, step_size=step_size)

    def verify(self, verifier: Verifier, latents, maps, run: _Run) -> list[ConstraintStatus]:
        if run.aligned.empty:
            return []
        image = (
            self.image_processor.postprocess(decode_latents(self.vae, latents), output_type="pil")[0]
            if verifier.needs_image
            else None
        )
        return verifier.verify(image, run.aligned, maps)

    # -- the algorithm ------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        constraints: Constraints | dict | list | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        guidance_rescale: float = 0.0,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        cross_attention_kwargs: dict | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        max_iter_to_alter: int | None = None,
        scale_factor: float = 20.0,
        scale_range: tuple[float, float] = (1.0, 0.5),
        refinement_thresholds: dict[int, float] | None = None,
        max_refinement_steps: int = 20,
        loss_preset: str = "attend-excite",
        missing_weight: float | None = None,
        mixing_weight: float | None = None,
        binding_weight: float | None = None,
        spatial_weight: float | None = None,
        spatial_margin: float = 0.1,
        token_softmax_scale: float = 100.0,
        smooth_attention: bool = True,
        smoothing_kernel_size: int = 3,
        smoothing_sigma: float = 0.5,
        attention_blocks: Sequence[str] = GUIDANCE_BLOCKS,
        refine: bool = True,
        verifier: str | Verifier = "attention",
        noise_refiner: str = "single-step",
        noise_step_size: float = 20.0,
        initno_steps: int = 10,
        noise_refinement_rounds: int = 1,
        constraint_parser: str = "auto",
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        attention_controllers: Sequence[AttentionController] | None = None,
    ):
        r"""Generate ``prompt`` with its constraints enforced.

        Args:
            constraints: ``Constraints``, or a dict in its JSON schema; ``None`` parses the prompt.
            max_iter_to_alter: denoising steps with a guided latent update (default: half of
                ``num_inference_steps``, as A&E/the paper's 25 of 50).
            scale_factor, scale_range: step size ``scale_factor * sqrt(linspace(scale_range))`` per step.
            refinement_thresholds: A&E's iterative refinement ``{step: min peak attention}``, e.g.
                ``{0: 0.05, 10: 0.5, 20: 0.8}``; up to ``max_refinement_steps`` extra updates per step.
            loss_preset: the formulation of the four losses. ``"attend-excite"`` (default): on A&E's
                maps (x100 softmax over the real prompt tokens, smoothing), ``max(1 - peak)`` entity
                missing, soft-IoU mixing and binding, a margin hinge for relations (deviations from
                the paper, chosen for their gradients; ``editkit.refine``). ``"paper"``: the paper's
                own (T=1 softmax over tokens 1..75 with padding, x100 for the spatial loss only, no
                smoothing, peak-difference hinge, ``sum(ab)/sum(a+b)`` mixing only without relations,
                ``1 - IoU`` binding, sigmoid spatial loss; ``editkit.loss_presets``). On the shapes
                model the paper preset's gradients are ~25x larger and its images collapse at the
                paper's step size (relation accuracy 0.09 against 0.78; ``benchmarks/RESULTS.md``),
                which is why ``attend-excite`` is the default.
            missing_weight, mixing_weight, binding_weight, spatial_weight: weights of the entity
                missing, entity mixing, attribute binding and spatial losses (default: the preset's,
                1 / 0.5 / 0.5 / 1 for ``attend-excite``, all 1 for ``paper``); all 0 (or
                ``max_iter_to_alter=0``) turns guidance off. ``spatial_margin``: the
                ``attend-excite`` centroid margin.
            token_softmax_scale: logit scale of the softmax over real prompt tokens (A&E: 100).
            smooth_attention, smoothing_kernel_size, smoothing_sigma: Gaussian smoothing of maps.
                These four shape the maps of the ``attend-excite`` loss, of the attention verifier
                and of ``refinement_thresholds``; the ``paper`` loss makes its own maps.
            attention_blocks: the UNet blocks whose cross-attention layers at the guidance grid are
                averaged into the maps: ``("down", "up")`` (A&E and the paper; default) or
                ``("down",)``, a deviation that stops each guided pass after the down path (SD 1.5:
                down_blocks.2): stage 1 at 1.18x plain generation instead of 1.71x on an H200, but
                less accurate on the shapes model (relation accuracy after stage 1: 0.625 against 0.78;
                ``benchmarks/RESULTS.md``).
            refine: run verification and stage 2 (noise refinement); ``False`` gives stage 1 only.
            verifier: ``"attention"`` (a heuristic on the generation's own attention maps),
                ``"shapes"`` (the shapes world's detector, for ``assets/models/shapes-sd``) or a
                ``Verifier`` (``editkit.verifiers.VQAVerifier``, ...).
            noise_refiner: ``"single-step"`` (paper: one step of ``noise_step_size`` per faulty
                entity) or ``"initno"`` (Adam on mean/log-variance with a KL bound, ``initno_steps``).
            noise_refinement_rounds: stage 2's rounds (default 1, the paper's). Each further round is
                editkit's extension: it refines the previous round's z_T on the entities that round's image
                still fails, regenerates and verifies, and runs only while a constraint fails; the best round
                by the verifier is compared with stage 1 (``editkit.refine.refine_in_rounds``). Each round
                costs one refinement and one stage 1 (``benchmarks/RESULTS.md``, session 14).
            attention_controllers: extra controllers (e.g. SoftREPA tokens) attached for the run.
            num_images_per_prompt, generator (one or one per image), eta, guidance_rescale, *prompt_embeds
                (pooled ones on SDXL), cross_attention_kwargs, latents, callback_on_step_end(_tensor_inputs):
                as in ``StableDiffusionPipeline``; ``prompt`` is still needed (constraints are parsed from it).
        """
        # 0. Defaults and checks (every prompt), one initial noise per output drawn at once, as diffusers does
        embeds = (prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds)
        embeds = dict(zip(EMBEDDING_NAMES, embeds, strict=True))
        per_prompt = broadcast(
            {"prompt": as_prompt_list(prompt), "constraints": as_list(constraints) or [None],
             "negative_prompt": as_list(negative_prompt) or [None]},
            {k: len(v) for k, v in embeds.items() if v is not None},
        )  # fmt: skip
        prompts = per_prompt["prompt"]
        check_num_images(num_images_per_prompt)
        unet_size = self.unet.config.sample_size * self.vae_scale_factor
        height, width = height or unet_size, width or unet_size
        max_iter_to_alter = num_inference_steps // 2 if max_iter_to_alter is None else max_iter_to_alter
        checks = (height, width, num_inference_steps, max_iter_to_alter, verifier, guidance_scale)
        for text in prompts:
            self.check_inputs(text, *checks)
        check_compose_choices(loss_preset, noise_refiner, noise_refinement_rounds)
        check_output_type(output_type)
        names = callback_tensor_names(self, callback_on_step_end, callback_on_step_end_tensor_inputs)
        total = len(prompts) * num_images_per_prompt
        check_generators(generator, total)
        device = self._execution_device
        latent_hw = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        shape = (total, self.unet.config.in_channels, *latent_hw)
        latents = prepare_noise(shape, generator, device, self.unet.dtype, latents)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        self._begin_run(guidance_scale, len(self.scheduler.timesteps))
        weights = preset_weights(
            loss_preset, missing=missing_weight, mixing=mixing_weight, binding=binding_weight, spatial=spatial_weight
        )
        weights.spatial_margin = spatial_margin
        template = _Run(
            cond=None, cfg=None, aligned=None, store=None, store_grid=None, controller=None, guided_steps=0,
            capture_steps=0, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, eta=eta,
            weights=weights, loss_preset=loss_preset,
            map_kwargs={
                "token_softmax_scale": token_softmax_scale, "smooth": smooth_attention,
                "kernel_size": smoothing_kernel_size, "sigma": smoothing_sigma,
            },
            step_sizes=torch.tensor(step_sizes(num_inference_steps, scale_factor, scale_range), device=device),
            thresholds=dict(refinement_thresholds or {}), max_refinement_steps=max_refinement_steps,
            unet_dtype=self.unet.dtype,  # a property that walks the model: read once
        )  # fmt: skip
        options = {
            "run": template, "height": height, "width": width, "num_inference_steps": num_inference_steps,
            "max_iter_to_alter": max_iter_to_alter, "attention_blocks": attention_blocks, "refine": refine,
            "verifier": make_verifier(verifier),
            "noise_refiner": noise_refiner, "noise_step_size": noise_step_size, "initno_steps": initno_steps,
            "noise_refinement_rounds": noise_refinement_rounds,
            "constraint_parser": constraint_parser, "callback": (callback_on_step_end, names),
            "attention_controllers": list(attention_controllers or []),
        }  # fmt: skip

        # 1.-6. Each output: constraints, stage 1, verification, stage 2 (prompt-major, as diffusers orders them)
        runs = []
        for index in range(total):
            item = index // num_images_per_prompt
            item_generator = generator[index] if isinstance(generator, list) else generator
            noise = latents[index : index + 1]
            texts = (prompts[item], per_prompt["constraints"][item], per_prompt["negative_prompt"][item])
            rows = {k: v if len(v) == 1 else v[item : item + 1] for k, v in embeds.items() if v is not None}
            with unet_call_kwargs(self.unet, cross_attention_kwargs):
                runs.append(self._compose_one(*texts, rows, noise, item_generator, options))
            if self.interrupt:
                break

        # 7. Decode the chosen latents
        images = postprocess(self.vae, torch.cat([run.pop("final") for run in runs]), output_type)
        self.maybe_free_model_hooks()
        fields = runs[0] if total == 1 else {key: [run[key] for run in runs] for key in runs[0]}
        output = ComposePipelineOutput(images=images, **fields)
        return output if return_dict else (images,)

    def _compose_one(self, prompt, constraints, negative_prompt, embeds, initial_noise, generator, options) -> dict:
        """One output image: constraints, stage 1, verification, stage 2; the fields of the output."""
        notes: list[str] = []
        verifier = options["verifier"]
        latent_hw = tuple(initial_noise.shape[-2:])
        grid = map_grid(latent_hw, map_divisor(self.unet.config))
        try:
            store = GuidanceMapStore(grid, blocks=options["attention_blocks"])
        except ValueError as error:
            raise InputError(str(error)) from None

        # 1. Constraints -> token indices
        constraints, aligned = self.prepare_constraints(prompt, constraints, options["constraint_parser"], notes)
        guided = 0 if aligned.empty or not options["run"].weights.any else options["max_iter_to_alter"]
        verify = options["refine"] and not aligned.empty

        # 2. Text conditioning
        height, width, steps = options["height"], options["width"], options["num_inference_steps"]
        cfg_on = self.do_classifier_free_guidance
        size = {"height": height, "width": width}
        cond, cfg = guidance_conditioning(self, prompt, negative_prompt, **size, cfg=cfg_on, embeds=embeds)

        # 3. Timesteps; the initial noise z_T is kept: stage 2 refines this very tensor
        device = self._execution_device
        self.scheduler.set_timesteps(steps, device=device)
        timesteps = self.scheduler.timesteps
        controller = compose(store, *options["attention_controllers"])
        run = dataclasses.replace(
            options["run"], cond=cond, cfg=cfg, aligned=aligned, store=store, store_grid=grid, controller=controller,
            guided_steps=guided,
            capture_steps=max(options["max_iter_to_alter"], 1) if verify and verifier.needs_maps else 0,
            loss_plan=loss_plan(aligned, options["run"].weights, (aligned.last_token, *grid), device=device),
        )  # fmt: skip
        callback = options["callback"]
        with self.attach_controllers(controller), frozen_weights(self.unet):
            # 4. Stage 1: guided generation
            final, maps = self.denoise(initial_noise, timesteps, run, generator, callback)

            # 5. Verification
            report_before = self.verify(verifier, final, maps, run) if verify else None
            faulty = verifier.faulty_entities(report_before) if verify else []

            # 6. Stage 2: refine the same z_T on the faulty entities, regenerate, verify (in rounds)
            def refine(latest, entities):
                self.scheduler.set_timesteps(steps, device=device)
                refiner, step_size = options["noise_refiner"], options["noise_step_size"]
                return self.refine_noise(latest, entities, timesteps, run, refiner, step_size, options["initno_steps"])

            def regenerate(refined):
                self.scheduler.set_timesteps(steps, device=device)
                second, second_maps = self.denoise(refined, timesteps, run, generator, callback, "refinement")
                return second, self.verify(verifier, second, second_maps, run)

            rounds = options["noise_refinement_rounds"]
            best = refine_in_rounds(initial_noise, faulty, rounds, refine, regenerate, verifier, lambda: self.interrupt)
            refined_noise, report_after, chosen = None, None, "stage1"
            if best is not None:
                second, refined_noise, report_after = best
                if verifier.rank(report_after) > verifier.rank(report_before):
                    final, chosen = second, "refined"
        return {
            "final": final, "constraints": constraints, "report_before": report_before, "report_after": report_after,
            "chosen": chosen, "initial_noise": initial_noise, "refined_noise": refined_noise, "warnings": notes,
        }  # fmt: skip
