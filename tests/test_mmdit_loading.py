"""Loading SD3 / SD3.5 / FLUX models: folders, offline Hub ids, single files, unsupported families, bad folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline
from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES
from safetensors.torch import save_file

from editkit.backbones import FAMILIES
from editkit.backbones.families import family_of_checkpoint
from editkit.errors import ModelLoadError
from editkit.models import load_pipeline, model_family, supported_families


@pytest.mark.parametrize(
    ("fixture", "pipeline_class", "family"),
    [("sd3_dir", StableDiffusion3Pipeline, "sd3"), ("sd35_dir", StableDiffusion3Pipeline, "sd3"),
     ("flux_dir", FluxPipeline, "flux"), ("sd15_dir", StableDiffusionPipeline, "sd")],
)  # fmt: skip
def test_folder_loads_its_family_pipeline(fixture, pipeline_class, family, request):
    pipe = load_pipeline(None, request.getfixturevalue(fixture), device="cpu")
    assert type(pipe) is pipeline_class and model_family(pipe) == family
    assert model_family(pipe.transformer if family != "sd" else pipe.unet) == family


def test_sd35_folder_keeps_its_topology(sd35_dir):
    pipe = load_pipeline(StableDiffusion3Pipeline, sd35_dir, device="cpu", dtype="bf16")
    assert pipe.transformer.dtype == torch.bfloat16
    assert pipe.transformer.config.qk_norm == "rms_norm" and list(pipe.transformer.config.dual_attention_layers) == [0]


def _cached_repo(folder: Path, cache: Path, repo_id: str) -> None:
    """``folder`` as the Hugging Face cache holds a downloaded repo (snapshot + refs/main)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    revision = "0" * 40
    shutil.copytree(folder, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)


