"""Compositional generation on MM-DiT transformers (SD3 / SD3.5, FLUX.1): the loop of both families.

"Fine-Grained Alignment and Noise Refinement for Compositional Text-to-Image Generation" (arXiv
2503.06506) with Attend-and-Excite's guided latent updates, written against the backbone interface
(``editkit.backbones``), so SD3 and FLUX share it. Maps: ``editkit.flow_compose_maps``; losses,
presets, verifiers and noise refiners: unchanged from the UNet pipeline (``editkit.refine``,
``editkit.loss_presets``, ``editkit.verifiers``).

Stage 1 on a flow model. For the first ``guided_steps`` steps: one conditional-only transformer
pass with grad up to the last map block (early exit), the loss on its maps, ``z_t -= step_i *
grad`` (fp32), then the step's ordinary velocity (SD3: classifier-free guidance; FLUX.1-dev: the
distilled ``guidance`` input, no CFG; FLUX.1-schnell: neither) and the Euler step of
``FlowMatchEulerDiscreteScheduler`` (``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v``). The guided pass
of FLUX.1-dev takes the same distilled guidance as the step (it is the model's conditioning).
Stage 2: the same z_T optimised on the faulty constraints' selective loss at the first timestep,
then stage 1 again; the verifier picks the better image.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from editkit.attention import AttentionController
from editkit.backbones import FlowBackbone, FlowConditioning, euler_step
from editkit.conditioning import classifier_free_guidance
from editkit.constraints import AlignedConstraints
from editkit.flow_compose_maps import FlowMapStore, PromptTokens
from editkit.flow_inversion import FlowSchedule
from editkit.loss_presets import unified_loss
from editkit.refine import (
    LossPlan,
    LossWeights,
    MapsCaptured,
    initno_refine,
    min_peak,
    refine_in_rounds,
    single_step_refine,
    token_maps,
)
from editkit.verifiers import ConstraintStatus, Verifier

__all__ = [
    "FlowComposeRun",
    "attention_maps",
    "compose_one",
    "constraint_losses",
    "denoise",
    "guided_update",
    "refine_noise",
    "velocity",
]


@dataclass
class FlowComposeRun:
    """What one generation needs besides its noise (kept together so the loop reads as the algorithm).

    ``uncond``: the negative conditioning under classifier-free guidance (SD3), ``None`` without CFG
    (FLUX). ``guidance_scale``: the CFG scale (SD3) or FLUX.1-dev's distilled guidance input.
    ``capture_steps``: steps whose maps feed the attention verifier. ``pipe``: the calling pipeline
    (progress bar, ``interrupt``); ``step_callback(i, t, latents) -> latents`` after each step.
    """

    backbone: FlowBackbone
    cond: FlowConditioning
    uncond: FlowConditioning | None
    guidance_scale: float
    tokens: PromptTokens
    weights: LossWeights
    loss_preset: str
    map_kwargs: dict
    store: FlowMapStore
    controller: AttentionController
    schedule: FlowSchedule
    guided_steps: int
    capture_steps: int
    step_sizes: torch.Tensor  # (num_inference_steps,) fp32 on the device
    thresholds: dict[int, float]
    max_refinement_steps: int
    pipe: Any = None
    step_callback: Callable | None = None
    loss_plan: LossPlan | None = None
    compact_index: torch.Tensor | None = None  # the compact view's text positions, on the device

    @property
    def aligned(self) -> AlignedConstraints:
        return self.tokens.aligned


def _timestep(run: FlowComposeRun, value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32, device=run.backbone.device)


def _denoise(run: FlowComposeRun, latents: torch.Tensor, timestep: torch.Tensor, text: FlowConditioning):
    """One transformer call in the model's dtype (FLUX: with the distilled guidance of the run)."""
    backbone = run.backbone
    latents = latents.to(backbone.dtype)
    if backbone.family == "flux":
        return backbone.denoise(latents, timestep, text, guidance_scale=run.guidance_scale)
    return backbone.denoise(latents, timestep, text)


