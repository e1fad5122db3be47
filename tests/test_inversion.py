"""DDIM inversion: exact round trips with stub noise predictors, call order, CFG, SD/SDXL UNets, VAE."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import DDIMScheduler

from editkit.inversion import (
    InversionResult,
    ddim_invert,
    ddim_step,
    decode_latents,
    encode_image_latents,
    execution_device,
    model_eps,
    predicted_x0,
    v_to_eps,
)
from editkit.testing import sd_ddim_scheduler

SHAPE = (1, 4, 8, 8)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny models run far faster on one intra-op thread (no oversubscription on shared CPUs)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_scheduler(prediction_type: str = "epsilon", timestep_spacing: str = "leading") -> DDIMScheduler:
    """The SD 1.5 DDIM configuration."""
    return sd_ddim_scheduler(prediction_type, timestep_spacing)


class StubUNet:
    """eps(x, t) = base * (0.5 + t / 1000) + coupling * tanh(x), returned as eps, v or x0."""

    def __init__(self, scheduler, coupling: float = 0.0, prediction_type: str = "epsilon", log=None):
        self.base = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
        self.alphas = scheduler.alphas_cumprod
        self.coupling = coupling
        self.prediction_type = prediction_type
        self.calls: list[dict] = []
        self.log = log

    def eps(self, sample: torch.Tensor, t: int) -> torch.Tensor:
        return self.base * (0.5 + t / 1000) + self.coupling * torch.tanh(sample)

    def __call__(self, sample, timestep, encoder_hidden_states=None, added_cond_kwargs=None, return_dict=True):
        t = int(timestep)
        self.calls.append({"t": t, "sample": sample.clone(), "embeds": encoder_hidden_states})
        if self.log is not None:
            self.log.append(("unet", t))
        eps, alpha = self.eps(sample, t), self.alphas[t]
        if self.prediction_type == "v_prediction":  # inverse of eps = sqrt(a) v + sqrt(1 - a) x
            out = (eps - (1 - alpha) ** 0.5 * sample) / alpha**0.5
        elif self.prediction_type == "sample":
            out = predicted_x0(sample, eps, alpha)
        else:
            out = eps
        return (out,)


def generate(unet, scheduler, start: torch.Tensor, steps: int, embeds=None) -> torch.Tensor:
    """Plain diffusers DDIM generation (eta 0) from ``start``."""
    sampler = DDIMScheduler.from_config(scheduler.config)
    sampler.set_timesteps(steps)
    latents = start
    for t in sampler.timesteps:
        output = unet(latents, t, encoder_hidden_states=embeds, return_dict=False)[0]
        latents = sampler.step(output, t, latents, eta=0.0).prev_sample
    return latents


def clean_latents() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))


EMBEDS = torch.zeros(1, 77, 16)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_round_trip_is_exact_when_eps_ignores_x(prediction_type, spacing):
    scheduler = make_scheduler(prediction_type, spacing)
    unet = StubUNet(scheduler, prediction_type=prediction_type)
    x0 = clean_latents()
    result = ddim_invert(unet, scheduler, x0, EMBEDS, num_inference_steps=20)
    recovered = generate(unet, scheduler, result.final, 20, EMBEDS)
    assert (recovered - x0).abs().max() < 1e-4


def test_timesteps_and_latents_follow_the_generation_schedule():
    scheduler = make_scheduler()
    result = ddim_invert(StubUNet(scheduler), scheduler, clean_latents(), EMBEDS, num_inference_steps=10)
    reference = make_scheduler()
    reference.set_timesteps(10)
    assert result.timesteps == [int(t) for t in reference.timesteps]
    assert sorted(result.latents, reverse=True) == result.timesteps
    assert all(isinstance(t, int) for t in result.latents)
    assert result.final is result.latents[result.timesteps[0]]
    assert torch.equal(result.initial, clean_latents())
    assert torch.equal(result.latent_at(torch.tensor(result.timesteps[3])), result.latents[result.timesteps[3]])
    with pytest.raises(KeyError):
        result.latent_at(5)
    assert isinstance(result, InversionResult)


def test_each_inverted_latent_is_what_generation_sees_at_that_timestep():
    scheduler = make_scheduler()
    unet = StubUNet(scheduler)
    result = ddim_invert(unet, scheduler, clean_latents(), EMBEDS, num_inference_steps=10)
    sampler = make_scheduler()
    sampler.set_timesteps(10)
    latents = result.final
    for t in sampler.timesteps:
        assert (latents - result.latent_at(int(t))).abs().max() < 1e-4
        latents = sampler.step(unet(latents, t)[0], t, latents).prev_sample


def round_trip_error(resample_steps: int, **kwargs) -> float:
    scheduler = make_scheduler()
    unet = StubUNet(scheduler, coupling=0.3)
    x0 = clean_latents()
    result = ddim_invert(unet, scheduler, x0, EMBEDS, num_inference_steps=10, resample_steps=resample_steps, **kwargs)
    return (generate(unet, scheduler, result.final, 10, EMBEDS) - x0).abs().max().item()


def test_resampling_reduces_round_trip_error_when_eps_depends_on_x():
    plain = round_trip_error(0)
    resampled = round_trip_error(5)
    assert resampled < plain
    # Without early averaging the fixed point is (nearly) exact.
    assert round_trip_error(5, early_timestep=0) < 0.1 * plain


def test_callback_runs_before_the_model_calls_of_each_step():
    scheduler = make_scheduler()
    log: list[tuple] = []
    unet = StubUNet(scheduler, coupling=0.1, log=log)
    resample_steps, steps = 2, 5

    def callback(index, timestep, latents):
        assert isinstance(timestep, int) and latents.shape == SHAPE
        log.append(("callback", index, timestep))

    result = ddim_invert(
        unet,
        scheduler,
        clean_latents(),
        EMBEDS,
        num_inference_steps=steps,
        resample_steps=resample_steps,
        callback=callback,
    )
    expected = []
    for index, t in enumerate(reversed(result.timesteps)):
        expected += [("callback", index, t)] + [("unet", t)] * (1 + resample_steps)
    assert log == expected
    assert len(unet.calls) == steps * (1 + resample_steps)


def test_early_averaging_uses_the_mean_of_the_first_estimates():
    scheduler = make_scheduler()
    unet = StubUNet(scheduler, coupling=0.3)
    x0 = clean_latents()
    result = ddim_invert(unet, scheduler, x0, EMBEDS, num_inference_steps=10, resample_steps=3, average_early_steps=2)
    t1 = result.timesteps[-1]  # 1 < early_timestep: the first inversion step
    alphas = scheduler.alphas_cumprod
    first_two = [unet.eps(call["sample"], t1) for call in unet.calls[:2]]  # eps_0, eps_1 of step 1
    eps = torch.stack(first_two).mean(dim=0)
    expected = ddim_step(predicted_x0(x0, eps, alphas[0]), eps, alphas[t1])
    assert (result.latent_at(t1) - expected).abs().max() < 1e-6


def test_renoise_averaging_defaults_to_the_first_five_estimates_below_t_250():
    """ReNoise (which AttenST follows): for t < 250 the mean of estimates 0..4; above, the last estimate."""
    scheduler = make_scheduler()
    unet = StubUNet(scheduler, coupling=20.0)  # strong coupling: the estimates differ (no early fixed point)
    x0 = clean_latents()
    result = ddim_invert(unet, scheduler, x0, EMBEDS, num_inference_steps=10, resample_steps=5)
    alphas = scheduler.alphas_cumprod.double()
    early, late = result.timesteps[-1], result.timesteps[-4]  # t = 1 (< 250) and t = 301 (>= 250)
    assert early < 250 <= late
    calls = {t: [c for c in unet.calls if c["t"] == t] for t in (early, late)}
    assert len(calls[early]) == len(calls[late]) == 6  # 1 + r model calls per step

    def inverse_step(z_prev, eps, a_prev, a_t):  # DDIM (eta 0), written out: x0 from z_prev, then to t
        x0_hat = (z_prev - (1 - a_prev) ** 0.5 * eps) / a_prev**0.5
        return a_t**0.5 * x0_hat + (1 - a_t) ** 0.5 * eps

    first_five = torch.stack([unet.eps(c["sample"], early) for c in calls[early][:5]]).double().mean(dim=0)
    final_alpha = scheduler.final_alpha_cumprod.double()  # the step below t_1 ends at final_alpha_cumprod
    expected = inverse_step(x0.double(), first_five, final_alpha, alphas[early])
    assert (result.latent_at(early).double() - expected).abs().max() < 1e-5
    all_six = torch.stack([unet.eps(c["sample"], early) for c in calls[early]]).double().mean(dim=0)
    assert (inverse_step(x0.double(), all_six, final_alpha, alphas[early]) - expected).abs().max() > 1e-4
    previous = result.timesteps[-3]
    last = unet.eps(calls[late][-1]["sample"], late).double()
    expected = inverse_step(result.latent_at(previous).double(), last, alphas[previous], alphas[late])
    assert (result.latent_at(late).double() - expected).abs().max() < 1e-5


def test_classifier_free_guidance_batch_is_uncond_then_cond():
    scheduler = make_scheduler()
    negative, positive = torch.zeros(1, 77, 16), torch.ones(1, 77, 16)
    recorder = StubUNet(scheduler)
    ddim_invert(
        recorder,
        scheduler,
        clean_latents(),
        positive,
        num_inference_steps=3,
        guidance_scale=7.5,
        negative_prompt_embeds=negative,
    )
    for call in recorder.calls:
        assert call["sample"].shape[0] == 2 and torch.equal(call["sample"][0], call["sample"][1])
        assert torch.equal(call["embeds"][0], negative[0]) and torch.equal(call["embeds"][1], positive[0])

    class Conditional(StubUNet):  # eps_u = eps, eps_c = eps + 0.1 * embeds mean
        def __call__(self, sample, timestep, encoder_hidden_states=None, **kwargs):
            shift = 0.1 * encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1)
            return (self.eps(sample, int(timestep)) + shift,)

    class Guided(StubUNet):  # what guidance 7.5 must produce: eps + 7.5 * 0.1
        def __call__(self, sample, timestep, **kwargs):
            return (self.eps(sample, int(timestep)) + 0.75,)

    guided = ddim_invert(
        Conditional(scheduler),
        scheduler,
        clean_latents(),
        positive,
        num_inference_steps=3,
        guidance_scale=7.5,
        negative_prompt_embeds=negative,
    )
    direct = ddim_invert(Guided(scheduler), scheduler, clean_latents(), positive, num_inference_steps=3)
    assert (guided.final - direct.final).abs().max() < 1e-5
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        ddim_invert(recorder, scheduler, clean_latents(), positive, guidance_scale=2.0)


def test_users_scheduler_is_not_mutated():
    scheduler = make_scheduler()
    ddim_invert(StubUNet(scheduler), scheduler, clean_latents(), EMBEDS, num_inference_steps=4)
    assert scheduler.num_inference_steps is None
    scheduler.set_timesteps(10)
    before = scheduler.timesteps.clone()
    ddim_invert(StubUNet(scheduler), scheduler, clean_latents(), EMBEDS, num_inference_steps=4)
    assert scheduler.num_inference_steps == 10 and torch.equal(scheduler.timesteps, before)


def test_progress_callable_wraps_the_steps():
    scheduler = make_scheduler()
    seen = []

    def progress(iterable):
        for item in iterable:
            seen.append(item)
            yield item

    ddim_invert(StubUNet(scheduler), scheduler, clean_latents(), EMBEDS, num_inference_steps=4, progress=progress)
    assert len(seen) == 4


def test_numerics_match_diffusers_formulas():
    x, v = clean_latents(), torch.randn(SHAPE)
    alpha = torch.tensor(0.3)
    x0 = alpha**0.5 * x - (1 - alpha) ** 0.5 * v  # diffusers' v -> x0
    eps = v_to_eps(v, x, alpha)
    assert torch.allclose(predicted_x0(x, eps, alpha), x0, atol=1e-6)
    assert torch.allclose(ddim_step(x0, eps, alpha), x, atol=1e-6)
    assert torch.allclose(model_eps(x0, x, alpha, "sample"), eps, atol=1e-5)
    with pytest.raises(ValueError, match="prediction_type"):
        model_eps(v, x, alpha, "flow")


@pytest.fixture(scope="module")
def sd15():
    from editkit.testing import tiny_sd15_components

    return tiny_sd15_components()


class Recording:
    """Wraps a real UNet and records the keyword arguments of every call."""

    def __init__(self, unet):
        self.unet, self.kwargs = unet, []

    def __call__(self, sample, timestep, **kwargs):
        self.kwargs.append(kwargs)
        return self.unet(sample, timestep, **kwargs)


def test_tiny_sd15_unet_runs(sd15):
    unet = Recording(sd15["unet"])
    result = ddim_invert(
        unet,
        sd15["scheduler"],
        torch.randn(1, 4, 8, 8),
        torch.randn(1, 77, 16),
        num_inference_steps=1,
        resample_steps=1,
    )
    assert len(unet.kwargs) == 2 and torch.isfinite(result.final).all()
    assert result.timesteps == [1]


def test_tiny_sdxl_unet_receives_added_cond_kwargs():
    from editkit.testing import tiny_sdxl_components

    components = tiny_sdxl_components()
    unet = Recording(components["unet"])
    added = {"text_embeds": torch.randn(1, 16), "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]])}
    negative_added = {"text_embeds": torch.zeros(1, 16), "time_ids": added["time_ids"]}
    embeds = torch.randn(1, 77, 32)
    result = ddim_invert(
        unet,
        components["scheduler"],
        torch.randn(1, 4, 8, 8),
        embeds,
        num_inference_steps=2,
        guidance_scale=3.0,
        negative_prompt_embeds=torch.zeros_like(embeds),
        added_cond_kwargs=added,
        negative_added_cond_kwargs=negative_added,
    )
    assert len(unet.kwargs) == 2 and torch.isfinite(result.final).all()
    for kwargs in unet.kwargs:
        assert torch.equal(
            kwargs["added_cond_kwargs"]["text_embeds"], torch.cat([torch.zeros(1, 16), added["text_embeds"]])
        )
        assert kwargs["added_cond_kwargs"]["time_ids"].shape == (2, 6)
    with pytest.raises(ValueError, match="negative_added_cond_kwargs"):
        ddim_invert(
            unet,
            components["scheduler"],
            torch.randn(1, 4, 8, 8),
            embeds,
            guidance_scale=3.0,
            negative_prompt_embeds=embeds,
            added_cond_kwargs=added,
        )


def test_vae_encode_decode(sd15):
    vae = sd15["vae"]
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    latents = encode_image_latents(vae, image)
    assert latents.shape == (1, 4, 4, 4)
    assert torch.equal(latents, encode_image_latents(vae, image))
    mean = vae.encode(image).latent_dist.mean * vae.config.scaling_factor
    assert torch.allclose(latents, mean)
    sampled = [
        encode_image_latents(vae, image, sample=True, generator=torch.Generator().manual_seed(3)) for _ in range(2)
    ]
    assert torch.equal(sampled[0], sampled[1]) and not torch.equal(sampled[0], latents)
    decoded = decode_latents(vae, latents)
    assert decoded.shape == (1, 3, 32, 32) and decoded.min() >= -1 and decoded.max() <= 1


def test_vae_inputs_go_to_the_offload_hooks_execution_device(sd15, monkeypatch):
    """Under model CPU offload the VAE's weights sit on the CPU between calls and diffusers'
    ``encode``/``decode`` move the weights, not the inputs: the inputs must go to the hook's device."""
    from types import SimpleNamespace

    vae = copy.deepcopy(sd15["vae"])
    assert execution_device(vae) == torch.device("cpu")  # no hook: where the weights are
    vae._hf_hook = SimpleNamespace(execution_device=torch.device("meta"))  # as accelerate's CpuOffload
    assert execution_device(vae) == torch.device("meta")
    seen = []

    def record(name):
        def method(tensor, *args, **kwargs):
            seen.append((name, tensor.device.type))
            raise RuntimeError("stop")

        return method

    for name in ("encode", "decode"):
        monkeypatch.setattr(vae, name, record(name))
    with pytest.raises(RuntimeError, match="stop"):
        encode_image_latents(vae, torch.zeros(1, 3, 32, 32))
    with pytest.raises(RuntimeError, match="stop"):
        decode_latents(vae, torch.zeros(1, 4, 4, 4))
    assert seen == [("encode", "meta"), ("decode", "meta")]


def test_fp16_vae_with_force_upcast_runs_in_float32(sd15):
    vae = copy.deepcopy(sd15["vae"]).to(torch.float16)
    seen = []
    handle = vae.encoder.conv_in.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    latents = encode_image_latents(vae, torch.zeros(1, 3, 32, 32))
    handle.remove()
    assert seen == [torch.float32] and latents.dtype == torch.float16 and vae.dtype == torch.float16
    assert decode_latents(vae, latents).dtype == torch.float32 and vae.dtype == torch.float16


def test_non_ddim_scheduler_config_is_used_as_ddim():
    from diffusers import PNDMScheduler

    pndm = PNDMScheduler.from_config(make_scheduler().config)
    unet = StubUNet(pndm)
    x0 = clean_latents()
    result = ddim_invert(unet, pndm, x0, EMBEDS, num_inference_steps=10)
    assert (generate(unet, pndm, result.final, 10, EMBEDS) - x0).abs().max() < 1e-4
