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


# -- reference loops, written from FlowEdit's Alg. 1 and its release (FlowEdit_utils.py), on stock diffusers --
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
        v = sd3.transformer(
            hidden_states=z_t.repeat(4, 1, 1, 1), timestep=torch.tensor([float(t)] * 4),
            encoder_hidden_states=torch.cat([neg_e, src_e, neg_e, tar_e]),
            pooled_projections=torch.cat([neg_p, src_p, neg_p, tar_p]), return_dict=False,
        )[0]  # fmt: skip
    u_s, c_s, u_t, c_t = v.chunk(4)
    grad = (u_t + 4.0 * (c_t - u_t)) - (u_s + 4.0 * (c_s - u_s))
    expected = x_src - 0.5 * (2000 / 4096) * grad  # DDS's surrogate scale 2000 / (64 x 64)
    assert out.timesteps == [t]
    torch.testing.assert_close(out.latents, expected, rtol=1e-4, atol=1e-5)


# -- the contrastive term ------------------------------------------------------------
def test_recorded_features_are_the_stock_attention_image_outputs(sd3):
    """FlowContrastFeatureRecorder sees what the stock JointAttnProcessor2_0 returns for the image tokens (hook)."""
    from editkit.attention import attach
    from editkit.flow_edit import FlowContrastFeatureRecorder

    latents, context = _latents(4), torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(4))
    pooled, timestep = torch.randn(1, 64, generator=torch.Generator().manual_seed(5)), torch.tensor([500.0])
    kwargs = {"hidden_states": latents, "timestep": timestep, "encoder_hidden_states": context,
              "pooled_projections": pooled, "return_dict": False}  # fmt: skip
    seen = {}
    layer = sd3.transformer.transformer_blocks[0].attn
    handle = layer.register_forward_hook(lambda _m, _a, out: seen.update(stock=out[0]))
    with torch.no_grad():
        sd3.transformer(**kwargs)
    handle.remove()
    recorder = FlowContrastFeatureRecorder(("transformer_blocks",), role=None)
    recorder.branch = "source"
    with torch.no_grad(), attach(sd3.transformer, recorder):
        sd3.transformer(**kwargs)
    recorded = recorder.features["source"]["transformer_blocks.0.attn"]
    assert recorder.grids["transformer_blocks.0.attn"] == (4, 4)
    torch.testing.assert_close(recorded, seen["stock"])


def _edit(pipe, image, **options):
    options = {"num_inference_steps": 4, "n_max": 3, "max_sequence_length": SEQ, "output_type": "latent",
               "generator": torch.Generator().manual_seed(0)} | options  # fmt: skip
    return pipe(image, "a cat", "a dog", **options)


def test_contrast_changes_the_edit_and_weight_zero_is_plain_flowedit(sd3):
    pipe = SD3ContrastiveEditPipeline.from_pipe(sd3)
    image = _latents(4)
    plain = _edit(pipe, image, contrast=None)
    zero = _edit(pipe, image, contrast="dual", contrast_weight=0.0)
    dual = _edit(pipe, image, contrast="dual", contrast_weight=3.0, learning_rate=1.0)
    torch.testing.assert_close(zero.latents, plain.latents, rtol=1e-5, atol=1e-6)  # same noise draws, same velocities
    assert len(dual.contrastive_losses) == 3 and all(loss > 0 for loss in dual.contrastive_losses)
    assert (dual.latents - plain.latents).abs().max() > 1e-4


def test_contrastive_step_is_the_loss_gradient(sd3):
    """One DDS iteration with contrast: the latent moves by lr * (DDS + w * dNCE/dz); dNCE/dz by finite differences."""
    pipe = SD3ContrastiveEditPipeline.from_pipe(sd3)
    image = _latents(4)
    options = {"method": "dds", "num_inference_steps": 1, "learning_rate": 1.0, "contrast": "source",
               "num_patches": 8, "patch_sizes": (1,)}  # fmt: skip
    with_term = _edit(pipe, image, contrast_weight=2.0, **options)
    without = _edit(pipe, image, contrast_weight=0.0, **options)
    step = without.latents - with_term.latents  # = lr * w * dNCE/dz
    direction = step / step.norm()
    assert step.norm() > 1e-6

    def loss_at(latents):  # the same iteration's loss at a moved latent: through the callback-free public path
        from editkit.flow_edit import FlowContrastFeatureRecorder

        return _dds_loss(pipe, latents, image, FlowContrastFeatureRecorder)

    eps = 1e-3
    slope = (loss_at(image + eps * direction) - loss_at(image - eps * direction)) / (2 * eps)
    assert slope == pytest.approx(float(step.norm()) / 2.0, rel=0.05)  # directional derivative = |grad| (w = 2, lr = 1)


