"""diffusers conformance of editkit's three pipelines: batched inputs, image formats, outputs.

Each test runs every pipeline on tiny SD 1.5 components (32 px, two steps) and checks one
convention of diffusers' stock pipelines (issue 19).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from editkit.errors import InputError
from editkit.testing import tiny_sd15_components

SIZE = 32
PIPELINES = ("stylize", "edit", "compose")


def _rand_images(batch: int, seed: int = 0) -> torch.Tensor:
    """(batch, 3, SIZE, SIZE) in [0, 1], diffusers' tensor convention."""
    return torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def pipes():
    from pipelines.compose import ComposePipeline
    from pipelines.contrastive_edit import ContrastiveEditPipeline
    from pipelines.style_transfer import StyleTransferPipeline

    components = {k: v for k, v in tiny_sd15_components(words=("cat", "dog")).items() if k != "safety_checker"}
    built = {
        "stylize": StyleTransferPipeline(**components),
        "edit": ContrastiveEditPipeline(**{k: v for k, v in components.items() if k in _BASE}),
        "compose": ComposePipeline(**{k: v for k, v in components.items() if k in _BASE}),
    }
    for pipe in built.values():
        pipe.set_progress_bar_config(disable=True)
    return built


_BASE = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")


def _stable_diffusion(pipe):
    """diffusers' StableDiffusionPipeline on ``pipe``'s components: the reference."""
    from diffusers import StableDiffusionPipeline

    parts = {k: getattr(pipe, k) for k in _BASE}
    reference = StableDiffusionPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    reference.set_progress_bar_config(disable=True)
    return reference


def _call(pipes, name: str, image=None, **kwargs):
    """Run one pipeline with its smallest useful arguments (image: the content/edited image)."""
    pipe = pipes[name]
    image = _rand_images(1) if image is None else image
    if name == "stylize":
        kwargs.setdefault("style_image", _rand_images(1, seed=1))
        return pipe(image, num_inference_steps=2, **kwargs)
    if name == "edit":
        kwargs.setdefault("generator", torch.Generator().manual_seed(0))
        kwargs.setdefault("contrast", None)
        return pipe(image, "a cat", "a dog", num_inference_steps=2, **kwargs)
    kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    return pipe(kwargs.pop("prompt", "a cat"), height=SIZE, width=SIZE, num_inference_steps=2, refine=False, **kwargs)


# -- 1. every item of a batch is processed ------------------------------------------------------
@pytest.mark.parametrize("name", ["stylize", "edit"])
def test_batched_image_gives_one_output_per_item_equal_to_its_own_run(pipes, name):
    batch = _rand_images(2)
    together = _call(pipes, name, batch, output_type="np").images
    assert together.shape == (2, SIZE, SIZE, 3)
    if name == "edit":  # one generator per item: item 1 is its own run with generator 1
        generators = [torch.Generator().manual_seed(s) for s in (0, 1)]
        together = _call(pipes, name, batch, output_type="np", generator=generators).images
    alone = _call(pipes, name, batch[1:], output_type="np", generator=torch.Generator().manual_seed(1)).images
    np.testing.assert_allclose(together[1], alone[0], atol=1e-5)
    assert np.abs(together[0] - together[1]).max() > 1e-3  # the items really differ


def test_edit_with_contrast_and_one_generator_per_item_equals_each_item_alone(pipes):
    """The PatchNCE term too: per-item patch locations and a step not divided by the batch size."""
    batch = _rand_images(2)
    generators = [torch.Generator().manual_seed(s) for s in (0, 1)]
    options = {"contrast": "dual", "num_patches": 8, "output_type": "latent"}
    together = _call(pipes, "edit", batch, generator=generators, **options).images
    alone = _call(pipes, "edit", batch[1:], generator=torch.Generator().manual_seed(1), **options).images
    torch.testing.assert_close(together[1:], alone, atol=1e-5, rtol=1e-4)


