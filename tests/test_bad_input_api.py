"""The bad-input matrix through the Python API: loaders and pipelines raise specific editkit errors.

Image, mask, model, token-file and style-cache loaders get the same cases as the CLI; the
pipelines' ``__call__`` refuse bad options (NaN included) with an ``InputError`` before heavy
work; NaN/inf latents and float16 VAE overflow are caught by ``decode_latents``.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings

import bad_inputs as bad
import pytest
import torch
from PIL import Image

from editkit.errors import EditkitError, InputError, ModelLoadError, NumericalError
from editkit.image import load_image, load_mask, mask_coverage

NAN = float("nan")


# -- images and masks -----------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(bad.BAD_IMAGES))
def test_bad_images_raise_input_error(tmp_path, case):
    build, fragment = bad.BAD_IMAGES[case]
    path = build(tmp_path)
    with pytest.raises(InputError, match=fragment.replace("(", r"\(").replace(")", r"\)")) as caught:
        load_image(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("size", [(1, 1), (2, 500), (600, 3)])
def test_degenerate_pil_images_raise(size):
    with pytest.raises(InputError, match="degenerate size"):
        load_image(Image.new("RGB", size))


@pytest.mark.parametrize("case", list(bad.AWKWARD_IMAGES))
def test_awkward_images_load_as_rgb(tmp_path, case):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = load_image(bad.AWKWARD_IMAGES[case](tmp_path))
    assert image.mode == "RGB" and image.size == (80, 64)
    assert any("using the first" in str(w.message) for w in caught) == (case == "animated GIF")


def test_sixteen_bit_keeps_its_range(tmp_path):
    pixels = torch.from_numpy(__import__("numpy").array(load_image(bad.sixteen_bit(tmp_path)))).float()
    assert pixels.min() < 10 and pixels.max() > 200  # scaled 16 -> 8 bit, not clipped to white


@pytest.mark.parametrize(("kind", "coverage"), [("empty", 0.0), ("full", 1.0)])
def test_empty_and_full_masks(tmp_path, kind, coverage):
    assert mask_coverage(load_mask(bad.mask(tmp_path, kind), (40, 32))) == coverage


def test_other_size_mask_is_resized_with_a_warning(tmp_path):
    with pytest.warns(UserWarning, match="resized to 40x32"):
        mask = load_mask(bad.mask(tmp_path, "other size"), (40, 32))
    assert mask.shape == (1, 1, 32, 40) and 0.4 < mask_coverage(mask) < 0.6


@pytest.mark.parametrize("threshold", [0.0, -1.0, 1.5, NAN])
def test_bad_mask_threshold(tmp_path, threshold):
    with pytest.raises(InputError, match="threshold"):
        load_mask(bad.mask(tmp_path, "full"), (40, 32), threshold=threshold)


# -- prompts --------------------------------------------------------------------------------------
def test_prompts_are_cleaned_of_control_characters():
    from editkit.conditioning import clean_prompt

    with pytest.warns(UserWarning, match="control characters"):
        assert clean_prompt("a red\x00 car\x1b") == "a red  car "
    assert clean_prompt("ein Hund, 犬 🐕") == "ein Hund, 犬 🐕"  # non-ASCII kept
    assert clean_prompt("Cafe\u0301") == "Caf\u00e9"  # NFC
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert clean_prompt("two\nlines\t") == "two lines "  # whitespace: no warning
    with pytest.raises(InputError, match="must be a string"):
        clean_prompt(None)
    with pytest.raises(InputError, match="over the limit"):
        clean_prompt("x" * 20_000)


def test_long_prompts_are_truncated_with_a_warning(sd15_pipe):
    from editkit.conditioning import encode_text

    with pytest.warns(UserWarning, match="truncated to the text encoder's 77"):
        long = encode_text(sd15_pipe, "a small tree " * 40)
    short = encode_text(sd15_pipe, "a small tree")
    assert long.prompt_embeds.shape == short.prompt_embeds.shape


# -- pipelines ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipes(sd15_pipe):
    from pipelines.compose import ComposePipeline
    from pipelines.contrastive_edit import ContrastiveEditPipeline
    from pipelines.style_transfer import StyleTransferPipeline

    names = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
    components = {name: value for name, value in sd15_pipe.components.items() if name in names}
    classes = (StyleTransferPipeline, ComposePipeline, ContrastiveEditPipeline)
    return {cls.__name__: cls(**components) for cls in classes}


def _image():
    return Image.new("RGB", (32, 32), "gray")


STYLE_CASES = {
    "gamma out of range": ({"gamma": 1.5}, "gamma"),
    "gamma NaN": ({"gamma": NAN}, "gamma"),
    "tau zero": ({"tau": 0.0}, "tau"),
    "tau NaN": ({"tau": NAN}, "tau"),
    "adain NaN": ({"adain_strength": NAN}, "adain_strength"),
    "steps zero": ({"num_inference_steps": 0}, "num_inference_steps"),
    "resample negative": ({"resample_steps": -1}, "resample_steps"),
    "no style": ({"style_image": None}, "style"),
}


@pytest.mark.parametrize("case", list(STYLE_CASES))
def test_style_transfer_refuses_bad_options(pipes, case):
    options, fragment = STYLE_CASES[case]
    kwargs = {"content_image": _image(), "style_image": _image(), "num_inference_steps": 1, **options}
    with pytest.raises(InputError, match=fragment):
        pipes["StyleTransferPipeline"](**kwargs)


COMPOSE_CASES = {
    "empty prompt": ({"prompt": "  "}, "prompt"),
    "not a string": ({"prompt": None}, "prompt"),
    "height not a multiple of 8": ({"height": 36}, "multiples of 8"),
    "steps zero": ({"num_inference_steps": 0}, "num_inference_steps"),
    "guided steps over steps": ({"max_iter_to_alter": 5}, "max_iter_to_alter"),
    "guidance NaN": ({"guidance_scale": NAN}, "guidance_scale"),
    "unknown refiner": ({"noise_refiner": "magic"}, "noise refiner"),
    "constraints for another prompt": ({"constraints": {"entities": ["boat"]}}, "does not occur"),
}


@pytest.mark.parametrize("case", list(COMPOSE_CASES))
def test_compose_refuses_bad_options(pipes, case):
    options, fragment = COMPOSE_CASES[case]
    kwargs = {"prompt": "a red car", "height": 32, "width": 32, "num_inference_steps": 1, "max_iter_to_alter": 1}
    with pytest.raises(InputError, match=fragment):
        pipes["ComposePipeline"](**{**kwargs, **options})


EDIT_CASES = {
    "empty target": ({"target_prompt": ""}, "target_prompt"),
    "guidance below 1": ({"guidance_scale": 0.5}, "guidance_scale"),
    "guidance NaN": ({"guidance_scale": NAN}, "guidance_scale"),
    "learning rate NaN": ({"learning_rate": NAN}, "learning_rate"),
    "contrast weight inf": ({"contrast_weight": math.inf}, "contrast_weight"),
    "iterations zero": ({"num_inference_steps": 0}, "iterations"),
    "unknown contrast": ({"contrast": "sideways"}, "contrast"),
    "timesteps reversed": ({"min_timestep": 900, "max_timestep": 100}, "min_timestep"),
}


@pytest.mark.parametrize("case", list(EDIT_CASES))
def test_contrastive_edit_refuses_bad_options(pipes, case):
    options, fragment = EDIT_CASES[case]
    kwargs = {"image": _image(), "source_prompt": "a cat", "target_prompt": "a dog", "num_inference_steps": 1}
    with pytest.raises(InputError, match=fragment):
        pipes["ContrastiveEditPipeline"](**{**kwargs, **options})


# -- models ---------------------------------------------------------------------------------------
MODEL_CASES = {
    "not a diffusers folder": (bad.not_a_diffusers_folder, "no model_index.json"),
    "unsupported family (no UNet)": (bad.unet_less_pipeline, "unsupported model family: FluxPipeline"),
    "missing path": (lambda folder: folder / "no-such-model", "no such model"),
    "pickle checkpoint": (lambda folder: bad.pickle_file(folder, "model.ckpt"), "only .safetensors"),
    "pickle named .safetensors": (lambda folder: bad.pickle_file(folder, "model.safetensors"), "is a pickle"),
    "not a checkpoint": (lambda folder: bad.text_named_png(folder), "not a .safetensors checkpoint"),
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_bad_models_raise_model_load_error(tmp_path, case):
    from editkit.models import load_pipeline
    from pipelines.compose import ComposePipeline

    build, fragment = MODEL_CASES[case]
    with pytest.raises(ModelLoadError, match=fragment):
        load_pipeline(ComposePipeline, build(tmp_path), device="cpu")


def test_unet_with_image_conditioning_is_an_unsupported_family(sd15_dir, tmp_path):
    from editkit.models import load_pipeline
    from pipelines.compose import ComposePipeline

    folder = shutil.copytree(sd15_dir, tmp_path / "image-conditioned")
    config_path = folder / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config.update(addition_embed_type="image", encoder_hid_dim=config["cross_attention_dim"])
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"unsupported model family|cannot load model") as caught:
        load_pipeline(ComposePipeline, folder, device="cpu")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("option", [{"trust_remote_code": True}, {"use_safetensors": False}])
def test_load_pipeline_refuses_unsafe_options(sd15_dir, option):
    from editkit.models import load_pipeline
    from pipelines.compose import ComposePipeline

    with pytest.raises(InputError, match="safetensors weights only and never trusts remote code"):
        load_pipeline(ComposePipeline, sd15_dir, device="cpu", **option)


@pytest.mark.parametrize(("device", "dtype"), [("tpu", None), ("cuda:7", None), ("cpu", "fp8"), ("cpu", "int8")])
def test_bad_device_and_dtype(sd15_dir, device, dtype):
    from editkit.models import load_pipeline
    from pipelines.compose import ComposePipeline

    with pytest.raises(InputError):
        load_pipeline(ComposePipeline, sd15_dir, device=device, dtype=dtype)


# -- token files and style caches -----------------------------------------------------------------
@pytest.fixture(scope="module")
def token_file(sd15_pipe, tmp_path_factory):
    from editkit.softrepa import SoftTokens, default_sites, save_soft_tokens

    tokens = SoftTokens(torch.randn(2, sd15_pipe.unet.config.cross_attention_dim), default_sites(sd15_pipe.unet))
    return save_soft_tokens(tokens, tmp_path_factory.mktemp("tokens") / "tokens.safetensors")


def _foreign_tokens(folder, pipe):
    from editkit.softrepa import SoftTokens, default_sites, save_soft_tokens

    tokens = SoftTokens(torch.randn(2, 7), default_sites(pipe.unet), base_model="another/model")
    return save_soft_tokens(tokens, folder / "foreign.safetensors")


TOKEN_CASES = {
    "missing": (lambda folder, source, pipe: folder / "none.safetensors", InputError, "not found"),
    "corrupt": (lambda f, s, p: bad.corrupt_file(f, "t.safetensors"), ModelLoadError, "not a readable safetensors"),
    "truncated": (lambda f, s, p: bad.truncated_copy(s, f), ModelLoadError, "not a readable safetensors"),
    "another model": (lambda f, s, p: _foreign_tokens(f, p), ModelLoadError, "width 7 do not fit"),
    "pickle": (lambda f, s, p: bad.pickle_file(f, "t.safetensors"), ModelLoadError, "is a pickle"),
    "foreign safetensors": (lambda f, s, p: bad.foreign_safetensors(f, "t.safetensors"), ModelLoadError, "not an"),
}


@pytest.mark.parametrize("case", list(TOKEN_CASES))
def test_bad_token_files(tmp_path, token_file, sd15_pipe, case):
    from editkit.softrepa import load_soft_tokens

    build, error, fragment = TOKEN_CASES[case]
    with pytest.raises(error, match=fragment):
        load_soft_tokens(build(tmp_path, token_file, sd15_pipe), unet=sd15_pipe.unet)


def test_valid_token_file_loads(token_file, sd15_pipe):
    from editkit.softrepa import load_soft_tokens

    assert load_soft_tokens(token_file, unet=sd15_pipe.unet) is not None


def _style_cache(folder, model="0" * 16):
    from editkit.style import StyleCache

    cache = StyleCache(
        kind="style", features={}, final_latent=torch.zeros(1, 4, 4, 4), model=model, size=(32, 32),
        num_inference_steps=1, resample_steps=0, sites=(), timesteps=(), model_name="another/model",
    )  # fmt: skip
    return cache.save(folder / "cache.safetensors")


CACHE_CASES = {
    "missing": (lambda folder: folder / "none.safetensors", "not found"),
    "corrupt": (lambda folder: bad.corrupt_file(folder, "c.safetensors"), "not a readable safetensors"),
    "truncated": (lambda folder: bad.truncated_copy(_style_cache(folder), folder), "not a readable safetensors"),
    "pickle": (lambda folder: bad.pickle_file(folder, "c.safetensors"), "is a pickle"),
    "foreign safetensors": (lambda folder: bad.foreign_safetensors(folder, "c.safetensors"), "not an editkit style"),
}


@pytest.mark.parametrize("case", list(CACHE_CASES))
def test_bad_style_caches(tmp_path, case):
    from editkit.style import StyleCache

    build, fragment = CACHE_CASES[case]
    with pytest.raises(InputError, match=fragment):
        StyleCache.load(build(tmp_path))


def test_style_cache_for_another_model_is_refused(tmp_path):
    from editkit.style import StyleCache

    cache = StyleCache.load(_style_cache(tmp_path))
    with pytest.raises(InputError, match="made with another model"):
        cache.validate(kind="style", model="f" * 16, sites=(), timesteps=())


# -- numerical faults -----------------------------------------------------------------------------
def test_nan_latents_are_refused_before_decoding(sd15_pipe):
    from editkit.inversion import decode_latents

    latents = torch.zeros(1, 4, 4, 4)
    latents[0, 0, 0, 0] = NAN
    with pytest.raises(NumericalError, match=r"the denoising loop .* produced NaN values"):
        decode_latents(sd15_pipe.vae, latents)
    with pytest.raises(NumericalError, match=r"float16 overflow.*--dtype fp32 or bf16"):
        decode_latents(sd15_pipe.vae, torch.full((1, 4, 4, 4), math.inf, dtype=torch.float16))


class _OverflowingVAE(torch.nn.Module):
    """A stand-in VAE whose float16 decode overflows (as SDXL's does); float32 works unless ``broken``."""

    def __init__(self, broken: bool = False):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1, dtype=torch.float16))
        self.config = type("Config", (), {"scaling_factor": 1.0, "shift_factor": None, "force_upcast": False})()
        self.broken = broken
        self.decoded_in: list[torch.dtype] = []

    @property
    def dtype(self):
        return self.weight.dtype

    @property
    def device(self):
        return self.weight.device

    def decode(self, latents, return_dict=False):
        self.decoded_in.append(latents.dtype)
        image = torch.zeros(latents.shape[0], 3, 8, 8, dtype=latents.dtype)
        return (image + math.inf if latents.dtype == torch.float16 or self.broken else image,)


def test_float16_vae_overflow_is_retried_in_float32(caplog):
    from editkit.inversion import decode_latents

    vae = _OverflowingVAE()
    image = decode_latents(vae, torch.zeros(1, 4, 1, 1, dtype=torch.float16))
    assert torch.isfinite(image).all() and vae.decoded_in == [torch.float16, torch.float32]
    assert vae.dtype == torch.float16  # restored after the retry
    assert "retrying in float32" in caplog.text


def test_vae_overflow_that_persists_is_a_clear_error():
    from editkit.inversion import decode_latents

    with pytest.raises(NumericalError, match="the VAE decode produced infinite values"):
        decode_latents(_OverflowingVAE(broken=True), torch.zeros(1, 4, 1, 1, dtype=torch.float16))


def test_numerical_errors_are_editkit_errors():
    from editkit.numerics import check_finite

    assert issubclass(NumericalError, EditkitError)
    ok = torch.ones(3)
    assert check_finite(ok, "x") is ok
    with pytest.raises(NumericalError, match=r"the UNet at step 3 produced NaN values \(bfloat16 overflow\?\)"):
        check_finite(torch.tensor([NAN], dtype=torch.bfloat16), "the UNet at step 3")
