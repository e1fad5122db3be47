"""``editkit edit``, the task layer and the app on MM-DiT (tiny SD3, SD3.5, FLUX), and family-specific options."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from editkit.cli import main
from editkit.errors import InputError
from editkit.tasks import EditInputs, EditOptions, edit
from editkit.testing_mmdit import tiny_flux_pipeline, tiny_sd3_pipeline


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sd3")
    tiny_sd3_pipeline(seed=0, path=path)
    return path


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(path)
    return path


def _cli(image, output, model, *extra):
    return main(
        ["edit", str(image), "--source-prompt", "a cat", "--target-prompt", "a dog", "-o", str(output),
         "--model", str(model), "--size", "48", "--steps", "4", "--n-max", "2", *extra]
    )  # fmt: skip


def test_cli_edits_an_sd3_folder_with_flowedit(sd3_dir, image_file, tmp_path):
    output = tmp_path / "out.png"
    assert _cli(image_file, output, sd3_dir, "--seed", "3", "--source-guidance-scale", "2") == 0
    with Image.open(output) as edited:
        assert edited.size == (48, 32)
        record = json.loads(edited.text["editkit"])
        pixels = np.asarray(edited)
    used = record["used"]
    assert used["sampler"] == "FlowEdit" and used["n_max"] == 2 and used["num_inference_steps"] == 4
    assert used["guidance_scale"] == 13.5 and used["source_guidance_scale"] == 2.0  # SD3's target default, given source
    again = tmp_path / "again.png"
    assert _cli(image_file, again, sd3_dir, "--seed", "3", "--source-guidance-scale", "2") == 0
    with Image.open(again) as repeated:
        assert np.array_equal(np.asarray(repeated), pixels)


def _error(capsys) -> str:
    return "\n".join(line for line in capsys.readouterr().err.splitlines() if line.startswith("editkit: error:"))


def test_cli_refuses_options_of_the_other_kind_before_loading(sd3_dir, sd15_dir, image_file, tmp_path, capsys,
                                                              monkeypatch):  # fmt: skip
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("editkit.models.load_pipeline", refuse)
    assert _cli(image_file, tmp_path / "o.png", sd3_dir, "--identity-branch") == 2
    message = _error(capsys)
    assert "--identity-branch" in message and "UNet" in message and "Stable Diffusion 3" in message
    assert main(["edit", str(image_file), "--source-prompt", "a", "--target-prompt", "b", "-o", str(tmp_path / "p.png"),
                 "--model", str(sd15_dir), "--method", "dds"]) == 2  # fmt: skip
    message = _error(capsys)
    assert "--method" in message and "MM-DiT" in message and "Stable Diffusion 1.x/2.x" in message


@pytest.mark.parametrize("family", ["sd35", "flux"])
def test_task_layer_runs_flowedit_and_dds_on_sd35_and_flux(family):
    from pipelines.flow_edit import FluxContrastiveEditPipeline, SD3ContrastiveEditPipeline

    if family == "flux":
        pipe = FluxContrastiveEditPipeline.from_pipe(tiny_flux_pipeline(seed=0))
    else:
        pipe = SD3ContrastiveEditPipeline.from_pipe(tiny_sd3_pipeline(seed=0, sd35=True))
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    inputs = EditInputs(image, "a cat", "a dog")
    result = edit.run(pipe, inputs, EditOptions(size=32, num_inference_steps=3))
    used = result.records[0]["used"]
    assert result.images[0].size == (32, 32) and used["sampler"] == "FlowEdit"
    expected = {"flux": (1.5, 5.5, 3), "sd35": (3.5, 13.5, 2)}[family]  # FlowEdit's scales; n_max 24/28 or 33/50 of 3
    assert (used["source_guidance_scale"], used["guidance_scale"], used["n_max"]) == expected
    dds = edit.run(pipe, inputs, EditOptions(size=32, num_inference_steps=2, method="dds", contrast="none"))
    assert dds.records[0]["used"]["sampler"] == "flow DDS"
    with pytest.raises(InputError, match="identity_branch applies to UNet"):
        edit.run(pipe, inputs, EditOptions(size=32, identity_branch=True))


def test_unet_task_refuses_mmdit_options(sd15_pipe):
    from pipelines.contrastive_edit import ContrastiveEditPipeline

    pipe = ContrastiveEditPipeline.from_pipe(sd15_pipe)
    inputs = EditInputs(Image.new("RGB", (32, 32)), "a cat", "a dog")
    with pytest.raises(InputError, match="n_max applies to MM-DiT"):
        edit.run(pipe, inputs, EditOptions(size=32, n_max=3))


def test_app_edit_handler_on_an_sd3_folder(sd3_dir, image_file, tmp_path):
    pytest.importorskip("gradio")
    from editkit.app.handlers import Handlers
    from editkit.app.models import ModelManager

    handlers = Handlers(ModelManager(sd3_dir, device="cpu"), tmp_path / "out", upload_folders=[image_file.parent])
    _, download, _ = handlers.edit({"path": str(image_file)}, "a cat", "a dog", "dual", 3, 5.0, None, 1)
    record = json.loads(Image.open(download).text["editkit"])
    assert record["used"]["sampler"] == "FlowEdit" and record["used"]["guidance_scale"] == 5.0
    assert Image.open(download).size == (32, 24)  # tiny SD3's native 32 px (longer side), aspect kept


def test_app_sliders_start_at_the_sd3_familys_defaults(sd3_dir, tmp_path):
    """The page for an SD3 folder: edit FlowEdit's 50 steps / target CFG 13.5, compose 28 / 7.0, stylize 28."""
    from editkit.app import build_demo

    demo = build_demo(sd3_dir, device="cpu", output_dir=tmp_path)
    values = {block.elem_id: block.value for block in demo.blocks.values() if getattr(block, "elem_id", None)}
    assert values["edit-steps"] == 50 and values["compose-steps"] == 28 and values["stylize-steps"] == 28
    assert values["tokens-steps"] == 28
    guidance = [b.value for b in demo.blocks.values() if getattr(b, "label", None) == "Guidance scale"]
    assert 13.5 in guidance and 7.0 in guidance


@pytest.mark.parametrize(("guidance_embeds", "expected"), [(True, (28, 3.5)), (False, (4, 0.0))])
def test_app_tells_flux_schnell_from_dev_before_loading(tmp_path, guidance_embeds, expected):
    """A FLUX folder without a guidance embedding (FLUX.1-schnell) gets schnell's 4 steps and no guidance on the
    compose, tokens and stylize sliders, read from transformer/config.json: nothing is loaded to build the page."""
    from editkit.app import build_demo
    from editkit.app.models import ModelManager

    folder = tmp_path / "flux"
    tiny_flux_pipeline(seed=0, path=folder, guidance_embeds=guidance_embeds)
    manager = ModelManager(folder, device="cpu")
    variant = "flux" if guidance_embeds else "flux-schnell"
    assert manager.defaults_family() == variant and manager._base is None
    demo = build_demo(folder, device="cpu", output_dir=tmp_path / "out")
    values = {block.elem_id: block.value for block in demo.blocks.values() if getattr(block, "elem_id", None)}
    steps, guidance = expected
    assert values["compose-steps"] == values["tokens-steps"] == values["stylize-steps"] == steps
    assert guidance in [b.value for b in demo.blocks.values() if getattr(b, "label", None) == "Guidance scale"]
    manager.pipeline("compose")  # once loaded, the transformer's own config says the same
    assert manager._base is not None and manager.defaults_family() == variant