def test_compose_prompt_list_and_num_images_per_prompt_match_diffusers(pipes):
    """Guidance off, compose is plain SD sampling: a batch must match StableDiffusionPipeline's batch."""
    compose = pipes["compose"]
    reference = _stable_diffusion(compose)
    common = {"height": SIZE, "width": SIZE, "num_inference_steps": 2, "num_images_per_prompt": 2, "output_type": "pt"}
    prompts = ["a cat", "a dog"]
    expected = reference(prompts, generator=torch.Generator().manual_seed(3), **common).images
    out = compose(prompts, generator=torch.Generator().manual_seed(3), max_iter_to_alter=0, refine=False, **common)
    assert out.images.shape == (4, 3, SIZE, SIZE)
    torch.testing.assert_close(out.images, expected, atol=1e-5, rtol=1e-4)
    assert len(out.constraints) == 4 and out.constraints[2].prompt == "a dog"  # one report per image


@pytest.mark.parametrize("name", ["stylize", "edit"])
def test_image_lists_and_prompt_lists_batch(pipes, name):
    images = [PIL.Image.fromarray(a) for a in _uint8_images(2)]
    if name == "edit":
        out = pipes[name](images, "a cat", ["a dog", "a cat dog"], num_inference_steps=1, contrast=None,
                          num_images_per_prompt=2, output_type="pt")  # fmt: skip
        assert out.images.shape == (4, 3, SIZE, SIZE)
    else:
        out = _call(pipes, name, images, prompt=["a cat", "a dog"], num_images_per_prompt=2, output_type="pt")
        assert out.images.shape == (4, 3, SIZE, SIZE)
        torch.testing.assert_close(out.images[0], out.images[1])  # deterministic: copies are equal
        assert len(out.content_caches) == 2


def test_mismatched_batch_lengths_are_refused(pipes):
    images = _rand_images(3)
    with pytest.raises(InputError, match="same length"):
        pipes["edit"](images, ["a cat", "a dog"], "a bird", num_inference_steps=1)
    with pytest.raises(InputError, match="generators"):
        _call(pipes, "compose", generator=[torch.Generator()] * 3)
    with pytest.raises(InputError, match="num_images_per_prompt"):
        _call(pipes, "stylize", num_images_per_prompt=0)


# -- 2. image inputs: diffusers' formats ---------------------------------------------------------
def _uint8_images(batch: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(batch, SIZE, SIZE, 3), dtype=np.uint8)


@pytest.mark.parametrize("name", ["stylize", "edit"])
def test_every_image_format_gives_the_same_result(pipes, name, tmp_path):
    array = _uint8_images(1)
    floats = array.astype(np.float32) / 255
    tensor = torch.from_numpy(floats).permute(0, 3, 1, 2)
    PIL.Image.fromarray(array[0]).save(tmp_path / "image.png")
    formats = {
        "pil": PIL.Image.fromarray(array[0]),
        "path": str(tmp_path / "image.png"),
        "np_hwc": floats[0],
        "np_bhwc": floats,
        "np_uint8": array[0],
        "pt_chw": tensor[0],
        "pt_list": [tensor[0]],
        "pil_list": [PIL.Image.fromarray(array[0])],
    }
    results = {key: _call(pipes, name, value, output_type="latent").images for key, value in formats.items()}
    with pytest.warns(FutureWarning, match=r"\[-1,1\]"):  # diffusers' deprecated range, still read
        results["pt_minus1_1"] = _call(pipes, name, tensor * 2 - 1, output_type="latent").images
    for key, value in results.items():
        torch.testing.assert_close(value, results["pil"], atol=1e-5, rtol=1e-4, msg=key)


@pytest.mark.parametrize("name", ["stylize", "edit"])
def test_latents_are_accepted_as_the_image(pipes, name):
    from editkit.inversion import encode_image_latents

    pixels = _rand_images(1)
    latents = encode_image_latents(pipes[name].vae, pixels * 2 - 1)
    from_pixels = _call(pipes, name, pixels, output_type="latent").images
    from_latents = _call(pipes, name, latents, output_type="latent").images
    torch.testing.assert_close(from_latents, from_pixels, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["stylize", "edit"])
@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((SIZE, SIZE, 3), dtype=np.int64), "dtype"),
        (np.full((SIZE, SIZE, 3), 2.0, dtype=np.float32), r"\[0, 1\]"),
        (torch.full((1, 3, SIZE, SIZE), 3.0), r"\[0, 1\]"),
        (torch.zeros(1, 5, SIZE, SIZE), "channels"),
        ([PIL.Image.new("RGB", (SIZE, SIZE)), np.zeros((SIZE, SIZE, 3), np.float32)], "one kind"),
        ("/no/such/image.png", "not found"),
        ([], "empty"),
        (42, "PIL image"),
    ],
)
def test_bad_images_raise_input_errors(pipes, name, image, message):
    with pytest.raises(InputError, match=message):
        _call(pipes, name, image)


