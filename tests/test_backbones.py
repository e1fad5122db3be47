"""editkit.backbones: flow arithmetic against the scheduler, and each backbone against its own diffusers pipeline."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from editkit.backbones import (
    FluxBackbone,
    SD3Backbone,
    UNetBackbone,
    backbone_for,
    euler_step,
    flow_noise,
    flow_noisy,
    flow_velocity,
    flow_x0,
    shift_sigmas,
    sigma_from_timestep,
)
from editkit.errors import InputError

# -- flow-matching arithmetic against FlowMatchEulerDiscreteScheduler ------------------------------


def test_euler_step_equals_scheduler_step():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(4)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    for index, timestep in enumerate(scheduler.timesteps):
        velocity = torch.randn(sample.shape, generator=generator)
        expected = scheduler.step(velocity, timestep, sample, return_dict=False)[0]
        sigmas = scheduler.sigmas
        torch.testing.assert_close(euler_step(sample, velocity, sigmas[index], sigmas[index + 1]), expected)
        sample = expected


def test_noising_equals_scheduler_scale_noise():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    generator = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 2, 4, 4, 4, generator=generator)
    timestep = scheduler.timesteps[3]
    expected = scheduler.scale_noise(x0, timestep[None], noise)
    torch.testing.assert_close(flow_noisy(x0, noise, sigma_from_timestep(timestep)), expected)


def test_x0_and_noise_recovered_from_the_velocity():
    generator = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(2, 3, 4, 4, 4, generator=generator)
    sigma = torch.tensor([0.2, 0.9, 0.5])  # one per sample
    x_t = flow_noisy(x0, noise, sigma)
    velocity = flow_velocity(x0, noise)
    torch.testing.assert_close(flow_x0(x_t, velocity, sigma), x0)
    torch.testing.assert_close(flow_noise(x_t, velocity, sigma), noise)
    torch.testing.assert_close(x_t[1], 0.1 * x0[1] + 0.9 * noise[1])  # eq. 3 written out


def test_shift_matches_scheduler_and_paper():
    sigmas = torch.linspace(1.0, 0.25, 4)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(sigmas=sigmas.numpy())
    torch.testing.assert_close(shift_sigmas(sigmas, 3.0), scheduler.sigmas[:-1])
    assert shift_sigmas(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)  # 3 * 0.5 / (1 + 2 * 0.5)


def test_image_latents_use_the_vae_shift(sd3_pipe):
    """SD3's img2img pipeline: latents = (z - shift_factor) * scaling_factor, and back for decoding."""
    backbone = backbone_for(sd3_pipe)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    z = sd3_pipe.vae.encode(image).latent_dist.mean
    latents = backbone.encode_image(image)
    torch.testing.assert_close(latents, (z - 0.0609) * 1.5305)
    expected = sd3_pipe.vae.decode(latents / 1.5305 + 0.0609).sample.clamp(-1, 1)
    torch.testing.assert_close(backbone.decode(latents), expected)


# -- each backbone reproduces its pipeline's own sampling loop -------------------------------------


def _flow_loop(backbone, pipe, prompt: str, noise: torch.Tensor) -> torch.Tensor:
    """Euler sampling with the backbone on the timesteps/sigmas the pipeline just used."""
    conditioning = backbone.encode_text(prompt)
    latents, sigmas = noise, pipe.scheduler.sigmas
    for index, timestep in enumerate(pipe.scheduler.timesteps):
        velocity = backbone.denoise(latents, timestep, conditioning)
        latents = euler_step(latents, velocity, sigmas[index], sigmas[index + 1])
    return latents


def test_sd3_backbone_reproduces_the_pipeline(sd35_pipe):
    backbone = backbone_for(sd35_pipe)
    assert isinstance(backbone, SD3Backbone) and backbone.prediction_type == "flow"
    noise = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    expected = sd35_pipe(
        "a red square", latents=noise, height=32, width=32, num_inference_steps=2, guidance_scale=1.0,
        output_type="latent",
    ).images  # fmt: skip
    torch.testing.assert_close(_flow_loop(backbone, sd35_pipe, "a red square", noise), expected)


def test_flux_backbone_reproduces_the_pipeline(flux_pipe):
    backbone = backbone_for(flux_pipe, guidance_scale=2.0)
    assert isinstance(backbone, FluxBackbone) and backbone.guidance_distilled
    noise = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0))  # 1 latent channel, 32 px
    expected = flux_pipe(
        "a red square", latents=backbone.pack_latents(noise), height=32, width=32, num_inference_steps=2,
        guidance_scale=2.0, output_type="latent",
    ).images  # fmt: skip
    result = _flow_loop(backbone, flux_pipe, "a red square", noise)
    torch.testing.assert_close(backbone.pack_latents(result), expected)


def test_flux_packing_and_guidance(flux_pipe):
    backbone = FluxBackbone(flux_pipe)
    latents = torch.randn(2, 1, 4, 6)
    packed = backbone.pack_latents(latents)
    assert packed.shape == (2, 2 * 3, 4)
    torch.testing.assert_close(packed[0, 0], latents[0, 0, :2, :2].flatten())  # one 2x2 patch per token
    torch.testing.assert_close(backbone.unpack_latents(packed, 4, 6), latents)
    with pytest.raises(InputError, match="even height and width"):
        backbone.pack_latents(torch.randn(1, 1, 3, 4))
    conditioning = backbone.encode_text("a red square")
    timestep = flux_pipe.scheduler.config.num_train_timesteps // 2
    low, high = (backbone.denoise(latents[:1], timestep, conditioning, guidance_scale=g) for g in (1.0, 5.0))
    assert low.shape == latents[:1].shape and not torch.allclose(low, high)  # the guidance input reaches the model


def test_unet_backbone_matches_the_pipeline_and_ddim(sd15_pipe):
    backbone = backbone_for(sd15_pipe)
    assert isinstance(backbone, UNetBackbone) and backbone.family == "sd"
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = sd15_pipe(
        "a red square", latents=noise, height=64, width=64, num_inference_steps=2, guidance_scale=1.0,
        output_type="latent",
    ).images  # fmt: skip
    scheduler = DDIMScheduler.from_config(sd15_pipe.scheduler.config)
    scheduler.set_timesteps(2)
    conditioning, latents = backbone.encode_text("a red square"), noise
    for timestep in scheduler.timesteps:
        eps = backbone.denoise(latents, timestep, conditioning)
        step = scheduler.step(eps, timestep, latents)
        torch.testing.assert_close(backbone.predicted_x0(latents, eps, timestep), step.pred_original_sample)
        latents = step.prev_sample
    torch.testing.assert_close(latents, expected)
    x0 = torch.randn_like(noise)
    torch.testing.assert_close(backbone.add_noise(x0, noise, 500), scheduler.add_noise(x0, noise, torch.tensor(500)))


def test_site_names_of_the_other_architecture_refused(flux_pipe, sd15_pipe):
    with pytest.raises(InputError, match=r"'up_blocks\.1\.attentions\.0.*' is a UNet attention site name.*flux"):
        backbone_for(flux_pipe).check_sites(["up_blocks.1.attentions.0.transformer_blocks.0.attn1"], "--sites")
    with pytest.raises(InputError, match="is an MM-DiT attention site name"):
        backbone_for(sd15_pipe).check_sites(["transformer_blocks.0.attn"])
    backbone_for(flux_pipe).check_sites(["single_transformer_blocks.0.attn", "transformer_blocks"])