def test_offline_hub_id_recognised_from_the_cache(flux_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _cached_repo(flux_dir, tmp_path, "editkit-tests/tiny-flux")
    pipe = load_pipeline(None, "editkit-tests/tiny-flux", device="cpu", cache_dir=str(tmp_path))
    assert isinstance(pipe, FluxPipeline) and model_family(pipe) == "flux"
    with pytest.raises(ModelLoadError, match=r"editkit-tests/tiny-flux is a FLUX\.1 model; StableDiffusion3Pipeline"):
        load_pipeline(StableDiffusion3Pipeline, "editkit-tests/tiny-flux", device="cpu", cache_dir=str(tmp_path))


@pytest.mark.parametrize(
    ("pipeline_class", "fixture", "message"),
    [
        (StableDiffusionPipeline, "sd3_dir", r"is a Stable Diffusion 3 / 3\.5 model; StableDiffusionPipeline runs on"),
        (FluxPipeline, "sd35_dir", r"is a Stable Diffusion 3 / 3\.5 model; FluxPipeline runs on FLUX\.1 models only"),
        (StableDiffusion3Pipeline, "sd15_dir", r"is a Stable Diffusion 1\.x/2\.x model; StableDiffusion3Pipeline"),
    ],
)
def test_pipeline_of_another_family_refused(pipeline_class, fixture, message, request):
    with pytest.raises(ModelLoadError, match=message):
        load_pipeline(pipeline_class, request.getfixturevalue(fixture), device="cpu")


@pytest.mark.parametrize(("fixture", "component"), [("flux_dir", "transformer"), ("sd3_dir", "text_encoder_2")])
def test_folder_with_a_missing_component(fixture, component, request, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(request.getfixturevalue(fixture), broken)
    shutil.rmtree(broken / component)
    with pytest.raises(ModelLoadError, match=rf"incomplete .* folder: component\(s\) {component} missing"):
        load_pipeline(None, broken, device="cpu")


def test_sd3_without_t5_is_not_incomplete(sd3_dir, tmp_path):
    folder = tmp_path / "no-t5"
    shutil.copytree(sd3_dir, folder)
    for name in ("text_encoder_3", "tokenizer_3"):
        shutil.rmtree(folder / name)
    index = json.loads((folder / "model_index.json").read_text())
    index.update(text_encoder_3=[None, None], tokenizer_3=[None, None])
    (folder / "model_index.json").write_text(json.dumps(index))
    pipe = load_pipeline(None, folder, device="cpu", text_encoder_3=None, tokenizer_3=None)  # as diffusers wants
    assert pipe.text_encoder_3 is None and model_family(pipe) == "sd3"


def test_required_component_null_in_the_index(flux_dir, tmp_path):
    folder = tmp_path / "null-t5"
    shutil.copytree(flux_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["text_encoder_2"] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=r"FLUX\.1 folder: component\(s\) text_encoder_2 missing"):
        load_pipeline(None, folder, device="cpu")


def test_editkit_pipeline_folder_with_null_components(sd15_pipe, tmp_path):
    """An editkit pipeline saved with SD weights lists text_encoder_2 as null: not a missing component."""
    from pipelines.style_transfer import StyleTransferPipeline

    StyleTransferPipeline.from_pipe(sd15_pipe).save_pretrained(tmp_path / "stylize", safe_serialization=True)
    assert json.loads((tmp_path / "stylize" / "model_index.json").read_text())["text_encoder_2"] == [None, None]
    pipe = load_pipeline(StyleTransferPipeline, tmp_path / "stylize", device="cpu")
    assert model_family(pipe) == "sd"


def test_optional_components_may_be_null(sdxl_dir, tmp_path):
    """Components a family does not require (SDXL's first text encoder: absent from the refiner) may be null."""
    folder = tmp_path / "refiner-like"
    shutil.copytree(sdxl_dir, folder)
    for name in ("text_encoder", "tokenizer"):
        shutil.rmtree(folder / name)
    index = json.loads((folder / "model_index.json").read_text())
    index.update(text_encoder=[None, None], tokenizer=[None, None])
    (folder / "model_index.json").write_text(json.dumps(index))
    pipe = load_pipeline(None, folder, device="cpu")
    assert pipe.text_encoder is None and model_family(pipe) == "sdxl"


def _index_folder(folder: Path, index: dict, unet_config: dict | None = None) -> Path:
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps(index))
    if unet_config is not None:
        (folder / "unet").mkdir()
        (folder / "unet" / "config.json").write_text(json.dumps(unet_config))
    return folder


@pytest.mark.parametrize(
    ("index", "unet_config", "message"),
    [
        ({"_class_name": "PixArtAlphaPipeline", "transformer": ["diffusers", "PixArtTransformer2DModel"]}, None,
         r"unsupported model family: PixArtAlphaPipeline \(transformer PixArtTransformer2DModel\)"),
        ({"_class_name": "KandinskyV22Pipeline", "unet": ["diffusers", "UNet2DConditionModel"]},
         {"addition_embed_type": "image"}, r"KandinskyV22Pipeline \(UNet conditioning 'image'\)"),
        ({"_class_name": "AudioLDMPipeline", "vae": ["diffusers", "AutoencoderKL"]}, None,
         "no unet or transformer"),
    ],
    ids=["pixart", "kandinsky", "no-denoiser"],
)  # fmt: skip
def test_unsupported_family_folders(index, unet_config, message, tmp_path):
    folder = _index_folder(tmp_path / "model", index, unet_config)
    with pytest.raises(ModelLoadError, match=message):
        load_pipeline(None, folder, device="cpu")


def _checkpoint(path: Path, model_type: str | None, extra: tuple[str, ...] = ()) -> Path:
    """A safetensors file holding the key(s) diffusers recognises ``model_type`` by (tiny tensors)."""
    keys = CHECKPOINT_KEY_NAMES[model_type] if model_type else []
    keys = [keys] if isinstance(keys, str) else list(keys)
    save_file({key: torch.zeros(1) for key in [*keys[:1], *extra]}, str(path))
    return path


@pytest.mark.parametrize(
    ("model_type", "family"),
    [("v1", "sd"), ("v2", "sd"), ("xl_base", "sdxl"), ("sd3", "sd3"), ("sd35_large", "sd3"), ("flux", "flux")],
)
def test_single_file_family_from_keys(model_type, family, tmp_path):
    assert family_of_checkpoint(_checkpoint(tmp_path / "model.safetensors", model_type)) == family


@pytest.mark.parametrize(
    ("model_type", "extra", "message"),
    [
        (None, ("lora_unet_down_blocks_0.alpha",), "no Stable Diffusion, SD3 or FLUX.1 weights recognised"),
        ("flux2", (), "a flux2 checkpoint, an unsupported model family"),
        ("xl_refiner", (), "a xl_refiner checkpoint, an unsupported model family"),
    ],
)
def test_single_file_unsupported(model_type, extra, message, tmp_path):
    checkpoint = _checkpoint(tmp_path / "model.safetensors", model_type, extra)
    with pytest.raises(ModelLoadError, match=message):
        load_pipeline(None, checkpoint, device="cpu")


def test_single_file_loads_with_the_family_pipeline(flux_pipe, tmp_path, monkeypatch):
    """A FLUX single file goes to FluxPipeline.from_single_file (stood in for: real ones need Hub configs)."""
    calls = []

    def from_single_file(cls, path, **kwargs):
        calls.append((cls, path))
        return flux_pipe

    monkeypatch.setattr(FluxPipeline, "from_single_file", classmethod(from_single_file))
    checkpoint = _checkpoint(tmp_path / "flux1-dev.safetensors", "flux")
    assert load_pipeline(None, checkpoint, device="cpu") is flux_pipe
    assert calls == [(FluxPipeline, str(checkpoint))]


def test_supported_families_lists_every_family():
    assert supported_families() == [
        "sd: Stable Diffusion 1.x/2.x (StableDiffusionPipeline)",
        "sdxl: Stable Diffusion XL (StableDiffusionXLPipeline)",
        "sd3: Stable Diffusion 3 / 3.5 (StableDiffusion3Pipeline)",
        "flux: FLUX.1 (FluxPipeline)",
    ]
    assert FAMILIES["sd3"].denoiser == "SD3Transformer2DModel"


def test_env_lists_the_families(capsys):
    from editkit.cli import main

    assert main(["env"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if "model families" in line)
    assert "sd3: Stable Diffusion 3 / 3.5 (StableDiffusion3Pipeline)" in line
    assert "flux: FLUX.1 (FluxPipeline)" in line