# -- 5. outputs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PIPELINES)
def test_output_types_and_return_dict(pipes, name):
    pt = _call(pipes, name, output_type="pt").images
    assert isinstance(pt, torch.Tensor) and pt.shape == (1, 3, SIZE, SIZE) and 0 <= pt.min() <= pt.max() <= 1
    as_np = _call(pipes, name, output_type="np").images
    assert isinstance(as_np, np.ndarray) and as_np.shape == (1, SIZE, SIZE, 3)
    np.testing.assert_allclose(as_np, pt.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    pil = _call(pipes, name, output_type="pil").images
    assert isinstance(pil, list) and isinstance(pil[0], PIL.Image.Image) and pil[0].size == (SIZE, SIZE)
    np.testing.assert_allclose(np.asarray(pil[0]), (as_np[0] * 255).round(), atol=1)
    latent = _call(pipes, name, output_type="latent").images
    assert latent.shape == (1, 4, SIZE // 8, SIZE // 8)
    as_tuple = _call(pipes, name, output_type="pt", return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], pt)
    with pytest.raises(InputError, match="output_type"):
        _call(pipes, name, output_type="jpeg")


# -- 6. callbacks and properties -----------------------------------------------------------------
@pytest.mark.parametrize("name", PIPELINES)
def test_callback_gets_the_listed_tensors_and_properties_and_its_latents_are_used(pipes, name):
    seen = []

    def zero_latents(pipe, step, timestep, tensors):
        seen.append((step, sorted(tensors), pipe.guidance_scale, pipe.num_timesteps, pipe.interrupt))
        return {"latents": torch.zeros_like(tensors["latents"])}

    out = _call(
        pipes, name, guidance_scale=2.0, output_type="latent", callback_on_step_end=zero_latents,
        callback_on_step_end_tensor_inputs=["latents"],
    )  # fmt: skip
    assert torch.count_nonzero(out.images) == 0  # the returned latents replaced the loop's
    assert seen == [(0, ["latents"], 2.0, 2, False), (1, ["latents"], 2.0, 2, False)]
    assert "latents" in type(pipes[name])._callback_tensor_inputs

    passed = []
    _call(pipes, name, callback_on_step_end=lambda p, i, t, kw: passed.append(kw) or {},
          callback_on_step_end_tensor_inputs=[], output_type="latent")  # fmt: skip
    assert passed == [{}, {}]  # only the listed tensors (none) are passed
    with pytest.raises(InputError, match="callback_on_step_end_tensor_inputs"):
        _call(pipes, name, callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["noise"])


@pytest.mark.parametrize("name", PIPELINES)
def test_interrupt_stops_the_loop_and_pipeline_callbacks_work(pipes, name):
    from diffusers.callbacks import PipelineCallback

    class Interrupt(PipelineCallback):
        tensor_inputs = ("latents",)

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            steps.append(step_index)
            pipeline._interrupt = True
            return callback_kwargs

    steps = []
    _call(pipes, name, callback_on_step_end=Interrupt(), output_type="latent")
    assert steps == [0] and pipes[name].interrupt
    _call(pipes, name, callback_on_step_end=lambda pipe, i, t, kw: steps.append(i) or {}, output_type="latent")
    assert steps == [0, 0, 1]  # a new run starts uninterrupted


# -- 7. mixins -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PIPELINES)
def test_fused_qkv_projections_and_freeu_work(pipes, name):
    from diffusers.loaders import FromSingleFileMixin
    from diffusers.pipelines.pipeline_utils import StableDiffusionMixin

    pipe = pipes[name]
    assert isinstance(pipe, StableDiffusionMixin) and isinstance(pipe, FromSingleFileMixin)
    plain = _call(pipes, name, output_type="latent").images
    pipe.fuse_qkv_projections()
    try:
        fused = _call(pipes, name, output_type="latent").images
    finally:
        pipe.unfuse_qkv_projections()
    torch.testing.assert_close(fused, plain, atol=1e-4, rtol=1e-3)
    pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.5, b2=1.6)
    try:
        freeu = _call(pipes, name, output_type="latent").images
    finally:
        pipe.disable_freeu()
    assert (freeu - plain).abs().max() > 1e-4  # FreeU reaches the UNet editkit runs
    torch.testing.assert_close(_call(pipes, name, output_type="latent").images, plain)


