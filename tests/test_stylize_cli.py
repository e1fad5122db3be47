"""``editkit stylize`` end to end on tiny SD 1.5 / SDXL folders: outputs, metadata, caches, bad input."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

import pipelines.style_transfer as style_module
from editkit.cli import main
from editkit.errors import InputError

FAST = ["--steps", "2", "--size", "32", "--device", "cpu"]


def _write(path, seed: int, size=(40, 32)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _run(capsys, *argv):
    """Exit code, stdout, stderr of ``editkit stylize ARGV`` (argparse usage errors included)."""
    try:
        code = main(["stylize", *map(str, argv)])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def images(tmp_path):
    return _write(tmp_path / "content.png", 0), _write(tmp_path / "style.jpg", 1, (24, 40))


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_cli_stylizes_from_a_saved_folder_with_metadata(family, sd15_dir, sdxl_dir, images, tmp_path, capsys):
    model = sd15_dir if family == "sd" else sdxl_dir
    content, style = images
    out = tmp_path / "out.png"
    timing = ("--feature-timing", "inverted_latent")
    code, stdout, err = _run(capsys, content, style, "-o", out, "--model", model, *FAST, "--gamma", "0.5", *timing)
    assert code == 0, err
    assert str(out) in stdout
    with Image.open(out) as image:
        assert image.size == (32, 24)  # the longer side is --size, aspect kept, multiple of 8
        params = json.loads(image.text["editkit"])
    assert params["command"] == "stylize" and params["gamma"] == 0.5 and params["tau"] == 1.5
    assert params["feature_timing"] == "inverted_latent"
    assert params["num_inference_steps"] == 2 and params["style"] == str(style) and params["content"] == str(content)


def test_folders_give_all_pairs_and_each_style_is_inverted_once(sd15_dir, tmp_path, capsys, monkeypatch):
    contents, styles = tmp_path / "contents", tmp_path / "styles"
    contents.mkdir(), styles.mkdir()
    for i in range(2):
        _write(contents / f"c{i}.png", i)
        _write(styles / f"s{i}.png", 10 + i, (32, 32))
    inversions = []
    original = style_module.StyleTransferPipeline._invert

    def counting(self, image, kind, *args):
        inversions.append(kind)
        return original(self, image, kind, *args)

    monkeypatch.setattr(style_module.StyleTransferPipeline, "_invert", counting)
    out, caches = tmp_path / "out", tmp_path / "caches"
    code, _, err = _run(
        capsys, contents, styles, "--output-dir", out, "--model", sd15_dir, *FAST, "--save-style-cache", caches
    )
    assert code == 0, err
    assert sorted(p.name for p in out.glob("*.png")) == ["c0__s0.png", "c0__s1.png", "c1__s0.png", "c1__s1.png"]
    assert (out / "manifest.json").is_file()  # batch mode: resumable
    assert sorted(inversions) == ["content", "content", "style", "style"]
    assert sorted(p.name for p in caches.iterdir()) == ["s0.safetensors", "s1.safetensors"]

    # A saved cache replaces the style image and gives the same pixels; another size is refused.
    again = tmp_path / "again.png"
    cache = caches / "s1.safetensors"
    code, _, err = _run(capsys, contents / "c0.png", "--style-cache", cache, "-o", again, "--model", sd15_dir, *FAST)
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(out / "c0__s1.png")))
    refused = tmp_path / "refused.png"
    code, _, err = _run(
        capsys, contents / "c0.png", "--style-cache", cache, "-o", refused, "--model", sd15_dir, "--steps", "2",
        "--size", "48",
    )  # fmt: skip
    assert code == 2 and "32x32 px" in err and "48x48" in err
    assert not refused.exists()


def test_mask_of_another_size_and_not_binary_is_resized_and_thresholded(sd15_dir, images, tmp_path, capsys, caplog):
    content, style = images
    mask = np.zeros((16, 20), dtype=np.uint8)  # half the content's 40x32: the same aspect ratio
    mask[:, :5] = 200  # not binary
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "masked.png"
    code, _, err = _run(capsys, content, style, "-o", out, "--model", sd15_dir, *FAST, "--mask", tmp_path / "mask.png")
    assert code == 0, err
    warnings = [record.getMessage() for record in caplog.records]
    assert any("resized to 32x24" in w for w in warnings) and any("not binary" in w for w in warnings)
    assert out.exists()


def _bad_cases(tmp_path, content, style):
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.png").write_bytes(_write(tmp_path / "ok.png", 3).read_bytes()[:60])
    (tmp_path / "exists.png").write_bytes(b"x")
    return {
        "missing": ([content, tmp_path / "nope.png"], "not found"),
        "not an image": ([content, tmp_path / "notes.txt"], "not an image"),
        "corrupt": ([tmp_path / "broken.png", style], "truncated or corrupt"),
        "no style": ([content], "no style"),
        "empty style folder": ([content, _empty_dir(tmp_path)], "contains no images"),
        "exists": ([content, style, "-o", tmp_path / "exists.png"], "--overwrite"),
        "zero steps": ([content, style, "--steps", "0"], "at least 1"),
        "gamma": ([content, style, "--gamma", "1.5"], "between 0 and 1"),
        "feature timing": ([content, style, "--feature-timing", "later"], "invalid choice"),
        "bad cache": ([content, "--style-cache", tmp_path / "notes.txt"], "not a readable"),
        "bad mask": ([content, style, "--mask", tmp_path / "notes.txt"], "not an image"),
    }


def _empty_dir(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir(exist_ok=True)
    return folder


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "not an image",
        "corrupt",
        "no style",
        "empty style folder",
        "exists",
        "zero steps",
        "gamma",
        "feature timing",
        "bad cache",
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, images, tmp_path, capsys):
    content, style = images
    argv, message = _bad_cases(tmp_path, content, style)[case]
    if "-o" not in argv:
        argv = [*argv, "-o", tmp_path / "result.png"]
    before = set(tmp_path.rglob("*"))
    code, _, err = _run(capsys, *argv, "--model", tmp_path / "no-model-needed")
    assert code == 2
    assert message in err.strip().splitlines()[-1]
    assert "Traceback" not in err
    assert set(tmp_path.rglob("*")) == before


def test_unwritable_output_folder_is_refused(images, tmp_path, capsys, monkeypatch):
    import editkit.commands.common as common

    content, style = images
    locked = tmp_path / "locked"
    locked.mkdir()
    if not (hasattr(os, "geteuid") and os.geteuid() == 0):
        locked.chmod(0o500)
    else:  # root may write anywhere: simulate the permission check's answer
        monkeypatch.setattr(common, "_writable", lambda folder: folder != locked)
    try:
        code, _, err = _run(capsys, content, style, "-o", locked / "out.png", "--model", tmp_path / "x")
    finally:
        locked.chmod(0o700)
    assert code == 2 and "permission denied" in err.strip().splitlines()[-1]
    assert not any(locked.iterdir())


def test_a_cache_saved_first_by_another_batch_process_is_kept(tmp_path):
    """Two processes of one batch save the same style cache: the second one's create loses the race."""
    import argparse

    from editkit.commands.stylize import _Plan, _save_caches
    from editkit.image import atomic_write

    path = tmp_path / "caches" / "style.safetensors"

    class RacingCache:
        def save(self, target, overwrite=False):
            atomic_write(target, lambda tmp: tmp.write_bytes(b"other process"))  # lands between check and create
            atomic_write(target, lambda tmp: tmp.write_bytes(b"this process"), overwrite=overwrite)

    plan = _Plan([], [tmp_path / "style.png"], [], {}, [path])
    _save_caches([RacingCache()], plan, argparse.Namespace(overwrite=False))
    assert path.read_bytes() == b"other process"
    assert [p.name for p in path.parent.iterdir()] == ["style.safetensors"]  # no temporary file left

    class FailingCache:
        def save(self, target, overwrite=False):
            atomic_write(target, lambda tmp: tmp.write_bytes(b"x"))
            atomic_write(tmp_path, lambda tmp: None)  # any other input error still surfaces

    other = tmp_path / "caches" / "second.safetensors"
    with pytest.raises(InputError, match="is a directory"):
        _save_caches([FailingCache()], _Plan([], [], [], {}, [other]), argparse.Namespace(overwrite=False))
