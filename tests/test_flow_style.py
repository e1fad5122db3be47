"""Issue 23, style transfer on MM-DiT (SD3 / SD3.5 / FLUX.1): faithfulness against hand-written references,
cost, the cache, bad input. Tiny offline pipelines; references use the stock diffusers transformer,
scheduler and text encoding, never editkit's own loop."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from PIL import Image

from editkit.attention import AttentionController, attach
from editkit.errors import InputError
from editkit.style import StyleCache
from pipelines.flow_style_transfer import FluxStyleTransferPipeline, SD3StyleTransferPipeline

STEPS = 3


def _image(seed: int, size: int = 32) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def sd3(sd3_pipe):
    pipe = SD3StyleTransferPipeline.from_pipe(sd3_pipe, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd35(sd35_pipe):
    pipe = SD3StyleTransferPipeline.from_pipe(sd35_pipe, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def flux(flux_pipe):
    pipe = FluxStyleTransferPipeline.from_pipe(flux_pipe, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _reference_regeneration(base: StableDiffusion3Pipeline, image: Image.Image, steps: int) -> torch.Tensor:
    """Euler inversion then FlowMatchEulerDiscreteScheduler sampling, by hand with the stock pipeline parts."""
    vae, transformer = base.vae, base.transformer
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    x = (vae.encode(pixels).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
    embeds, _, pooled, _ = base.encode_prompt("", None, None, do_classifier_free_guidance=False)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(base.scheduler.config)
    scheduler.set_timesteps(steps)
    sigmas, timesteps = scheduler.sigmas.tolist(), [*scheduler.timesteps.tolist(), 0.0]

    def velocity(latents, t):
        return transformer(latents, encoder_hidden_states=embeds, pooled_projections=pooled,
                           timestep=torch.tensor([t]), return_dict=False)[0]  # fmt: skip

    for i in reversed(range(steps)):  # sigma_{i+1} -> sigma_i, velocity at the step's start
        x = x + (sigmas[i] - sigmas[i + 1]) * velocity(x, timesteps[i + 1])
    for t in scheduler.timesteps:
        x = scheduler.step(velocity(x, float(t)), t, x, return_dict=False)[0]
    return x


@torch.no_grad()
def test_without_injection_it_is_plain_inversion_and_regeneration(sd3, sd3_pipe):
    content = _image(0)
    out = sd3(content, [_image(1)], num_inference_steps=STEPS, injection_sigmas=(0.0, 0.0), adain_strength=None,
              output_type="latent")  # fmt: skip
    reference = _reference_regeneration(sd3_pipe, content, STEPS)
    torch.testing.assert_close(out.images, reference, rtol=1e-4, atol=1e-4)


def _reference_cfg_regeneration(base, image: Image.Image, steps: int, prompt: str, negative: str, scale: float):
    """Euler inversion under ``prompt`` (guidance 1), then Euler sampling with SD3's CFG
    (``v_u + s (v_c - v_u)``, as StableDiffusion3Pipeline), by hand with the stock pipeline parts."""
    vae, transformer = base.vae, base.transformer
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    x = (vae.encode(pixels).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
    embeds, negative_embeds, pooled, negative_pooled = base.encode_prompt(
        prompt, None, None, negative_prompt=negative, do_classifier_free_guidance=True
    )
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(base.scheduler.config)
    scheduler.set_timesteps(steps)
    sigmas, timesteps = scheduler.sigmas.tolist(), [*scheduler.timesteps.tolist(), 0.0]

    def velocity(latents, t, text, text_pooled):
        return transformer(latents, encoder_hidden_states=text, pooled_projections=text_pooled,
                           timestep=torch.tensor([t] * len(latents)), return_dict=False)[0]  # fmt: skip

    for i in reversed(range(steps)):
        x = x + (sigmas[i] - sigmas[i + 1]) * velocity(x, timesteps[i + 1], embeds, pooled)
    for t in scheduler.timesteps:
        both = velocity(torch.cat([x, x]), float(t), torch.cat([negative_embeds, embeds]),
                        torch.cat([negative_pooled, pooled]))  # fmt: skip
        uncond, cond = both.chunk(2)
        x = scheduler.step(uncond + scale * (cond - uncond), t, x, return_dict=False)[0]
    return x


@torch.no_grad()
def test_sd3_classifier_free_guidance_matches_the_stock_pipeline_arithmetic(sd3, sd3_pipe):
    """guidance_scale > 1 on SD3: CFG in generation exactly as StableDiffusion3Pipeline (inversions at guidance 1);
    1.0 is the single-pass run; a negative prompt changes the CFG run only."""
    content = _image(0)
    plain = {"injection_sigmas": (0.0, 0.0), "adain_strength": None, "output_type": "latent", "prompt": "a"}
    out = sd3(content, [_image(1)], num_inference_steps=STEPS, guidance_scale=4.0, negative_prompt="b", **plain)
    reference = _reference_cfg_regeneration(sd3_pipe, content, STEPS, "a", "b", 4.0)
    torch.testing.assert_close(out.images, reference, rtol=1e-4, atol=1e-4)
    single = sd3(content, [_image(1)], num_inference_steps=STEPS, guidance_scale=1.0, negative_prompt="b", **plain)
    unguided = sd3(content, [_image(1)], num_inference_steps=STEPS, **plain)
    torch.testing.assert_close(single.images, unguided.images, rtol=0, atol=0)
    assert not torch.allclose(out.images, single.images, atol=1e-3)


@torch.no_grad()
def test_sd3_classifier_free_guidance_injects_both_rows(sd3, monkeypatch):
    """With CFG the step's batch is [uncond, cond] and the style's image keys replace the image keys of both."""
    import pipelines.flow_style_transfer as module
    from editkit.flow_style import FlowStyleInjectionController, timestep_key

    site = "transformer_blocks.0.attn"
    seen = []

    class Recording(FlowStyleInjectionController):  # the injection's output: the kernel's keys
        def on_qkv(self, s, query, key, value):
            query, key, value = super().on_qkv(s, query, key, value)
            if s.name == site:
                seen.append((self._key, key[:, :, s.layout.image].clone()))
            return query, key, value

    monkeypatch.setattr(module, "FlowStyleInjectionController", Recording)
    out = sd3(_image(0), [_image(1)], num_inference_steps=STEPS, guidance_scale=3.0, injection_sites=[site],
              output_type="latent")  # fmt: skip
    style = out.style_caches[0]
    assert len(seen) == STEPS and all(keys.shape[0] == 2 for _, keys in seen)
    injected = [(key, keys) for key, keys in seen if key is not None]
    assert [key for key, _ in injected] == [timestep_key(t) for t in _timesteps(sd3, STEPS)[1:]]
    for key, keys in injected:  # every step but the first (no inversion call at t_0), both rows
        expected = style.features[(site, key)]["key"][0].to(keys.dtype) * 1.5  # tau
        for row in range(2):
            torch.testing.assert_close(keys[row], expected, rtol=1e-5, atol=1e-5)


def _timesteps(pipe, steps: int) -> list[float]:
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    return scheduler.timesteps.tolist()


@pytest.mark.parametrize("scale", [-1.0, float("nan"), float("inf")])
def test_sd3_guidance_scale_must_be_finite_and_not_negative(sd3, scale):
    with pytest.raises(InputError, match="guidance_scale must be a finite number >= 0"):
        sd3(_image(0), [_image(1)], num_inference_steps=STEPS, guidance_scale=scale, output_type="latent")


def test_negative_prompt_is_refused_on_flux(flux):
    with pytest.raises(InputError, match=r"FLUX\.1 runs without classifier-free guidance"):
        flux(_image(0), [_image(1)], num_inference_steps=STEPS, negative_prompt="blurry", output_type="latent")


class _Replay(AttentionController):
    """Records a call's q/k/v at ``site`` (first call), for the hand-written reference."""

    def __init__(self, site: str) -> None:
        super().__init__()
        self.site, self.qkv, self.layout = site, None, None

    def applies_to(self, site):
        return site.name == self.site

    def on_qkv(self, site, query, key, value):
        self.qkv, self.layout = (query.clone(), key.clone(), value.clone()), site.layout
        return query, key, value