# -- 8. components -------------------------------------------------------------------------------
def _tiny_autoencoder_tiny():
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    blocks = {"encoder_block_out_channels": (8,) * 4, "decoder_block_out_channels": (8,) * 4}
    return AutoencoderTiny(**blocks, num_encoder_blocks=(1,) * 4, num_decoder_blocks=(1,) * 4).eval()


@pytest.mark.parametrize("name", PIPELINES)
def test_autoencoder_tiny_encodes_and_decodes(pipes, name):
    """AutoencoderTiny has no latent_dist: its latents are used as given, and decoded to the output."""
    pipe = pipes[name]
    original, pipe.vae = pipe.vae, _tiny_autoencoder_tiny()
    try:
        image = _rand_images(1)
        out = _call(pipes, name, image, learning_rate=1e-12, output_type="latent") if name == "edit" else None
        if out is not None:  # a vanishing step: the edited latent is the encoder's own latent
            expected = pipe.vae.encode(image * 2 - 1).latents
            torch.testing.assert_close(out.images, expected, atol=1e-5, rtol=1e-4)
        latents = _call(pipes, name, image, output_type="latent").images
        decoded = _call(pipes, name, image, output_type="pt").images
        expected = ((pipe.vae.decode(latents).sample + 1) / 2).clamp(0, 1)
        torch.testing.assert_close(decoded, expected, atol=1e-5, rtol=1e-4)
    finally:
        pipe.vae = original


@pytest.mark.parametrize("name", ["stylize", "edit"])
def test_edm_schedulers_are_refused_before_model_work(pipes, name, monkeypatch):
    from diffusers import EDMEulerScheduler

    pipe = pipes[name]
    original = pipe.scheduler
    calls = []
    monkeypatch.setattr(pipe.vae, "encode", lambda *a, **k: calls.append(1))
    pipe.scheduler = EDMEulerScheduler()
    try:
        with pytest.raises(InputError, match="EDM"):
            _call(pipes, name)
    finally:
        pipe.scheduler = original
    assert calls == []


