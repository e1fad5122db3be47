"""Contrastive editing on MM-DiT (FlowEdit / flow DDS): faithfulness against hand-written reference loops on
the stock diffusers pipelines and transformers, the contrastive term, masks, seeds and bad input."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

from editkit.errors import InputError
from editkit.testing_mmdit import tiny_flux_pipeline, tiny_sd3_pipeline
from pipelines.flow_edit import FluxContrastiveEditPipeline, SD3ContrastiveEditPipeline

SEQ = 8  # T5 tokens: small, so the tiny runs stay fast


@pytest.fixture(scope="module")
def sd3():
    return tiny_sd3_pipeline(seed=0)


@pytest.fixture(scope="module")
def flux():
    return tiny_flux_pipeline(seed=0)


def _image(seed: int = 0, side: int = 32):
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _latents(channels: int, side: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(1, channels, side, side, generator=torch.Generator().manual_seed(seed))


# -- reference loops, written from FlowEdit's Alg. 1 and its release (FlowEdit_utils.py), on stock diffusers ---------
def _reference_flowedit_sd3(stock: StableDiffusion3Pipeline, x_src, src, tar, steps, n_max, s_src, s_tar, seed):
    kwargs = {"do_classifier_free_guidance": True, "negative_prompt": "", "max_sequence_length": SEQ}
    src_embeds, neg_embeds, src_pooled, neg_pooled = stock.encode_prompt(src, None, None, **kwargs)
    tar_embeds, _, tar_pooled, _ = stock.encode_prompt(tar, None, None, **kwargs)
    embeds = torch.cat([neg_embeds, src_embeds, neg_embeds, tar_embeds])
    pooled = torch.cat([neg_pooled, src_pooled, neg_pooled, tar_pooled])
    stock.scheduler.set_timesteps(steps)
    timesteps = stock.scheduler.timesteps
    generator = torch.Generator().manual_seed(seed)
    z_edit = x_src.clone()
    for i, t in enumerate(timesteps):
        if steps - i > n_max:
            continue
        t_i = t / 1000
        t_im1 = timesteps[i + 1] / 1000 if i + 1 < len(timesteps) else torch.zeros_like(t_i)
        noise = torch.randn(x_src.shape, generator=generator)
        zt_src = (1 - t_i) * x_src + t_i * noise
        zt_tar = z_edit + zt_src - x_src
        with torch.no_grad():
            out = stock.transformer(
                hidden_states=torch.cat([zt_src, zt_src, zt_tar, zt_tar]), timestep=t.expand(4),
                encoder_hidden_states=embeds, pooled_projections=pooled, return_dict=False,
            )[0]  # fmt: skip
        u_src, c_src, u_tar, c_tar = out.chunk(4)
        v_src = u_src + s_src * (c_src - u_src)
        v_tar = u_tar + s_tar * (c_tar - u_tar)
        z_edit = z_edit + (t_im1 - t_i) * (v_tar - v_src)
    return z_edit


def _reference_flowedit_flux(stock: FluxPipeline, x_src, src, tar, steps, n_max, g_src, g_tar, seed):
    """FLUX.1-dev: distilled guidance per branch, packed latents (the noise is drawn spatially, then packed)."""
    import numpy as np
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    b, c, h, w = x_src.shape
    pack = lambda z: stock._pack_latents(z, b, c, h, w)  # noqa: E731
    src_embeds, src_pooled, text_ids = stock.encode_prompt(src, None, max_sequence_length=SEQ)
    tar_embeds, tar_pooled, _ = stock.encode_prompt(tar, None, max_sequence_length=SEQ)
    image_ids = stock._prepare_latent_image_ids(b, h // 2, w // 2, x_src.device, x_src.dtype)
    config = stock.scheduler.config
    mu = calculate_shift((h // 2) * (w // 2), config.base_image_seq_len, config.max_image_seq_len,
                         config.base_shift, config.max_shift)  # fmt: skip
    stock.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    timesteps = stock.scheduler.timesteps
    generator = torch.Generator().manual_seed(seed)
    x_packed = pack(x_src)
    z_edit = x_packed.clone()

    def velocity(z, t, embeds, pooled, guidance):
        with torch.no_grad():
            return stock.transformer(
                hidden_states=z, timestep=t.expand(b) / 1000, guidance=torch.full((b,), guidance),
                pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=image_ids,
                return_dict=False,
            )[0]  # fmt: skip

    for i, t in enumerate(timesteps):
        if steps - i > n_max:
            continue
        t_i = t / 1000
        t_im1 = timesteps[i + 1] / 1000 if i + 1 < len(timesteps) else torch.zeros_like(t_i)
        noise = pack(torch.randn(x_src.shape, generator=generator))
        zt_src = (1 - t_i) * x_packed + t_i * noise
        zt_tar = z_edit + zt_src - x_packed
        v_src = velocity(zt_src, t, src_embeds, src_pooled, g_src)
        v_tar = velocity(zt_tar, t, tar_embeds, tar_pooled, g_tar)
        z_edit = z_edit + (t_im1 - t_i) * (v_tar - v_src)
    return stock._unpack_latents(z_edit, h * stock.vae_scale_factor, w * stock.vae_scale_factor, stock.vae_scale_factor)


def test_flowedit_matches_the_reference_loop_on_sd3(sd3):
    pipe = SD3ContrastiveEditPipeline.from_pipe(sd3)
    x_src = _latents(4)
    out = pipe(x_src, "a cat", "a dog", num_inference_steps=6, n_max=4, source_guidance_scale=2.0,
               guidance_scale=6.0, contrast=None, max_sequence_length=SEQ,
               generator=torch.Generator().manual_seed(3), output_type="latent")  # fmt: skip
    reference = _reference_flowedit_sd3(sd3, x_src, "a cat", "a dog", 6, 4, 2.0, 6.0, seed=3)
    assert len(out.timesteps) == 4
    assert (reference - x_src).abs().max() > 1e-3  # the edit moved the latent
    torch.testing.assert_close(out.latents, reference, rtol=1e-4, atol=1e-5)


def test_flowedit_matches_the_reference_loop_on_flux_with_distilled_guidance(flux):
    pipe = FluxContrastiveEditPipeline.from_pipe(flux)
    image = _image()
    with torch.no_grad():  # the stock pipeline's image processor and VAE: x_src = (mean - shift) * scale
        posterior = flux.vae.encode(flux.image_processor.preprocess(image)).latent_dist.mean
    x_src = (posterior - flux.vae.config.shift_factor) * flux.vae.config.scaling_factor
    out = pipe(image, "a cat", "a dog", num_inference_steps=5, n_max=4, source_guidance_scale=1.5,
               guidance_scale=5.5, contrast=None, max_sequence_length=SEQ,
               generator=torch.Generator().manual_seed(2), output_type="latent")  # fmt: skip
    reference = _reference_flowedit_flux(flux, x_src, "a cat", "a dog", 5, 4, 1.5, 5.5, seed=2)
    assert (reference - x_src).abs().max() > 1e-3
    torch.testing.assert_close(out.latents, reference, rtol=1e-4, atol=1e-5)


def test_flow_dds_iteration_matches_the_reference(sd3):
    """One DDS iteration: t uniform in [min, max) from the generator, the same noise on both latents, plain SGD."""
    pipe = SD3ContrastiveEditPipeline.from_pipe(sd3)
    x_src = _latents(4)
    out = pipe(x_src, "a cat", "a dog", method="dds", num_inference_steps=1, guidance_scale=4.0,
               source_guidance_scale=4.0, contrast=None, max_sequence_length=SEQ, learning_rate=0.5,
               generator=torch.Generator().manual_seed(5), output_type="latent")  # fmt: skip
    generator = torch.Generator().manual_seed(5)
    t = int(torch.randint(50, 950, (1,), generator=generator))
    noise = torch.randn(x_src.shape, generator=generator)
    sigma = t / 1000
    kwargs = {"do_classifier_free_guidance": True, "negative_prompt": "", "max_sequence_length": SEQ}
    src_e, neg_e, src_p, neg_p = sd3.encode_prompt("a cat", None, None, **kwargs)
    tar_e, _, tar_p, _ = sd3.encode_prompt("a dog", None, None, **kwargs)
    z_t = (1 - sigma) * x_src + sigma * noise  # both latents are the source at iteration 0
    with torch.no_grad():
        v = sd3.transformer(hidden_states=z_t.repeat(4, 1, 1, 1), timestep=torch.tensor([float(t)] * 4),
                            encoder_hidden_states=torch.cat([neg_e, src_e, neg_e, tar_e]),
                            pooled_projections=torch.cat([neg_p, src_p, neg_p, tar_p]), return_dict=False)[0]  # fmt: skip
    u_s, c_s, u_t, c_t = v.chunk(4)
    grad = (u_t + 4.0 * (c_t - u_t)) - (u_s + 4.0 * (c_s - u_s))
    expected = x_src - 0.5 * (2000 / 4096) * grad  # DDS's surrogate scale 2000 / (64 x 64)
    assert out.timesteps == [t]
    torch.testing.assert_close(out.latents, expected, rtol=1e-4, atol=1e-5)
