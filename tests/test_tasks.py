"""The task layer (issue 20): the CLI and the app give the same pixels for the same options, the
metadata people can use, masks resized as diffusers does, one size and one seed rule."""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from editkit.cli import main
from editkit.errors import InputError
from editkit.tasks import EditOptions, StylizeOptions, make_generator, processing_size
from editkit.tasks.common import parse_size

pytest.importorskip("gradio")
from editkit.app.handlers import Handlers, form_options
from editkit.app.models import ModelManager


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("task-inputs")
    rng = np.random.default_rng(0)
    for name, size in (("content.png", (80, 64)), ("style.png", (48, 64))):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / name)
    mask = np.zeros((32, 40), np.uint8)  # half the content's size: the same aspect ratio
    mask[:, :20] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    return folder


@pytest.fixture(scope="module")
def handlers(sd15_dir, files, tmp_path_factory):
    return Handlers(ModelManager(sd15_dir, device="cpu"), tmp_path_factory.mktemp("out"), upload_folders=[files])


def _cli(*argv) -> None:
    assert main([*map(str, argv)]) == 0


def _pixels(image) -> np.ndarray:
    return np.asarray(Image.open(image).convert("RGB") if not isinstance(image, Image.Image) else image)


def test_stylize_cli_and_app_give_identical_pixels(handlers, sd15_dir, files, tmp_path):
    out = tmp_path / "cli.png"
    _cli("stylize", files / "content.png", files / "style.png", "-o", out, "--model", sd15_dir, "--device", "cpu",
         "--steps", "2", "--gamma", "0.5", "--tau", "2.5", "--seed", "3")  # fmt: skip
    up = {"path": str(files / "content.png")}, {"path": str(files / "style.png")}
    image, download, _ = handlers.stylize(*up, 0.5, 2.5, True, 0.6, 2, None, 3)
    assert np.array_equal(_pixels(out), _pixels(image)) and np.array_equal(_pixels(out), _pixels(download))
    assert Image.open(out).size == (128, 104)  # the model's 128 px, aspect kept, multiples of 8


def test_edit_cli_and_app_give_identical_pixels_with_a_half_size_mask(handlers, sd15_dir, files, tmp_path):
    out = tmp_path / "cli.png"
    mask = files / "mask.png"
    _cli("edit", files / "content.png", "--source-prompt", "a cat", "--target-prompt", "a dog", "-o", out,
         "--model", sd15_dir, "--device", "cpu", "--steps", "2", "--seed", "5", "--mask", mask)  # fmt: skip
    upload = {"path": str(files / "content.png")}
    image, _, messages = handlers.edit(upload, "a cat", "a dog", "dual", 2, 7.5, {"path": str(mask)}, 5)
    assert np.array_equal(_pixels(out), _pixels(image))
    assert "resized" in messages  # the app says what it did with the mask


def test_png_metadata_holds_the_values_used_versions_hashes_and_a1111_parameters(sd15_dir, files, tmp_path):
    import diffusers

    from editkit import __version__

    out = tmp_path / "edit.png"
    _cli("edit", files / "content.png", "--source-prompt", "a cat", "--target-prompt", "a dog, smiling", "-o", out,
         "--model", sd15_dir, "--device", "cpu", "--steps", "1", "--seed", "7")  # fmt: skip
    with Image.open(out) as image:
        record, parameters = json.loads(image.text["editkit"]), image.text["parameters"]
    used = record["used"]
    assert used["device"] == "cpu" and used["dtype"] == "float32" and used["size"] == [128, 104]
    assert used["num_inference_steps"] == 1 and used["seed"] == 7
    versions = {"editkit": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__}
    assert record["versions"] == versions
    digest = hashlib.sha256((files / "content.png").read_bytes()).hexdigest()
    assert record["inputs"]["image"]["sha256"] == digest
    prompt, settings = parameters.split("\n")
    assert prompt == "a dog, smiling"  # A1111: the prompt on the first line, then "Key: value, ..."
    pairs = dict(re.findall(r'(\w[\w ]*): ("[^"]*"|[^,]+)', settings))
    assert pairs["Steps"] == "1" and pairs["Seed"] == "7" and pairs["Size"] == "128x104"
    assert pairs["Source prompt"] == "a cat" and pairs["Version"] == f"editkit {__version__}"


def test_mask_resize_matches_diffusers_mask_processor(files):
    from diffusers.image_processor import VaeImageProcessor

    from editkit.image import load_mask

    rng = np.random.default_rng(1)
    gray = Image.fromarray(rng.integers(0, 256, (30, 40), dtype=np.uint8))
    processor = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    reference = processor.preprocess(gray, height=48, width=64)
    with pytest.warns(UserWarning, match="resized to 64x48"):  # load_mask says what it did
        assert torch.equal(load_mask(gray, (64, 48)), reference.float())


def test_mask_of_another_aspect_ratio_is_refused_in_cli_app_and_api(handlers, sd15_dir, sd15_pipe, files, tmp_path):
    import gradio as gr

    from editkit.image import fit_mask
    from pipelines.contrastive_edit import ContrastiveEditPipeline

    square = files / "square.png"  # in the app's upload folder
    Image.new("L", (40, 40), 255).save(square)
    argv = ["edit", files / "content.png", "--source-prompt", "a", "--target-prompt", "b", "-o", tmp_path / "o.png",
            "--model", tmp_path / "missing", "--mask", square]  # fmt: skip
    assert main([*map(str, argv)]) == 2  # refused before the (missing) model is looked at
    with pytest.raises(gr.Error, match="40x40 but the image is 80x64"):
        handlers.edit({"path": str(files / "content.png")}, "a", "b", "dual", 1, 7.5, {"path": str(square)}, 0)
    with pytest.raises(InputError, match="aspect ratio"):
        fit_mask(torch.ones(1, 1, 40, 40), (64, 80))
    assert fit_mask(torch.ones(1, 1, 32, 40), (64, 80)).shape == (1, 1, 64, 80)
    pipe = ContrastiveEditPipeline.from_pipe(sd15_pipe)
    with pytest.raises(InputError, match="aspect ratio"):
        pipe(torch.rand(1, 3, 64, 80), "a", "b", mask=torch.ones(1, 1, 40, 40), num_inference_steps=1)
    from pipelines.style_transfer import StyleTransferPipeline

    stylizer = StyleTransferPipeline.from_pipe(sd15_pipe)
    with pytest.raises(InputError, match="aspect ratio"):
        stylizer(torch.rand(1, 3, 64, 80), torch.rand(1, 3, 64, 80), mask=torch.ones(40, 40), num_inference_steps=1)


def test_one_size_rule_and_one_seed_rule(sd15_pipe):
    assert processing_size(sd15_pipe, None, (2048, 1536)) == (128, 96)  # a large photo: the model's size
    assert processing_size(sd15_pipe, None, (60, 40)) == (128, 88)  # a small one is scaled up to it
    assert processing_size(sd15_pipe, (100, 50)) == (104, 48) and parse_size("100x50") == (100, 50)
    generator = make_generator(3)
    assert generator.device.type == "cpu"
    assert torch.equal(torch.randn(4, generator=generator), torch.randn(4, generator=torch.Generator().manual_seed(3)))


def test_the_options_range_is_the_pipelines_in_the_app_too():
    assert form_options(StylizeOptions, tau=20).tau == 20.0  # tau > 0, as the pipeline allows (no [0.1, 10])
    with pytest.raises(InputError, match="tau must be greater than 0"):
        form_options(StylizeOptions, tau=0)
    with pytest.raises(InputError, match="contrast must be one of"):
        EditOptions(contrast="both")