@pytest.mark.parametrize("name", PIPELINES)
def test_every_stable_diffusion_component_is_accepted_and_unused_ones_dropped(pipes, name):
    """diffusers' SD component set goes in whole (``from_pipe`` / ``from_pretrained`` of any SD folder); what a
    method never runs is registered as None, the rest as given."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPImageProcessor

    extractor = CLIPImageProcessor()
    sd = StableDiffusionPipeline(**{k: getattr(pipes[name], k) for k in _BASE}, safety_checker=torch.nn.Identity(),
                                 feature_extractor=extractor, requires_safety_checker=False)  # fmt: skip
    moved = type(pipes[name]).from_pipe(sd)
    assert moved.unet is sd.unet and moved.safety_checker is None
    assert moved.feature_extractor is (extractor if name == "stylize" else None)  # IP-Adapter (stylize) uses it
    assert ("force_zeros_for_empty_prompt" in moved.config) == (name != "stylize")  # StyleID encodes "" itself


@pytest.mark.parametrize("name", PIPELINES)
def test_stable_diffusion_from_pipe_without_extra_arguments(pipes, name):
    from diffusers import StableDiffusionPipeline

    sd = StableDiffusionPipeline.from_pipe(pipes[name])
    assert sd.unet is pipes[name].unet and sd.safety_checker is None
    sd.set_progress_bar_config(disable=True)
    images = sd("a cat", height=SIZE, width=SIZE, num_inference_steps=1, output_type="pt").images
    assert images.shape == (1, 3, SIZE, SIZE)


# -- 4. text inputs ------------------------------------------------------------------------------
CLASSES = {
    "stylize": ("pipelines.style_transfer", "StyleTransferPipeline"),
    "edit": ("pipelines.contrastive_edit", "ContrastiveEditPipeline"),
    "compose": ("pipelines.compose", "ComposePipeline"),
}


def _pipeline_class(name):
    import importlib

    module, cls = CLASSES[name]
    return getattr(importlib.import_module(module), cls)


@pytest.fixture(scope="module")
def sdxl_parts():
    from editkit.testing import tiny_sdxl_components

    return {k: v for k, v in tiny_sdxl_components(seed=0).items() if k not in ("image_encoder", "feature_extractor")}


@pytest.mark.parametrize("name", PIPELINES)
@pytest.mark.parametrize("negative", [None, ["blurry", "dark"]])
def test_encode_prompt_matches_diffusers_sd_and_sdxl(pipes, sdxl_parts, name, negative):
    from diffusers import StableDiffusionXLPipeline

    prompts = ["a cat", "a dog"]
    kwargs = {"num_images_per_prompt": 2, "do_classifier_free_guidance": True, "negative_prompt": negative}
    ours = pipes[name].encode_prompt(prompts, "cpu", **kwargs)
    expected = _stable_diffusion(pipes[name]).encode_prompt(prompts, "cpu", **kwargs)
    assert len(ours) == 2 and ours[0].shape == (4, 77, 16)
    for mine, theirs in zip(ours, expected, strict=True):
        torch.testing.assert_close(mine, theirs)

    xl = _pipeline_class(name)(**sdxl_parts)
    zeros = xl.config.get("force_zeros_for_empty_prompt", False)  # stylize: encodes "" (no such option)
    reference = StableDiffusionXLPipeline(**sdxl_parts, force_zeros_for_empty_prompt=zeros)
    xl_ours = xl.encode_prompt(prompts, "cpu", **kwargs)
    xl_expected = reference.encode_prompt(prompts, device="cpu", **kwargs)
    assert len(xl_ours) == 4
    for mine, theirs in zip(xl_ours, xl_expected, strict=True):
        torch.testing.assert_close(mine, theirs)
    assert (negative is None and zeros) == (torch.count_nonzero(xl_ours[1]) == 0)


def test_compose_guidance_rescale_eta_and_prompt_embeds_match_diffusers(pipes):
    compose = pipes["compose"]
    reference = _stable_diffusion(compose)
    common = {"height": SIZE, "width": SIZE, "num_inference_steps": 2, "guidance_scale": 5.0, "output_type": "pt"}
    common |= {"guidance_rescale": 0.7, "eta": 1.0}
    expected = reference("a cat", generator=[torch.Generator().manual_seed(3)], **common).images
    embeds, negative = compose.encode_prompt("a cat", "cpu", 1, True, "a dog")
    ours = compose(
        "a cat", prompt_embeds=embeds, negative_prompt_embeds=negative, generator=[torch.Generator().manual_seed(3)],
        max_iter_to_alter=0, refine=False, **common,
    ).images  # fmt: skip
    expected_negative = reference(
        "a cat", negative_prompt="a dog", generator=[torch.Generator().manual_seed(3)], **common
    ).images
    torch.testing.assert_close(ours, expected_negative, atol=1e-5, rtol=1e-4)
    assert (expected - expected_negative).abs().max() > 1e-4  # the negative embedding was used


@pytest.mark.parametrize("name", ["stylize", "compose"])
def test_prompt_embeds_give_the_prompts_result(pipes, name):
    pipe = pipes[name]
    embeds, negative = pipe.encode_prompt(["a cat"], "cpu", 1, True, ["a dog"])
    options = {"guidance_scale": 3.0, "output_type": "latent"}
    from_text = _call(pipes, name, prompt="a cat", negative_prompt="a dog", **options).images
    extra = {"prompt": "a cat"} if name == "compose" else {}  # compose parses its constraints from the text
    from_embeds = _call(pipes, name, prompt_embeds=embeds, negative_prompt_embeds=negative, **extra, **options).images
    torch.testing.assert_close(from_embeds, from_text)


@pytest.mark.parametrize("name", PIPELINES)
def test_cross_attention_kwargs_reach_every_unet_call(pipes, name):
    unet, seen = pipes[name].unet, []
    handle = unet.register_forward_hook(
        lambda module, args, kwargs, output: seen.append(kwargs.get("cross_attention_kwargs")), with_kwargs=True
    )
    try:
        _call(pipes, name, cross_attention_kwargs={"scale": 1.0}, output_type="latent")
        calls = len(seen)
        _call(pipes, name, output_type="latent")
    finally:
        handle.remove()
    assert calls >= 2 and seen[:calls] == [{"scale": 1.0}] * calls  # inversions and guidance passes too
    assert all(kwargs is None for kwargs in seen[calls:])  # removed after the run


def test_stylize_guidance_rescale_changes_cfg_only(pipes):
    base = {"guidance_scale": 3.0, "output_type": "latent", "prompt": "a cat"}
    plain = _call(pipes, "stylize", **base).images
    rescaled = _call(pipes, "stylize", guidance_rescale=0.7, **base).images
    assert (plain - rescaled).abs().max() > 1e-5
    no_cfg = {"guidance_scale": 1.0, "output_type": "latent"}
    torch.testing.assert_close(_call(pipes, "stylize", guidance_rescale=0.7, **no_cfg).images,
                               _call(pipes, "stylize", **no_cfg).images)  # fmt: skip


# -- 9. determinism and devices ------------------------------------------------------------------
def _fresh(name):
    parts = {k: v for k, v in tiny_sd15_components(seed=0, words=("cat", "dog")).items() if k in _BASE}
    pipe = _pipeline_class(name)(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("name", PIPELINES)
def test_same_seed_same_images_with_a_cpu_and_a_device_generator(pipes, name):
    device = pipes[name].device
    for make in (lambda: torch.Generator().manual_seed(4), lambda: torch.Generator(device=device).manual_seed(4)):
        first = _call(pipes, name, generator=make(), output_type="latent").images
        torch.testing.assert_close(_call(pipes, name, generator=make(), output_type="latent").images, first,
                                   atol=0, rtol=0)  # fmt: skip
    if name != "stylize":  # deterministic method: the seed does not matter there
        other = _call(pipes, name, generator=torch.Generator().manual_seed(5), output_type="latent").images
        assert (other - first).abs().max() > 1e-4


@pytest.mark.parametrize("name", PIPELINES)
def test_model_cpu_offload_hooks_and_dtype_casts_keep_working(pipes, name):
    """CPU probes: accelerate's offload hooks (execution device "cpu") and ``to(dtype)``."""
    reference = _call(pipes, name, output_type="latent").images
    pipe = _fresh(name)
    pipe.enable_model_cpu_offload(device="cpu")
    with_hooks = _call({name: pipe}, name, output_type="latent").images
    torch.testing.assert_close(with_hooks, reference, atol=1e-5, rtol=1e-4)
    pipe = _fresh(name).to(dtype=torch.bfloat16)
    assert pipe.unet.dtype == torch.bfloat16
    low = _call({name: pipe}, name, output_type="pt").images
    high = _call(pipes, name, output_type="pt").images
    assert low.dtype == torch.float32 and (low - high).abs().mean() < 0.1  # bf16 rounding, same image


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", PIPELINES)
def test_cuda_generators_and_model_cpu_offload(name):
    pipe = _fresh(name).to("cuda")
    runs = [_call({name: pipe}, name, generator=torch.Generator("cuda").manual_seed(4), output_type="latent").images
            for _ in range(2)]  # fmt: skip
    torch.testing.assert_close(runs[0], runs[1])
    offloaded = _fresh(name)
    offloaded.enable_model_cpu_offload()
    out = _call({name: offloaded}, name, generator=torch.Generator("cuda").manual_seed(4), output_type="latent")
    torch.testing.assert_close(out.images.cpu(), runs[0].cpu(), atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("name", PIPELINES)
def test_each_file_loads_as_a_diffusers_custom_pipeline(sd15_dir, name):
    """diffusers 0.42 needs trust_remote_code=True for a local custom_pipeline file (README)."""
    from diffusers import DiffusionPipeline

    module, cls = CLASSES[name]
    path = str(Path(__file__).resolve().parents[1] / (module.replace(".", "/") + ".py"))
    pipe = DiffusionPipeline.from_pretrained(sd15_dir, custom_pipeline=path, trust_remote_code=True)
    assert type(pipe).__name__ == cls and pipe.safety_checker is None
