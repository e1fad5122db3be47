"""``editkit edit`` end to end on saved tiny SD 1.5 and SDXL folders, and its bad-input handling."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from editkit.cli import main


@pytest.fixture
def image_file(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "in.png"
    Image.fromarray((rng.random((64, 80, 3)) * 255).astype(np.uint8)).save(path)
    return path


def _edit(image, output, model, *extra):
    return main(
        ["edit", str(image), "--source-prompt", "a cat", "--target-prompt", "a dog", "-o", str(output),
         "--model", str(model), "--steps", "2", *extra]
    )  # fmt: skip


@pytest.mark.parametrize("folder", ["sd15_dir", "sdxl_dir"])
def test_edit_writes_the_image_with_metadata(request, folder, image_file, tmp_path):
    model = request.getfixturevalue(folder)
    output = tmp_path / "out.png"
    assert _edit(image_file, output, model, "--seed", "3") == 0
    with Image.open(output) as edited:
        assert edited.size == (128, 104)  # scaled to the model's 128 px, aspect kept, sides multiples of 8
        params = json.loads(edited.text["editkit"])
        pixels = np.asarray(edited)
    assert params["command"] == "edit" and params["target_prompt"] == "a dog" and params["num_inference_steps"] == 2
    assert params["contrast"] == "dual" and params["seed"] == 3
    again = tmp_path / "again.png"
    assert _edit(image_file, again, model, "--seed", "3") == 0
    with Image.open(again) as repeated:
        assert np.array_equal(np.asarray(repeated), pixels)  # same seed, same edit


def test_plain_dds_and_mask_options(sd15_dir, image_file, tmp_path):
    mask = np.zeros((64, 80), dtype=np.uint8)
    mask[:, :40] = 255
    mask_file = tmp_path / "mask.png"
    Image.fromarray(mask).save(mask_file)
    output = tmp_path / "masked.png"
    assert _edit(image_file, output, sd15_dir, "--contrast", "none", "--mask", str(mask_file)) == 0
    with Image.open(output) as edited:
        assert json.loads(edited.text["editkit"])["contrast"] == "none"


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("editkit: error:")]
    assert len(errors) == 1, err
    return errors[0]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--source-prompt": ""}, "--source-prompt is empty"),
        ({"--steps": "0"}, "must be at least 1"),
        ({"--steps": "-3"}, "must be at least 1"),
    ],
)
def test_bad_options_fail_before_loading(change, message, image_file, tmp_path, capsys):
    options = {"--source-prompt": "a cat", "--target-prompt": "a dog", "--steps": "2"} | change
    argv = ["edit", str(image_file), "-o", str(tmp_path / "out.png"), "--model", str(tmp_path / "missing")]
    for key, value in options.items():
        argv += [key, value]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own usage errors
        code = exit_.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out.png").exists()


def test_mask_of_another_aspect_ratio_is_refused_and_a_gray_one_thresholded(sd15_dir, image_file, tmp_path, capsys):
    small = tmp_path / "small.png"
    Image.fromarray(np.full((32, 32), 255, dtype=np.uint8)).save(small)
    assert _edit(image_file, tmp_path / "out.png", sd15_dir, "--mask", str(small)) == 2
    assert "is 32x32 but the image is 80x64" in _one_error_line(capsys)
    assert not list(tmp_path.glob("out*")) and not list(tmp_path.glob(".out*"))
    gray = tmp_path / "gray.png"  # half the image's size, gray: resized and binarised as diffusers does
    Image.fromarray(np.full((32, 40), 128, dtype=np.uint8)).save(gray)
    assert _edit(image_file, tmp_path / "out.png", sd15_dir, "--mask", str(gray)) == 0


def test_corrupt_image_unsupported_model_existing_output(sd15_dir, image_file, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(image_file.read_bytes()[:100])
    assert _edit(corrupt, tmp_path / "out.png", sd15_dir) == 2
    assert "corrupt.png" in _one_error_line(capsys)

    unsupported = tmp_path / "flux"
    unsupported.mkdir()
    (unsupported / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline", "transformer": []}))
    assert _edit(image_file, tmp_path / "out.png", unsupported) == 2
    assert "unsupported model family" in _one_error_line(capsys)

    existing = tmp_path / "exists.png"
    existing.write_bytes(b"keep me")
    assert _edit(image_file, existing, sd15_dir) == 2
    assert "exists" in _one_error_line(capsys)
    assert existing.read_bytes() == b"keep me"
    assert not (tmp_path / "out.png").exists()


def test_identical_prompts_warn_and_still_run(sd15_dir, image_file, tmp_path, caplog):
    output = tmp_path / "same.png"
    argv = ["edit", str(image_file), "--source-prompt", "a cat", "--target-prompt", "a cat", "-o", str(output),
            "--model", str(sd15_dir), "--steps", "1"]  # fmt: skip
    assert main(argv) == 0
    assert any("identical" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    assert output.exists()
