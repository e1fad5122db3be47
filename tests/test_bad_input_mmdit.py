"""Issue 22 bad input: incomplete MM-DiT folders, options of the other architecture, files made on another family.

Each case is exit code 2 on the CLI with one ``editkit: error:`` line naming the cause, and no output written.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import bad_inputs as bad
import pytest
import torch

from editkit.cli import main
from editkit.errors import InputError, ModelLoadError
from editkit.softrepa import SoftTokens, default_sites, read_soft_tokens, save_soft_tokens
from editkit.style import StyleCache

STYLIZE = ["--steps", "1", "--size", "32", "--device", "cpu"]
UNET_SITE = "up_blocks.1.attentions.0.transformer_blocks.0.attn1"


def _run(capsys, argv: list) -> tuple[int, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def _assert_exit_2(capsys, argv: list, fragment: str, out: Path) -> None:
    code, err = _run(capsys, argv)
    assert code == 2, err[-2000:]
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("editkit: error:")], err[-2000:]
    assert fragment in err, err[-2000:]
    assert not out.exists()


@pytest.fixture
def images(tmp_path) -> tuple[Path, Path, Path]:
    folder = tmp_path / "inputs"
    folder.mkdir()
    return bad.good_image(folder, "content.png", (32, 32)), bad.good_image(folder, "style.png", seed=1), tmp_path


def _without(folder: Path, component: str, where: Path) -> Path:
    broken = where / f"no-{component}"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / component)
    return broken


@pytest.mark.parametrize(("fixture", "component"), [("flux_dir", "transformer"), ("sd35_dir", "text_encoder_3")])
def test_incomplete_mmdit_folder_exits_2(capsys, images, request, fixture, component):
    content, style, tmp = images
    model = _without(request.getfixturevalue(fixture), component, tmp)
    out = tmp / "out.png"
    argv = ["stylize", content, style, "-o", out, "--model", model, *STYLIZE]
    _assert_exit_2(capsys, argv, f"component(s) {component} missing", out)


def test_unet_site_option_on_an_mmdit_model_exits_2(capsys, images, sd3_dir):
    content, style, tmp = images
    out = tmp / "out.png"
    argv = ["stylize", content, style, "-o", out, "--model", sd3_dir, "--sites", UNET_SITE, *STYLIZE]
    _assert_exit_2(
        capsys, argv, f"injection_sites: {UNET_SITE!r} is a UNet attention site name, but this is a sd3 ", out
    )


def _cache_made_on(family: str, folder: Path) -> Path:
    cache = StyleCache(
        kind="style", features={}, final_latent=torch.zeros(1, 4, 4, 4), model="0" * 16, size=(32, 32),
        num_inference_steps=1, resample_steps=0, sites=(), timesteps=(), model_name="tiny", family=family,
    )  # fmt: skip
    return cache.save(folder / f"{family}-cache.safetensors")


def test_style_cache_of_another_family(capsys, images, sdxl_dir, monkeypatch):
    """Refused from the model's index, before the model loads (loading fails the test)."""
    from editkit.commands import stylize as stylize_command

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the style cache's family was checked")

    monkeypatch.setattr(stylize_command, "load_method_pipeline", no_loading)
    content, _, tmp = images
    path = _cache_made_on("sd", tmp)
    loaded = StyleCache.load(path)
    assert loaded.family == "sd"
    with pytest.raises(InputError, match=r"made on a sd model .* this is a flux model"):
        loaded.validate(kind="style", model=loaded.model, sites=(), timesteps=(), family="flux")
    loaded.validate(kind="style", model=loaded.model, sites=(), timesteps=(), family="sd")
    out = tmp / "out.png"
    argv = ["stylize", content, "--style-cache", path, "-o", out, "--model", sdxl_dir, *STYLIZE]
    _assert_exit_2(capsys, argv, "style cache was made on a sd model (tiny), this is a sdxl model", out)


def test_style_cache_family_is_checked_in_the_header(tmp_path):
    path = bad.crafted_style_cache(tmp_path, family=3)
    with pytest.raises(InputError, match="family must be a string"):
        StyleCache.load(path)


def _no_model_loading(monkeypatch) -> None:
    """Loading a pipeline fails the test: what is checked here must be refused from the model's index."""
    from editkit import models

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the soft tokens' family was checked")

    monkeypatch.setattr(models, "load_pipeline", no_loading)


@pytest.mark.parametrize("command", ["softrepa generate", "edit"])
def test_token_file_of_another_family(capsys, images, monkeypatch, sd15_pipe, sdxl_dir, sd3_dir, command):
    """UNet tokens on SDXL (another UNet family) and on SD3 (another kind), refused before the model loads."""
    _no_model_loading(monkeypatch)
    content, _, tmp_path = images
    tokens = SoftTokens(torch.randn(2, 16), default_sites(sd15_pipe.unet), base_model="tiny-sd", family="sd")
    path = save_soft_tokens(tokens, tmp_path / "tokens.safetensors")
    assert read_soft_tokens(path).family == "sd"
    out = tmp_path / "out.png"
    common = ["--soft-tokens", path, "-o", out, "--steps", "1", "--size", "32", "--device", "cpu"]
    if command == "edit":
        argv = ["edit", content, "--source-prompt", "a", "--target-prompt", "b", "--model", sd3_dir, *common]
    else:
        argv = ["softrepa", "generate", "a red car", "--model", sdxl_dir, *common]
    family = "sd3" if command == "edit" else "sdxl"
    message = f"soft tokens trained on a sd model (tiny-sd) do not apply to this {family} model"
    _assert_exit_2(capsys, argv, message, out)


def test_token_file_with_an_unknown_family(tmp_path, sd15_pipe):
    from editkit.softrepa.files import read_safetensors, write_safetensors

    tokens = SoftTokens(torch.randn(2, 16), default_sites(sd15_pipe.unet), family="sd")
    path = save_soft_tokens(tokens, tmp_path / "tokens.safetensors")
    tensors, metadata = read_safetensors(path, "soft-token file")
    write_safetensors(path, tensors, {**metadata, "family": "kandinsky"}, overwrite=True)
    with pytest.raises(ModelLoadError, match="unknown model family 'kandinsky'"):
        read_soft_tokens(path)


def test_style_cache_with_an_unknown_family(tmp_path):
    with pytest.raises(InputError, match="family 'pixart' is not one of sd, sdxl, sd3, flux"):
        StyleCache.load(bad.crafted_style_cache(tmp_path, family="pixart"))