def _dds_loss(pipe, z, x_src, recorder_class):
    """The source-anchored PatchNCE of iteration 0 at edited latent ``z``, recomputed with editkit.patchnce."""
    from editkit.attention import attach
    from editkit.patchnce import contrastive_loss

    generator = torch.Generator().manual_seed(0)
    patches = torch.Generator().manual_seed(0 ^ 0x5EED)  # the documented patch-location seed
    t = int(torch.randint(50, 950, (1,), generator=generator))
    noise = torch.randn(x_src.shape, generator=generator)
    sigma = t / 1000
    kwargs = {"do_classifier_free_guidance": False, "max_sequence_length": SEQ}
    src_e, _, src_p, _ = pipe.encode_prompt("a cat", None, None, **kwargs)
    tar_e, _, tar_p, _ = pipe.encode_prompt("a dog", None, None, **kwargs)
    recorder = recorder_class(("transformer_blocks",), role=None)
    with torch.no_grad(), attach(pipe.transformer, recorder):
        for branch, latent, embeds, pooled in (("source", x_src, src_e, src_p), ("target", z, tar_e, tar_p)):
            recorder.branch = branch
            pipe.transformer(hidden_states=(1 - sigma) * latent + sigma * noise, timestep=torch.tensor([float(t)]),
                             encoder_hidden_states=embeds, pooled_projections=pooled, return_dict=False)  # fmt: skip
    features = recorder.features
    return float(contrastive_loss(features["source"], features["target"], recorder.grids, direction="source",
                                  patch_sizes=(1,), num_patches=8, generator=patches))  # fmt: skip


# -- masks, seeds, memory savers, families --------------------------------------------------
def test_mask_keeps_the_latents_outside(sd3):
    pipe = SD3ContrastiveEditPipeline.from_pipe(sd3)
    image = _image()
    mask = torch.zeros(32, 32)
    mask[:, :16] = 1  # the left half: latent columns 0-1 of 4
    out = _edit(pipe, image, mask=mask, contrast="dual")
    plain = _edit(pipe, image, num_inference_steps=1, n_max=0, contrast=None)  # n_max 0: the source latent itself
    torch.testing.assert_close(out.latents[..., 2:], plain.latents[..., 2:])
    assert (out.latents[..., :2] - plain.latents[..., :2]).abs().max() > 1e-4


def test_same_seed_same_output_and_checkpointing_changes_nothing(sd3):
    pipe = SD3ContrastiveEditPipeline.from_pipe(sd3)
    image = _image()
    first = _edit(pipe, image, contrast="dual")
    again = _edit(pipe, image, contrast="dual")
    other = _edit(pipe, image, contrast="dual", generator=torch.Generator().manual_seed(1))
    checkpointed = _edit(pipe, image, contrast="dual", gradient_checkpointing=True)
    assert torch.equal(first.latents, again.latents)
    assert (first.latents - other.latents).abs().max() > 1e-4
    torch.testing.assert_close(checkpointed.latents, first.latents, rtol=1e-4, atol=1e-5)
    assert not pipe.transformer.is_gradient_checkpointing  # restored


@pytest.mark.parametrize("family", ["sd35", "flux"])
def test_other_families_edit_end_to_end_with_contrast(family, flux):
    pipe = (
        SD3ContrastiveEditPipeline.from_pipe(tiny_sd3_pipeline(seed=0, sd35=True))
        if family == "sd35"
        else FluxContrastiveEditPipeline.from_pipe(flux)
    )
    out = _edit(pipe, _image(), contrast="dual", output_type="np")
    assert out.images.shape == (1, 32, 32, 3) and len(out.contrastive_losses) == 3
    if family == "sd35":  # the image-only attn2 of block 0 is a contrast site too
        assert any(
            s.kind == "image_self" for s in __import__("editkit.attention").attention.attention_sites(pipe.transformer)
        )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"method": "sdedit"}, "method must be one of"),
        ({"n_max": 9}, "n_max"),
        ({"contrast": "both"}, "contrast must be one of"),
        ({"contrast_sites": "up_blocks"}, "contrast_sites"),
        ({"generator": [torch.Generator(), torch.Generator()]}, "one generator"),
        ({"guidance_scale": float("nan")}, "guidance_scale must be a finite number"),
        ({"mask": torch.zeros(32, 32)}, "not empty"),
    ],
)
def test_bad_input_is_refused_before_model_work(sd3, options, message):
    pipe = SD3ContrastiveEditPipeline.from_pipe(sd3)
    with pytest.raises(InputError, match=message):
        _edit(pipe, _image(), **options)


def test_flux_needs_multiples_of_16(flux):
    pipe = FluxContrastiveEditPipeline.from_pipe(flux)
    with pytest.raises(InputError, match="multiples of 16"):
        _edit(pipe, _image(side=40))
