"""Style transfer: AdaIN numerics, injection mechanics (recorded, not eyeballed), cache, IP-Adapter, inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import pipelines.style_transfer as style_module
from editkit.attention import AttentionController, QKVRecorder, attach
from editkit.conditioning import encode_text
from editkit.errors import InputError
from editkit.image import pil_to_tensor
from editkit.inversion import ddim_invert, decode_latents, encode_image_latents
from editkit.style import (
    StyleCache,
    StyleInjectionController,
    adain,
    channel_stats,
    content_aware_adain,
    default_style_sites,
)
from pipelines.style_transfer import StyleTransferPipeline

STEPS = 3


def _image(seed: int, width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def sd_style(sd15_pipe):
    pipe = StyleTransferPipeline.from_pipe(sd15_pipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sdxl_style(sdxl_pipe):
    pipe = StyleTransferPipeline.from_pipe(sdxl_pipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- AdaIN ----------------------------------------------------------------------------------------
def test_content_aware_adain_interpolates_channel_statistics():
    generator = torch.Generator().manual_seed(0)
    content = torch.randn(1, 4, 8, 12, generator=generator) * 2 + 1
    style = torch.randn(1, 4, 5, 5, generator=generator) * 0.5 - 3  # another size: stats are spatial
    mu_c, sigma_c = channel_stats(content)
    mu_s, sigma_s = channel_stats(style)
    for strength in (1.0, 0.6, 0.25):
        out = content_aware_adain(content, style, strength, eps=0.0)
        mu, sigma = channel_stats(out)
        torch.testing.assert_close(mu, strength * mu_s + (1 - strength) * mu_c)
        torch.testing.assert_close(sigma, strength * sigma_s + (1 - strength) * sigma_c)
    assert content_aware_adain(content, style, 0.0) is content  # keep the content's colours
    torch.testing.assert_close(adain(content, style), content_aware_adain(content, style, 1.0))
    with pytest.raises(ValueError):
        content_aware_adain(content, style, 1.5)


# -- injection mechanics --------------------------------------------------------------------------
class _PreInjectionProbe(AttentionController):
    """Outer controller: sees every self-attention call before the injector (q, k, v, output)."""

    def __init__(self):
        super().__init__()
        self.qkv, self.outputs = {}, {}

    def applies_to(self, site):
        return site.kind == "self"

    def on_qkv(self, site, query, key, value):
        self.qkv[(site.name, self.timestep)] = (query.clone(), key.clone(), value.clone())
        return query, key, value

    def on_output(self, site, hidden_states):
        self.outputs[(site.name, self.timestep)] = hidden_states.clone()
        return hidden_states


def _recording_injector(log):
    class RecordingInjector(StyleInjectionController):
        def on_qkv(self, site, query, key, value):
            out = super().on_qkv(site, query, key, value)
            if (site.name, self.timestep) in self.injected:
                log.setdefault("qkv", {})[(site.name, self.timestep)] = tuple(t.clone() for t in out)
            return out

        def softmax_scale(self, site, default):
            scale = super().softmax_scale(site, default)
            log.setdefault("scale", {})[(site.name, self.timestep)] = scale
            return scale

    return RecordingInjector


def _independent_recordings(pipe, image, sites, keep):
    """The image's q/k/v at ``sites`` per timestep, recorded with the shared layer's stock recorder."""
    latents = encode_image_latents(pipe.vae, pil_to_tensor(image))
    text = encode_text(pipe, [""], width=image.width, height=image.height)
    recorder = QKVRecorder(sites=list(sites), keep=keep)
    with attach(pipe.unet, recorder):
        result = ddim_invert(
            pipe.unet, pipe.scheduler, latents, text.prompt_embeds, num_inference_steps=STEPS,
            added_cond_kwargs=text.added_cond_kwargs, callback=lambda i, t, _: recorder.begin_step(i, t),
        )  # fmt: skip
    return recorder.records, result


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_injected_sites_use_recorded_style_kv_blended_query_and_tau_scale(family, sd_style, sdxl_style, monkeypatch):
    pipe = sd_style if family == "sd" else sdxl_style
    content, style = _image(0, 64, 48), _image(1, 40, 56)  # non-square, style of another size
    sites = default_style_sites(pipe.unet)
    gamma, tau = 0.75, 1.5
    log = {}
    monkeypatch.setattr(style_module, "StyleInjectionController", _recording_injector(log))
    probe = _PreInjectionProbe()
    out = pipe(content, style, num_inference_steps=STEPS, gamma=gamma, tau=tau, attention_controllers=[probe])
    style_records, _ = _independent_recordings(pipe, style, sites, ("key", "value"))
    content_records, result = _independent_recordings(pipe, content, sites, ("query",))

    timesteps = result.timesteps
    assert set(log["qkv"]) == {(s, t) for s in sites for t in timesteps}  # only the injected sites
    for (site, t), (query, key, value) in log["qkv"].items():
        torch.testing.assert_close(key, style_records[(site, t)]["key"].float(), rtol=0, atol=0)
        torch.testing.assert_close(value, style_records[(site, t)]["value"].float(), rtol=0, atol=0)
        own_query = probe.qkv[(site, t)][0]  # the generation's own query at this call
        expected = gamma * content_records[(site, t)]["query"].float() + (1 - gamma) * own_query
        torch.testing.assert_close(query, expected)
        assert log["scale"][(site, t)] == pytest.approx(tau / math.sqrt(query.shape[-1]))
    assert out.images[0].size == content.size

    # Non-injected self-attention sites are plain attention of their own q, k, v.
    module = pipe.unet.get_submodule
    others = {key for key in probe.outputs if key[0] not in sites and key[1] in timesteps}
    assert others
    for site, t in list(others)[:6]:
        query, key, value = probe.qkv[(site, t)]
        plain = F.scaled_dot_product_attention(query, key, value)
        plain = module(site).to_out[0](plain.transpose(1, 2).flatten(2))
        torch.testing.assert_close(probe.outputs[(site, t)], plain, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("timing", ["inversion_step", "inverted_latent"])
def test_feature_timing_records_the_named_unet_call(sd_style, timing):
    """inversion_step: the keys of step t are UNet(z_{t-1}, t)'s; inverted_latent: UNet(z_t, t)'s (StyleID)."""
    pipe, style = sd_style, _image(1, 32, 32)
    out = pipe(_image(0, 32, 32), style, num_inference_steps=STEPS, feature_timing=timing, output_type="latent")
    cache = out.style_caches[0]
    assert cache.extra["feature_timing"] == timing
    site = default_style_sites(pipe.unet)[0]
    latents = encode_image_latents(pipe.vae, pil_to_tensor(style))
    text = encode_text(pipe, [""], width=32, height=32)
    result = ddim_invert(pipe.unet, pipe.scheduler, latents, text.prompt_embeds, num_inference_steps=STEPS)
    ascending = list(reversed(result.timesteps))
    attn = pipe.unet.get_submodule(site)
    keys = []
    handle = attn.to_k.register_forward_hook(lambda _m, _a, output: keys.append(output))  # stock processors
    try:
        for index, t in enumerate(ascending):
            before = latents if index == 0 else result.latent_at(ascending[index - 1])
            sample = result.latent_at(t) if timing == "inverted_latent" else before
            pipe.unet(sample, t, encoder_hidden_states=text.prompt_embeds)
            expected = keys[-1].unflatten(-1, (attn.heads, -1)).transpose(1, 2)  # (1, heads, tokens, head_dim)
            torch.testing.assert_close(cache.feature(site, t, "key").float(), expected.half().float())
    finally:
        handle.remove()
    other = "inverted_latent" if timing == "inversion_step" else "inversion_step"
    with pytest.raises(InputError, match="feature_timing"):
        pipe(_image(0, 32, 32), style_cache=cache, num_inference_steps=STEPS, feature_timing=other)


def test_injection_window_and_site_selection(sd_style, monkeypatch):
    log = {}
    monkeypatch.setattr(style_module, "StyleInjectionController", _recording_injector(log))
    content = _image(0, 32, 32)
    out = pipe_out = sd_style(
        content, content, num_inference_steps=STEPS, injection_sites=["up_blocks.3.attentions.1"],
        injection_timesteps=(0, 500),
    )  # fmt: skip
    window = {t for t in out.content_cache.timesteps}
    assert window and all(t <= 500 for t in window)
    assert {site for site, _ in log["qkv"]} == {"up_blocks.3.attentions.1.transformer_blocks.0.attn1"}
    assert {t for _, t in log["qkv"]} == window
    assert len(pipe_out.style_caches[0].features) == len(window)  # only what is injected is stored


def test_gamma_one_tau_one_no_adain_self_style_equals_reconstruction_with_own_features(sd_style):
    """With gamma=1, tau=1, no AdaIN and style == content, every injected site sees exactly the content's
    own recorded (q, k, v): the output is the plain inversion-reconstruction path in which those layers
    replay the inversion's features; here that path is rebuilt with diffusers' DDIMScheduler."""
    from diffusers import DDIMScheduler

    pipe, content = sd_style, _image(2, 48, 32)
    out = pipe(content, content, num_inference_steps=STEPS, gamma=1.0, tau=1.0, adain_strength=None, output_type="pt")
    sites = default_style_sites(pipe.unet)
    records, result = _independent_recordings(pipe, content, sites, ("query", "key", "value"))

    class Replay(AttentionController):
        def applies_to(self, site):
            return site.name in sites

        def on_qkv(self, site, query, key, value):
            rec = records[(site.name, self.timestep)]
            return rec["query"].float(), rec["key"].float(), rec["value"].float()

    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    text = encode_text(pipe, [""])
    latents, replay = result.final, Replay()
    with attach(pipe.unet, replay), torch.no_grad():
        for index, t in enumerate(scheduler.timesteps):
            replay.begin_step(index, t)
            eps = pipe.unet(latents, t, encoder_hidden_states=text.prompt_embeds).sample
            latents = scheduler.step(eps, t, latents).prev_sample
    reference = (decode_latents(pipe.vae, latents) + 1) / 2
    torch.testing.assert_close(out.images, reference, atol=1e-4, rtol=0)
    plain = pipe(content, content, num_inference_steps=STEPS, gamma=0.5, tau=1.5, output_type="pt").images
    assert (plain - out.images).abs().max() > 1e-3  # the knobs matter


def test_mask_limits_injection_to_query_tokens_inside(sd_style):
    content, style = _image(3, 32, 32), _image(4, 32, 32)
    mask = torch.zeros(32, 32)
    mask[:, :16] = 1
    full = sd_style(content, style, num_inference_steps=STEPS, output_type="latent", adain_strength=None)
    none = sd_style(
        content, style, num_inference_steps=STEPS, output_type="latent", adain_strength=None, mask=torch.zeros(32, 32)
    )
    masked = sd_style(content, style, num_inference_steps=STEPS, output_type="latent", adain_strength=None, mask=mask)
    everywhere = sd_style(
        content, style, num_inference_steps=STEPS, output_type="latent", adain_strength=None, mask=torch.ones(32, 32)
    )
    torch.testing.assert_close(everywhere.images, full.images, atol=1e-4, rtol=0)  # tau folded into the query
    # an empty mask injects nothing: the reconstruction without injection
    injector_free = sd_style(
        content,
        style,
        num_inference_steps=STEPS,
        output_type="latent",
        adain_strength=None,
        injection_timesteps=(-2, -1),
    )
    torch.testing.assert_close(none.images, injector_free.images, atol=1e-5, rtol=0)
    assert not torch.allclose(masked.images, full.images) and not torch.allclose(masked.images, none.images)


# -- cache ----------------------------------------------------------------------------------------
def test_style_cache_round_trip_and_refusals(sd_style, tmp_path, sd15_dir):
    content, style = _image(5, 40, 32), _image(6, 32, 48)
    first = sd_style(content, style, num_inference_steps=STEPS, output_type="pt")
    cache = first.style_caches[0]
    sites = default_style_sites(sd_style.unet)
    assert {name for rec in cache.features.values() for name in rec} == {"key", "value"}
    assert {name for rec in first.content_cache.features.values() for name in rec} == {"query"}
    assert all(t.dtype == torch.float16 for rec in cache.features.values() for t in rec.values())
    assert len(cache.features) == len(sites) * STEPS
    path = cache.save(tmp_path / "style.safetensors")
    with pytest.raises(InputError, match="exists"):
        cache.save(path)
    loaded = StyleCache.load(path)
    again = sd_style(content, style_cache=loaded, num_inference_steps=STEPS, output_type="pt")
    assert torch.equal(again.images, first.images)
    reused = sd_style(_image(7, 32, 32), style_cache=loaded, num_inference_steps=STEPS, output_type="pt")
    assert reused.images.shape[-2:] == (32, 32)

    other = StyleTransferPipeline.from_pretrained(sd15_dir)  # same weights: accepted
    other.set_progress_bar_config(disable=True)
    other.unet.conv_in.weight.data += 0.01  # another model
    with pytest.raises(InputError, match="another model"):
        other(content, style_cache=loaded, num_inference_steps=STEPS)
    with pytest.raises(InputError, match="lacks timesteps"):
        sd_style(content, style_cache=loaded, num_inference_steps=STEPS + 1)
    with pytest.raises(InputError, match="32x48 px"):
        loaded.validate(kind="style", model=loaded.model, sites=sites, timesteps=loaded.timesteps, size=(64, 64))
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="not a readable"):
        StyleCache.load(tmp_path / "bad.safetensors")


# -- IP-Adapter (dual-feature cross-attention) -----------------------------------------------------
def _with_tiny_ip_adapters(base=None, cross_attention_dim: int = 16):
    """Two tiny IP-Adapters (content, style) on every attn2 of ``base`` (a tiny SD 1.5 pipeline by default)."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from editkit.testing import tiny_sd15_pipeline

    base = base if base is not None else tiny_sd15_pipeline(seed=0)
    torch.manual_seed(1)
    unet = base.unet
    processors = dict(unet.attn_processors)
    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            processors[f"{name}.processor"] = IPAdapterAttnProcessor2_0(
                module.to_q.out_features, cross_attention_dim, num_tokens=(4, 4), scale=[1.0, 1.0]
            )
            for layer in (*processors[f"{name}.processor"].to_k_ip, *processors[f"{name}.processor"].to_v_ip):
                torch.nn.init.normal_(layer.weight, std=0.5)
    unet.set_attn_processor(dict(processors))
    projections = [ImageProjection(8, cross_attention_dim, 4), ImageProjection(8, cross_attention_dim, 4)]
    unet.encoder_hid_proj = MultiIPAdapterImageProjection(projections)
    unet.register_to_config(encoder_hid_dim_type="ip_image_proj")
    vision = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
        patch_size=8, projection_dim=8,
    )  # fmt: skip
    extractor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pipe = StyleTransferPipeline.from_pipe(
        base, image_encoder=CLIPVisionModelWithProjection(vision).eval(), feature_extractor=extractor
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


class _ScaleSpy(AttentionController):
    """An extra controller on every cross-attention site (as SoftREPA tokens are) that logs IP-Adapter scales."""

    def __init__(self, adapters: dict) -> None:
        super().__init__()
        self.adapters, self.seen = adapters, []

    def applies_to(self, site) -> bool:
        return site.is_cross

    def begin_step(self, index, timestep):
        super().begin_step(index, timestep)
        self.seen.append({name: list(adapter.scale) for name, adapter in self.adapters.items()})


def _nonzero_sites(scales: dict, adapter: int) -> set[str]:
    return {name.removesuffix(".processor") for name, values in scales.items() if values[adapter] != 0}


def test_sdxl_ip_adapter_scales_reach_attensts_blocks_only():
    from editkit.testing import tiny_sdxl_pipeline

    pipe = _with_tiny_ip_adapters(tiny_sdxl_pipeline(seed=0), cross_attention_dim=32)
    adapters = dict(pipe.unet.attn_processors)
    adapters = {name: p for name, p in adapters.items() if hasattr(p, "to_k_ip")}
    spy = _ScaleSpy(adapters)
    pipe(_image(8, 32, 32), _image(9, 32, 32), num_inference_steps=STEPS, output_type="latent",
         attention_controllers=[spy])  # fmt: skip
    generation = spy.seen[-1]
    blocks = [0, 1]  # the tiny SDXL UNet's transformer blocks per attention in these blocks
    # AttenST: content in InstantStyle's layout block, style in up_blocks.0.attentions.1 and .2 (release: [0, s, s])
    content = {f"down_blocks.2.attentions.1.transformer_blocks.{b}.attn2" for b in blocks}
    style = {f"up_blocks.0.attentions.{a}.transformer_blocks.{b}.attn2" for a in (1, 2) for b in blocks}
    assert _nonzero_sites(generation, 0) == content and _nonzero_sites(generation, 1) == style
    assert {values[1] for name, values in generation.items() if name.removesuffix(".processor") in style} == {1.2}


def test_ip_adapter_scales_reach_adapters_under_extra_controllers():
    pipe = _with_tiny_ip_adapters()
    adapters = {name: p for name, p in pipe.unet.attn_processors.items() if hasattr(p, "to_k_ip")}
    spy = _ScaleSpy(adapters)
    pipe(_image(8, 32, 32), _image(9, 32, 32), num_inference_steps=STEPS, output_type="latent",
         attention_controllers=[spy])  # fmt: skip
    inversion, generation = spy.seen[: 2 * STEPS], spy.seen[2 * STEPS :]
    assert len(generation) == STEPS
    assert all(values == [0.0, 0.0] for step in inversion for values in step.values())  # no image prompt
    content = {f"down_blocks.2.attentions.{a}.transformer_blocks.0.attn2" for a in (0, 1)}
    style = {f"up_blocks.1.attentions.{a}.transformer_blocks.0.attn2" for a in (0, 1, 2)}
    for step in generation:
        assert _nonzero_sites(step, 0) == content and _nonzero_sites(step, 1) == style
    assert all(list(adapter.scale) == [1.0, 1.0] for adapter in adapters.values())  # restored after the run


def test_dual_ip_adapter_features_reach_their_blocks_next_to_injection():
    pipe = _with_tiny_ip_adapters()
    processors = pipe.unet.attn_processors
    content_site = next(k for k in processors if k.startswith("down_blocks.2") and "attn2" in k)
    style_site = next(k for k in processors if k.startswith("up_blocks.1") and "attn2" in k)
    seen = []

    def watch(p, index, t, kwargs):
        seen.append((list(processors[content_site].scale), list(processors[style_site].scale)))
        return kwargs

    content, style = _image(8, 32, 32), _image(9, 32, 32)
    with_ip = pipe(content, style, num_inference_steps=STEPS, output_type="pt", callback_on_step_end=watch)
    assert seen[0] == ([1.2, 0.0], [0.0, 1.2])  # content in the layout block, style in the style block
    assert processors[content_site].scale == [1.0, 1.0]  # restored
    without = pipe(content, style, num_inference_steps=STEPS, output_type="pt", ip_adapter_scale=0.0)
    assert (with_ip.images - without.images).abs().max() > 1e-4
    cache = with_ip.style_caches[0]
    assert cache.image_embeds is not None and cache.image_embeds.shape == (1, 1, 8)
    reused = pipe(content, style_cache=cache, num_inference_steps=STEPS, output_type="pt")
    assert torch.equal(reused.images, with_ip.images)


# -- loading and bad input -----------------------------------------------------------------------
def test_from_pretrained_sd_and_sdxl_folders(sd15_dir, sdxl_dir):
    sd = StyleTransferPipeline.from_pretrained(sd15_dir)
    xl = StyleTransferPipeline.from_pretrained(sdxl_dir)
    assert sd.text_encoder_2 is None and xl.text_encoder_2 is not None
    assert default_style_sites(sd.unet)[0].startswith("up_blocks.2.attentions.0")
    assert all(
        s.startswith(("up_blocks.1.attentions.1", "up_blocks.1.attentions.2")) for s in default_style_sites(xl.unet)
    )


def test_default_sites_are_the_last_two_decoder_levels_also_on_a_three_level_unet(sd_style):
    from diffusers import UNet2DConditionModel

    sd15 = default_style_sites(sd_style.unet)  # StyleID's layers 7-12: up_blocks.2 and .3 on SD 1.x
    assert {s.split(".attentions")[0] for s in sd15} == {"up_blocks.2", "up_blocks.3"} and len(sd15) == 6
    three_levels = UNet2DConditionModel(  # the shapes model's layout: attention at two decoder levels
        sample_size=8, block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4,
        attention_head_dim=2, cross_attention_dim=16,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )  # fmt: skip
    expected = {f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn1" for b in (1, 2) for a in (0, 1)}
    assert set(default_style_sites(three_levels)) == expected  # not a lone up_blocks.2 (its only full-res level)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"gamma": 1.5}, "gamma"),
        ({"tau": 0.0}, "tau"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"adain_strength": -0.1}, "adain_strength"),
        ({"resample_steps": -1}, "resample_steps"),
        ({"style_image": []}, "style"),
        ({"injection_sites": ["up_blocks.9"]}, "matches no"),
        ({"output_type": "jpg"}, "output_type"),
    ],
)
def test_bad_arguments_raise_short_input_errors(sd_style, kwargs, message):
    arguments = {"style_image": _image(1, 16, 16), "num_inference_steps": 2, **kwargs}
    with pytest.raises(InputError, match=message):
        sd_style(_image(0, 16, 16), **arguments)