def _cache(kind: str, site: str, step: int, **tensors) -> StyleCache:
    return StyleCache(kind, {(site, step): tensors}, torch.zeros(1, 4, 4, 4), "x", (32, 32), 1, 0, (site,), (step,))


def _transformer_call(pipe, latents, t):
    from editkit.backbones import backbone_for

    backbone = backbone_for(pipe)
    return backbone, (lambda: backbone.denoise(latents, torch.tensor(t), backbone.encode_text("a")))


@torch.no_grad()
@pytest.mark.parametrize("gamma, tau", [(0.75, 1.5), (0.0, 1.0)])
def test_injected_joint_attention_matches_the_formula(sd3, gamma, tau):
    """q_img = gamma q_c + (1 - gamma) q_img, image K/V = the style's, style logits x tau, text as is: by hand."""
    from editkit.flow_style import FlowStyleInjectionController, timestep_key

    site = "transformer_blocks.0.attn"
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    _, call = _transformer_call(sd3, latents, 500.0)
    replay = _Replay(site)
    with attach(sd3.transformer, replay):
        call()
    query, key, value = replay.qkv
    image = replay.layout.image
    heads, dim = query.shape[1], query.shape[-1]
    style_k, style_v = torch.randn(1, heads, 9, dim), torch.randn(1, heads, 9, dim)  # another size: 9 tokens
    content_q = torch.randn(1, heads, image.stop - image.start, dim)
    k = timestep_key(500.0)
    controller = FlowStyleInjectionController(
        [site], _cache("style", site, k, key=style_k, value=style_v), _cache("content", site, k, query=content_q),
        gamma=gamma, tau=tau, keys=[k],
    )  # fmt: skip
    # reference: the joint attention computed by hand from the recorded projections
    q = torch.cat([gamma * content_q + (1 - gamma) * query[:, :, image], query[:, :, image.stop :]], dim=2)
    keys = torch.cat([style_k, key[:, :, image.stop :]], dim=2)
    values = torch.cat([style_v, value[:, :, image.stop :]], dim=2)
    logits = q @ keys.transpose(-1, -2) / math.sqrt(dim)
    logits[..., :9] *= tau
    expected = logits.softmax(-1) @ values
    seen = {}

    class Probe(AttentionController):  # runs after the injection: the kernel's inputs
        def applies_to(self, s):
            return s.name == site

        def on_qkv(self, s, q_, k_, v_):
            seen["out"] = torch.nn.functional.scaled_dot_product_attention(
                q_, k_, v_, scale=controller.softmax_scale(s, None)
            )
            return q_, k_, v_

    with attach(sd3.transformer, [controller, Probe()]):
        controller.begin_step(0, 500.0)
        call()
    torch.testing.assert_close(seen["out"], expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("fixture, site", [
    ("sd3", "transformer_blocks.0.attn"), ("sd35", "transformer_blocks.0.attn2"),
    ("flux", "transformer_blocks.0.attn"), ("flux", "single_transformer_blocks.0.attn"),
])  # fmt: skip
@pytest.mark.parametrize("masked", [False, True])
def test_injecting_a_calls_own_features_changes_nothing(request, fixture, site, masked):
    """gamma = 1, tau = 1 with the same call's recorded image q/k/v reproduces the plain call (layout,
    single-stream text length, rotary order); masked: all-ones inside, and all-zeros is plain attention."""
    from editkit.flow_style import FlowStyleFeatureRecorder, FlowStyleInjectionController, timestep_key

    pipe = request.getfixturevalue(fixture)
    latents = torch.randn(1, pipe.transformer.config.in_channels // (4 if fixture == "flux" else 1), 4, 4)
    _, call = _transformer_call(pipe, latents, 700.0)
    k = timestep_key(700.0)
    recorder = FlowStyleFeatureRecorder([site], ("query", "key", "value"), [k], dtype=torch.float32)
    with attach(pipe.transformer, recorder):
        recorder.begin_step(0, 700.0)
        plain = call()
    features = recorder.features
    style = StyleCache("style", features, torch.zeros(1, 4, 4, 4), "x", (32, 32), 1, 0, (site,), (k,))
    for fill in [1.0, 0.0] if masked else [None]:
        mask = None if fill is None else torch.full((1, 1, 4, 4), fill)
        controller = FlowStyleInjectionController([site], style, style, gamma=1.0, tau=1.0, keys=[k], mask=mask)
        with attach(pipe.transformer, controller):
            controller.begin_step(0, 700.0)
            injected = call()
        assert controller.injected == {(site, k)}
        torch.testing.assert_close(injected, plain, rtol=1e-4, atol=1e-5)
    # a different style does change the output
    changed = {key: {n: torch.randn_like(t) for n, t in rec.items()} for key, rec in features.items()}
    controller = FlowStyleInjectionController(
        [site], StyleCache("style", changed, torch.zeros(1, 4, 4, 4), "x", (32, 32), 1, 0, (site,), (k,)),
        gamma=0.0, tau=1.0, keys=[k],
    )  # fmt: skip
    with attach(pipe.transformer, controller):
        controller.begin_step(0, 700.0)
        assert not torch.allclose(call(), plain, atol=1e-4)


def _count_calls(pipe):
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda *args: calls.append(1))
    return calls, handle


@torch.no_grad()
@pytest.mark.parametrize("fixture", ["sd3", "sd35", "flux"])
def test_cost_is_exactly_the_floor_and_the_cache_round_trips(request, tmp_path, fixture):
    pipe = request.getfixturevalue(fixture)
    content, style = _image(0), _image(1)
    calls, handle = _count_calls(pipe)
    try:
        out = pipe(content, [style], num_inference_steps=STEPS, output_type="latent")
        assert len(calls) == 3 * STEPS  # style inversion + content inversion + generation
        cache = out.style_caches[0]
        assert cache.family == ("flux" if fixture == "flux" else "sd3") and cache.nbytes() > 0
        assert {t.dtype for rec in cache.features.values() for t in rec.values()} == {torch.float16}
        assert len(cache.timesteps) == STEPS - 1  # t_0 has no inversion call
        path = cache.save(tmp_path / "style.safetensors")
        calls.clear()
        again = pipe(content, style_cache=[StyleCache.load(path)], num_inference_steps=STEPS, output_type="latent",
                     offload_features=True)  # fmt: skip
        assert len(calls) == 2 * STEPS
        torch.testing.assert_close(again.images, out.images, rtol=1e-5, atol=1e-5)
        calls.clear()
        pipe(content, style_cache=[cache], content_cache=out.content_cache, num_inference_steps=STEPS,
             output_type="latent")  # fmt: skip
        assert len(calls) == STEPS
    finally:
        handle.remove()
    with pytest.raises(InputError, match=r"schedule|lacks timesteps"):
        pipe(content, style_cache=[cache], num_inference_steps=STEPS + 1, output_type="latent")


@torch.no_grad()
@pytest.mark.parametrize("fixture", ["sd3", "flux"])
def test_a_batch_of_contents_equals_one_call_per_content(request, fixture):
    """Two contents x two styles: outputs ordered by content then style, each equal to its own single call;
    the styles inverted once (one text), each content once: 2N + 2N + 4N transformer calls."""
    pipe = request.getfixturevalue(fixture)
    contents, styles = [_image(0), _image(2)], [_image(1), _image(3)]
    calls, handle = _count_calls(pipe)
    try:
        out = pipe(contents, styles, num_inference_steps=STEPS, output_type="latent")
        assert len(calls) == (2 + 2 + 4) * STEPS
    finally:
        handle.remove()
    assert out.images.shape[0] == 4 and len(out.content_caches) == 2 and len(out.style_caches) == 2
    assert out.content_cache is out.content_caches[0]
    for i, content in enumerate(contents):
        single = pipe(content, styles, num_inference_steps=STEPS, output_type="latent").images
        torch.testing.assert_close(out.images[2 * i : 2 * i + 2], single, rtol=1e-5, atol=1e-5)
    again = pipe(contents, style_cache=out.style_caches, content_cache=out.content_caches,
                 num_inference_steps=STEPS, output_type="latent")  # fmt: skip
    torch.testing.assert_close(again.images, out.images, rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError, match="got 1 content caches for 2 content images"):
        pipe(contents, style_cache=out.style_caches, content_cache=out.content_caches[:1],
             num_inference_steps=STEPS, output_type="latent")  # fmt: skip


@torch.no_grad()
def test_a_prompt_per_content_inverts_the_style_per_prompt(sd3):
    contents, style = [_image(0), _image(2)], _image(1)
    calls, handle = _count_calls(sd3)
    try:
        out = sd3(contents, [style], prompt=["a red circle", "a blue square"], num_inference_steps=STEPS,
                  output_type="latent")  # fmt: skip
        assert len(calls) == (2 + 2 + 2) * STEPS  # each content, the style per prompt, two generations
    finally:
        handle.remove()
    second = sd3(contents[1], [style], prompt="a blue square", num_inference_steps=STEPS, output_type="latent")
    torch.testing.assert_close(out.images[1:], second.images, rtol=1e-5, atol=1e-5)
    embeds, _, pooled, _ = sd3.encode_prompt(["a red circle", "a blue square"], None, None,
                                             do_classifier_free_guidance=False)  # fmt: skip
    given = sd3(contents, [style], prompt_embeds=embeds, pooled_prompt_embeds=pooled, num_inference_steps=STEPS,
                output_type="latent")  # fmt: skip
    torch.testing.assert_close(given.images, out.images, rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError, match=r"got prompt: 3, .*content_image: 2"):
        sd3(contents, [style], prompt=["a", "b", "c"], num_inference_steps=STEPS, output_type="latent")
    with pytest.raises(InputError, match="prompt or prompt_embeds, not both"):
        sd3(contents, [style], prompt="a", prompt_embeds=embeds, pooled_prompt_embeds=pooled,
            num_inference_steps=STEPS, output_type="latent")  # fmt: skip


@torch.no_grad()
def test_one_embedding_row_beside_per_item_pooled_rows_gives_each_item_its_own_text(sd3):
    """prompt_embeds of one row, pooled_prompt_embeds of one per content: item i uses pooled row i."""
    contents, style = [_image(0), _image(2)], _image(1)
    embeds, _, pooled, _ = sd3.encode_prompt(["a red circle", "a blue square"], None, None,
                                             do_classifier_free_guidance=False)  # fmt: skip
    out = sd3(contents, [style], prompt_embeds=embeds[:1], pooled_prompt_embeds=pooled, num_inference_steps=STEPS,
              output_type="latent")  # fmt: skip
    second = sd3(contents[1], [style], prompt_embeds=embeds[:1], pooled_prompt_embeds=pooled[1:],
                 num_inference_steps=STEPS, output_type="latent")  # fmt: skip
    torch.testing.assert_close(out.images[1:], second.images, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_style_moves_the_output_and_knobs_act(sd3):
    content, style = _image(0), _image(1)
    plain = sd3(content, [style], num_inference_steps=STEPS, injection_sigmas=(0.0, 0.0), adain_strength=None,
                output_type="latent").images  # fmt: skip
    styled = sd3(content, [style], num_inference_steps=STEPS, adain_strength=None, output_type="latent").images
    kept = sd3(content, [style], num_inference_steps=STEPS, adain_strength=None, gamma=1.0, output_type="latent").images
    assert not torch.allclose(plain, styled, atol=1e-4)
    assert not torch.allclose(kept, styled, atol=1e-5)  # gamma acts


def test_caches_of_another_family_or_method_are_refused(sd3, flux):
    content, style = _image(0), _image(1)
    sd3_cache = sd3(content, [style], num_inference_steps=STEPS, output_type="latent").style_caches[0]
    with pytest.raises(InputError, match=r"made on a sd3 model .* this is a flux model"):
        flux(content, style_cache=[sd3_cache], num_inference_steps=STEPS, output_type="latent")
    unet_cache = copy.copy(sd3_cache)
    unet_cache.family = "sd"
    with pytest.raises(InputError, match="made on a sd model"):
        sd3(content, style_cache=[unet_cache], num_inference_steps=STEPS, output_type="latent")


@pytest.mark.parametrize("option, value", [("resample_steps", 2), ("feature_timing", "inverted_latent")])
def test_unet_only_options_are_refused_before_model_work(sd3, option, value):
    from editkit.tasks import StylizeInputs, stylize
    from editkit.tasks.options import OptionError
    from editkit.tasks.stylize import StylizeOptions

    calls, handle = _count_calls(sd3)
    try:
        with pytest.raises(OptionError, match=rf"{option} .*: a UNet .* sd3 \(MM-DiT\)"):
            stylize.run(sd3, StylizeInputs(_image(0), [_image(1)]), StylizeOptions(**{option: value}))
        with pytest.raises(InputError, match=r"injection_sites: 'up_blocks.1.attentions.0' is a UNet .* sd3"):
            options = StylizeOptions(injection_sites=("up_blocks.1.attentions.0",))
            stylize.run(sd3, StylizeInputs(_image(0), [_image(1)]), options)
    finally:
        handle.remove()
    assert not calls


def test_task_layer_runs_flux_at_its_packing_multiple(flux):
    from editkit.tasks import StylizeInputs, stylize
    from editkit.tasks.stylize import StylizeOptions

    options = StylizeOptions(num_inference_steps=2, size=40)
    result = stylize.run(flux, StylizeInputs(_image(0, 40), [_image(1)]), options)
    assert result.images[0].size == (48, 48)  # 40 px rounded to FLUX's 16 px multiple
    assert result.records[0]["used"]["family"] == "flux" and result.records[0]["used"]["dtype"] == "float32"


def test_unset_steps_are_the_familys_not_the_unet_defaults(flux):
    """StylizeOptions() on FLUX.1-dev: 28 steps (its text-to-image default), not StyleID's 50 DDIM steps."""
    from editkit.tasks import StylizeInputs, stylize
    from editkit.tasks.stylize import UNET_STEPS, StylizeOptions

    calls = []
    handle = flux.transformer.register_forward_hook(lambda *_: calls.append(1))
    try:
        result = stylize.run(flux, StylizeInputs(_image(0, 32), [_image(1)]), StylizeOptions(size=32))
    finally:
        handle.remove()
    assert result.records[0]["used"]["num_inference_steps"] == 28 != UNET_STEPS
    assert len(calls) == 3 * 28  # style inversion + content inversion + generation, 28 steps each


def test_cli_end_to_end_on_a_tiny_sd3_folder(tmp_path, sd3_dir):
    from editkit.cli import main

    content, style = tmp_path / "c.png", tmp_path / "s.png"
    _image(0).save(content)
    _image(1).save(style)
    out, cache = tmp_path / "out.png", tmp_path / "style.safetensors"
    argv = ["stylize", content, style, "-o", out, "--model", sd3_dir, "--steps", "2", "--size", "32",
            "--device", "cpu", "--save-style-cache", cache]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    assert Image.open(out).size == (32, 32) and StyleCache.load(cache).family == "sd3"
    again = tmp_path / "again.png"
    argv = ["stylize", content, "--style-cache", cache, "-o", again, "--model", sd3_dir, "--steps", "2", "--size",
            "32", "--device", "cpu"]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    assert np.abs(np.asarray(Image.open(again), float) - np.asarray(Image.open(out), float)).max() <= 1


def test_app_stylize_handler_on_a_tiny_sd3_folder(tmp_path, sd3_dir):
    import json

    from editkit.app.handlers import Handlers
    from editkit.app.models import ModelManager

    content, style = tmp_path / "c.png", tmp_path / "s.png"
    _image(0).save(content)
    _image(1).save(style)
    handlers = Handlers(ModelManager(sd3_dir, device="cpu"), tmp_path / "out", upload_folders=[tmp_path])
    image, path, message = handlers.stylize({"path": str(content)}, {"path": str(style)}, 0.5, 1.5, True, 0.6, 2,
                                            None, 0)  # fmt: skip
    assert image.size == (32, 32), message
    record = json.loads(Image.open(path).text["editkit"])
    assert record["used"]["family"] == "sd3" and record["gamma"] == 0.5 and record["used"]["num_inference_steps"] == 2


def test_default_sites_on_the_released_topologies():
    """SD3.5-medium: the joint attention of blocks 12-17 of 24; FLUX.1-dev: single-stream blocks 20-37 of 38."""
    from editkit.flow_style import default_flow_style_sites
    from editkit.testing_mmdit import FLUX1_DEV_TRANSFORMER, SD35_MEDIUM_TRANSFORMER, full_width_transformer

    sd35 = default_flow_style_sites(full_width_transformer(SD35_MEDIUM_TRANSFORMER, None, device="meta"))
    assert sd35 == [f"transformer_blocks.{i}.attn" for i in range(12, 18)]
    flux = default_flow_style_sites(full_width_transformer(FLUX1_DEV_TRANSFORMER, None, device="meta"))
    assert flux == [f"single_transformer_blocks.{i}.attn" for i in range(20, 38)]


def _refused_cli_stylize(tmp_path, model_dir, *flags, monkeypatch) -> tuple[int, bool]:
    """``editkit stylize`` on ``model_dir`` with ``flags``, refused before the model loads (loading fails the
    test): (exit code, whether the output was written)."""
    from editkit.cli import main
    from editkit.commands import stylize as stylize_command

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the family options were checked")

    monkeypatch.setattr(stylize_command, "load_method_pipeline", no_loading)

    content = tmp_path / "c.png"
    _image(0).save(content)
    out = tmp_path / "out.png"
    argv = ["stylize", content, content, "-o", out, "--model", model_dir, "--steps", "2", "--size", "32", "--device",
            "cpu", *flags]  # fmt: skip
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    return code, out.exists()


def test_cli_refuses_a_unet_only_flag_on_an_mmdit_folder(tmp_path, sd3_dir, capsys, monkeypatch):
    code, written = _refused_cli_stylize(tmp_path, sd3_dir, "--resample-steps", "3", monkeypatch=monkeypatch)
    assert code == 2 and not written
    assert "--resample-steps 3: a UNet (SD/SDXL) style transfer option; this is a sd3 (MM-DiT) model" in (
        capsys.readouterr().err
    )


@torch.no_grad()
def test_task_layer_reaches_sd3_classifier_free_guidance(sd3):
    """StylizeOptions' guidance_scale / negative_prompt reach the pipeline: the task's image equals the pipeline's
    own CFG run, the negative prompt matters only above guidance 1, and the record names the guidance used."""
    from editkit.tasks import StylizeInputs, stylize
    from editkit.tasks.common import make_generator
    from editkit.tasks.stylize import StylizeOptions

    content, style = _image(0), _image(1)

    def task(**options):
        options = StylizeOptions(num_inference_steps=STEPS, size=32, prompt="a", **options)
        return stylize.run(sd3, StylizeInputs(content, [style]), options)

    guided = task(guidance_scale=4.0, negative_prompt="b")
    direct = sd3(content, [style], prompt="a", negative_prompt="b", guidance_scale=4.0, num_inference_steps=STEPS,
                 width=32, height=32, generator=make_generator(0), output_type="np").images  # fmt: skip
    as_array = np.asarray(guided.images[0], dtype=np.float32) / 255
    assert np.abs(as_array - direct[0]).max() <= 1 / 255 + 1e-6
    assert guided.records[0]["used"]["guidance_scale"] == 4.0 and guided.records[0]["negative_prompt"] == "b"
    other_negative = task(guidance_scale=4.0, negative_prompt="c")
    unguided, unguided_negative = task(), task(negative_prompt="c")
    assert unguided.records[0]["used"]["guidance_scale"] == 1.0

    def pixels(result):
        return np.asarray(result.images[0], dtype=np.int16)

    assert np.abs(pixels(guided) - pixels(other_negative)).max() > 2
    assert np.abs(pixels(guided) - pixels(unguided)).max() > 2
    assert np.array_equal(pixels(unguided), pixels(unguided_negative))  # no CFG: the negative is unused


def test_task_layer_refuses_a_negative_prompt_on_flux_before_model_work(flux):
    from editkit.tasks import StylizeInputs, stylize
    from editkit.tasks.options import OptionError
    from editkit.tasks.stylize import StylizeOptions

    calls, handle = _count_calls(flux)
    try:
        with pytest.raises(OptionError, match=r"negative_prompt.*FLUX runs without"):
            stylize.run(flux, StylizeInputs(_image(0), [_image(1)]), StylizeOptions(negative_prompt="blurry"))
    finally:
        handle.remove()
    assert not calls


def test_cli_and_app_take_the_guidance_and_the_negative_prompt(tmp_path, sd3_dir, capsys):
    import json

    from editkit.app.handlers import Handlers
    from editkit.app.models import ModelManager
    from editkit.cli import main

    content, style = tmp_path / "c.png", tmp_path / "s.png"
    _image(0).save(content)
    _image(1).save(style)
    out = tmp_path / "out.png"
    common = [content, style, "--model", sd3_dir, "--steps", "2", "--size", "32", "--device", "cpu", "--prompt", "a"]
    argv = ["stylize", *common, "-o", out, "--guidance-scale", "3", "--negative-prompt", "b"]
    assert main([str(a) for a in argv]) == 0
    record = json.loads(Image.open(out).text["editkit"])
    assert record["used"]["guidance_scale"] == 3.0 and record["negative_prompt"] == "b" and record["prompt"] == "a"
    bad = tmp_path / "bad.png"
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in ["stylize", *common, "-o", bad, "--guidance-scale", "-1"]])
    assert exit_.value.code == 2 and not bad.exists() and "--guidance-scale" in capsys.readouterr().err

    handlers = Handlers(ModelManager(sd3_dir, device="cpu"), tmp_path / "app", upload_folders=[tmp_path])
    image, path, message = handlers.stylize({"path": str(content)}, {"path": str(style)}, 0.75, 1.5, True, 0.6, 2,
                                            None, 0, "inversion_step", " a ", "b", 3.0)  # fmt: skip
    assert image is not None, message
    app_record = json.loads(Image.open(path).text["editkit"])
    assert app_record["used"]["guidance_scale"] == 3.0 and app_record["prompt"] == "a"
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(out)))  # the same task under both


def test_cli_refuses_a_negative_prompt_on_a_flux_folder(tmp_path, flux_dir, capsys, monkeypatch):
    code, written = _refused_cli_stylize(tmp_path, flux_dir, "--negative-prompt", "blurry", monkeypatch=monkeypatch)
    assert code == 2 and not written
    assert "--negative-prompt needs classifier-free guidance, which FLUX runs without" in capsys.readouterr().err