def velocity(run: FlowComposeRun, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """The step's velocity (float32): CFG ``v_u + s (v_c - v_u)`` on SD3 (as StableDiffusion3Pipeline), else v_c."""
    if run.uncond is None:
        run.controller.batch_roles = ("cond",)
        return _denoise(run, latents, timestep, run.cond).float()
    run.controller.batch_roles = ("uncond", "cond")
    both = _denoise(run, torch.cat([latents] * 2), timestep, FlowConditioning.cat([run.uncond, run.cond]))
    return classifier_free_guidance(*both.chunk(2), run.guidance_scale).float()


def attention_maps(run: FlowComposeRun, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """One conditional pass up to the last map block: the float32 ``(h, w, text tokens)`` map, averaged."""
    store = run.store
    store.clear()
    store.active = store.early_exit = True
    run.controller.batch_roles = ("cond",)
    try:
        _denoise(run, latents, timestep, run.cond)
    except MapsCaptured:  # every needed map is in: the later blocks are skipped
        pass
    finally:
        store.active = store.early_exit = False
    text_probs = store.aggregate()[0].float()
    store.clear()  # nothing in the autograd graph outlives the pass
    return text_probs


def constraint_losses(
    run: FlowComposeRun, text_probs: torch.Tensor, entities: set[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The preset's loss on ``(h, w, text tokens)`` attention, and the ``(tokens, h, w)`` token maps.

    ``attend-excite``: on A&E's token maps of the compact view; ``paper``: the paper's loss on the
    full view (``editkit.flow_compose_maps``). ``entities`` restricts the loss (stage 2).
    """
    compact = text_probs.index_select(-1, run.compact_index)
    maps = token_maps(compact, run.aligned.last_token, **run.map_kwargs)
    if run.loss_preset == "paper":
        probs, aligned = run.tokens.full_view(text_probs), run.tokens.full_aligned
    else:
        probs, aligned = compact, run.aligned
    plan = run.loss_plan if entities is None else None
    loss, _ = unified_loss(run.loss_preset, probs, maps, aligned, run.weights, entities=entities, plan=plan)
    return loss, maps


def guided_step(run: FlowComposeRun, latents: torch.Tensor, timestep: torch.Tensor, step_size: torch.Tensor):
    """One A&E update ``z_t - step_size * grad_z loss(z_t)`` (fp32) and the token maps at ``z_t``."""
    with torch.enable_grad():
        current = latents.detach().float().requires_grad_(True)
        loss, maps = constraint_losses(run, attention_maps(run, current, timestep))
        (grad,) = torch.autograd.grad(loss, current) if loss.requires_grad else (torch.zeros_like(current),)
    return (current - step_size * grad).detach(), maps.detach()


def guided_update(run: FlowComposeRun, latents: torch.Tensor, i: int, timestep: torch.Tensor):
    """Guided step ``i``, repeated at the steps of ``run.thresholds`` until every entity's peak reaches the
    threshold (A&E's iterative refinement, at most ``max_refinement_steps`` more; a passing repeat is not applied)."""
    current = latents.detach().float()
    target = run.thresholds.get(i)
    maps = None
    for iteration in range(1 + (run.max_refinement_steps if target is not None else 0)):
        updated, maps = guided_step(run, current, timestep, run.step_sizes[i])
        if iteration > 0 and min_peak(maps, run.aligned) >= target:
            break
        current = updated
    return current, maps


def denoise(run: FlowComposeRun, noise: torch.Tensor):
    """Stage 1 from ``noise`` (z_T, sigma_0 = 1): guided steps, then plain steps; (latents, mean token maps)."""
    store, schedule = run.store, run.schedule
    latents = noise.float()
    captured: list[torch.Tensor] = []
    with run.pipe.progress_bar(total=len(schedule.timesteps)) as progress_bar:
        for i, value in enumerate(schedule.timesteps):
            run.controller.begin_step(i, value)
            timestep = _timestep(run, value)
            if i < run.guided_steps:
                latents, maps = guided_update(run, latents, i, timestep)
                captured.append(maps)
            capture = run.guided_steps <= i < run.capture_steps
            store.clear()
            store.active = capture
            step_velocity = velocity(run, latents, timestep)
            store.active = False
            if capture:
                compact = store.aggregate()[0].float().index_select(-1, run.compact_index)
                captured.append(token_maps(compact, run.aligned.last_token, **run.map_kwargs))
            latents = euler_step(latents, step_velocity, schedule.sigmas[i], schedule.sigmas[i + 1])
            if run.step_callback is not None:
                latents = run.step_callback(i, value, latents)
            progress_bar.update()
            if run.pipe.interrupt:
                break
    return latents, (torch.stack(captured).mean(dim=0) if captured else None)


def refine_noise(
    run: FlowComposeRun, noise: torch.Tensor, faulty: list[int], refiner: str, step_size: float, initno_steps: int
) -> torch.Tensor:
    """Stage 2: optimise z_T with the selective loss of the faulty entities at the first timestep."""
    first = run.schedule.timesteps[0]
    timestep = _timestep(run, first)

    def loss_fn(z_t: torch.Tensor, entities: set[int]) -> torch.Tensor:
        return constraint_losses(run, attention_maps(run, z_t, timestep), entities)[0]

    run.controller.begin_step(0, first)
    if refiner == "initno":
        return initno_refine(noise.float(), faulty, loss_fn, steps=initno_steps)
    return single_step_refine(noise.float(), faulty, loss_fn, step_size=step_size)


def verify(run: FlowComposeRun, verifier: Verifier, latents: torch.Tensor, maps) -> list[ConstraintStatus]:
    """The verifier's report on the decoded image (when it needs one) and the generation's token maps."""
    if run.aligned.empty:
        return []
    image = None
    if verifier.needs_image:
        from diffusers.image_processor import VaeImageProcessor

        image = VaeImageProcessor().postprocess(run.backbone.decode(latents), output_type="pil")[0]
    return verifier.verify(image, run.aligned, maps)


def compose_one(run: FlowComposeRun, noise: torch.Tensor, verifier: Verifier, options: dict) -> dict:
    """Stage 1, verification and stage 2 for one image; the output fields (``final``: the chosen latents).

    ``options``: ``refine`` (bool), ``noise_refiner``, ``noise_step_size``, ``initno_steps``,
    ``noise_refinement_rounds``.
    """
    verify_on = options["refine"] and not run.aligned.empty
    # 1. Stage 1: guided generation
    final, maps = denoise(run, noise)
    # 2. Verification
    report_before = verify(run, verifier, final, maps) if verify_on else None
    faulty = verifier.faulty_entities(report_before) if verify_on else []

    # 3. Stage 2: refine the same z_T on the faulty entities, regenerate, verify (in rounds), keep the better
    def refine(latest: torch.Tensor, entities) -> torch.Tensor:
        step_size, initno_steps = options["noise_step_size"], options["initno_steps"]
        return refine_noise(run, latest, entities, options["noise_refiner"], step_size, initno_steps).to(noise.dtype)

    def regenerate(refined: torch.Tensor):
        second, second_maps = denoise(run, refined)
        return second, verify(run, verifier, second, second_maps)

    rounds = options["noise_refinement_rounds"]
    best = refine_in_rounds(noise, faulty, rounds, refine, regenerate, verifier, stop=lambda: run.pipe.interrupt)
    refined_noise, report_after, chosen = None, None, "stage1"
    if best is not None:
        second, refined_noise, report_after = best
        if verifier.rank(report_after) > verifier.rank(report_before):
            final, chosen = second, "refined"
    return {
        "final": final, "report_before": report_before, "report_after": report_after, "chosen": chosen,
        "initial_noise": noise, "refined_noise": refined_noise,
    }  # fmt: skip


def with_tokens(run: FlowComposeRun, tokens: PromptTokens, device: torch.device) -> FlowComposeRun:
    """``run`` for another prompt's tokens (the compact index moved to ``device``)."""
    index = torch.tensor(tokens.compact_index, dtype=torch.long, device=device)
    return dataclasses.replace(run, tokens=tokens, compact_index=index)
