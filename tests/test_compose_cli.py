"""``editkit compose`` end to end on a saved tiny SD 1.5 folder (offline, CPU)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from editkit.cli import main

PROMPT = "a red car on the left of a blue bird"


def _run(sd15_dir, tmp_path, *extra, prompt=PROMPT, output="out.png"):
    argv = ["compose", prompt, "-o", str(tmp_path / output), "--model", str(sd15_dir), "--device", "cpu"]
    return main([*argv, "--steps", "2", "--size", "64", *extra])


def test_compose_writes_image_report_and_metadata(sd15_dir, tmp_path, capsys):
    assert _run(sd15_dir, tmp_path, "--seed", "1") == 0
    out = capsys.readouterr().out
    assert "entity    car" in out and "relation  car left bird" in out and "chosen image: " in out
    image = Image.open(tmp_path / "out.png")
    assert image.size == (64, 64)
    meta = json.loads(image.text["editkit"])
    assert meta["command"] == "compose" and meta["prompt"] == PROMPT and meta["seed"] == 1
    assert meta["constraints_used"]["relations"] == [{"subject": "car", "relation": "left", "object": "bird"}]
    assert meta["chosen"] in ("stage1", "refined")
    assert meta["attention_blocks"] == ["down", "up"]  # the paper's maps by default
    assert _run(sd15_dir, tmp_path) == 2  # exists, no --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert _run(sd15_dir, tmp_path, "--attention-blocks", "down", output="down.png") == 0
    assert json.loads(Image.open(tmp_path / "down.png").text["editkit"])["attention_blocks"] == ["down"]
    with pytest.raises(SystemExit) as bad_choice:  # argparse's own refusal: usage, exit code 2
        _run(sd15_dir, tmp_path, "--attention-blocks", "left", output="x.png")
    assert bad_choice.value.code == 2 and "invalid choice: 'left'" in capsys.readouterr().err


def test_no_refine_and_user_constraints(sd15_dir, tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"entities": ["car"], "attributes": [{"attribute": "red", "entity": "car"}]}))
    assert _run(sd15_dir, tmp_path, "--no-refine", "--constraints", str(path)) == 0
    out = capsys.readouterr().out
    assert "constraints (user)" in out and "entities: car (not verified)" in out and "chosen image: stage1" in out


@pytest.mark.parametrize(
    ("constraints", "message"),
    [
        ({"entities": ["boat"]}, "does not occur in the prompt"),
        ({"objects": ["car"]}, "keys entities"),
        ({"relations": [{"subject": "car", "relation": "inside", "object": "bird"}]}, "not one of"),
    ],
)
def test_bad_constraints_exit_2(sd15_dir, tmp_path, capsys, constraints, message):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(constraints))
    assert _run(sd15_dir, tmp_path, "--constraints", str(path)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out.png").exists()


def test_verifier_errors_exit_2(sd15_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _run(sd15_dir, tmp_path, "--verifier", "clip")
    assert exit_info.value.code == 2
    assert _run(sd15_dir, tmp_path, "--verifier", "vqa") == 2
    assert "needs weights" in capsys.readouterr().err
    assert _run(sd15_dir, tmp_path, "--verifier", "detector", "--verifier-model", str(tmp_path / "owlvit")) == 2
    assert "cannot load the detector verifier" in capsys.readouterr().err


def test_unparseable_and_too_long_prompts_warn(sd15_dir, tmp_path, capsys):
    assert _run(sd15_dir, tmp_path, prompt="a photo", output="a.png") == 0
    out = capsys.readouterr().out
    assert "no entity found" in out and "entities: none" in out
    long_prompt = "a red car and " + "a small tree, " * 10 + "a blue bird"  # > 77 character-level tokens
    assert _run(sd15_dir, tmp_path, prompt=long_prompt, output="b.png") == 0
    out = capsys.readouterr().out
    assert "truncated" in out and "not constrained: entity 'bird'" in out


def test_bad_options_exit_2(sd15_dir, tmp_path, capsys):
    assert _run(sd15_dir, tmp_path, prompt="  ") == 2
    assert _run(sd15_dir, tmp_path, "--max-iter-to-alter", "5") == 2
    assert _run(sd15_dir, tmp_path, "--constraints", str(tmp_path / "none.json")) == 2
    err = capsys.readouterr().err
    assert "prompt is empty" in err and "--max-iter-to-alter (5) exceeds" in err and "does not exist" in err


def test_attention_xformers_falls_back_to_sdpa_on_cpu_with_the_same_image(sd15_dir, tmp_path, caplog):
    import logging

    import numpy as np

    assert _run(sd15_dir, tmp_path, "--no-refine", output="sdpa.png") == 0
    with caplog.at_level(logging.WARNING, logger="editkit.attention.kernels"):
        assert _run(sd15_dir, tmp_path, "--no-refine", "--attention", "xformers", output="xformers.png") == 0
    assert "using torch SDPA instead" in caplog.text
    sdpa, xformers = (np.asarray(Image.open(tmp_path / name)) for name in ("sdpa.png", "xformers.png"))
    assert np.array_equal(sdpa, xformers)
    meta = json.loads(Image.open(tmp_path / "xformers.png").text["editkit"])
    assert meta["attention"] == "xformers"


def test_noise_refinement_rounds_reach_the_pipeline_and_bad_values_name_the_flag(
    sd15_dir, tmp_path, capsys, monkeypatch
):
    from pipelines.compose import ComposePipeline

    seen, original = [], ComposePipeline.__call__
    monkeypatch.setattr(
        ComposePipeline,
        "__call__",
        lambda self, *a, **k: (seen.append(k["noise_refinement_rounds"]), original(self, *a, **k))[1],
    )
    assert _run(sd15_dir, tmp_path, "--noise-refinement-rounds", "2", "--noise-refiner", "initno") == 0
    assert seen == [2] and json.loads(Image.open(tmp_path / "out.png").text["editkit"])["noise_refinement_rounds"] == 2
    with pytest.raises(SystemExit) as refused:  # argparse's refusal: usage, exit code 2
        _run(sd15_dir, tmp_path, "--noise-refinement-rounds", "0", output="zero.png")
    assert refused.value.code == 2 and not (tmp_path / "zero.png").exists()
    assert "argument --noise-refinement-rounds: must be between 1 and 10, got 0" in capsys.readouterr().err
