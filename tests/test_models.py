"""Tests for editkit.models: sources, safety refusals, offline errors, families, device and dtype."""

from __future__ import annotations

import time
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

from editkit import models
from editkit.errors import EditkitError, InputError, ModelLoadError
from editkit.models import choose_device, choose_dtype, is_v_prediction, load_pipeline, model_family
from editkit.testing import tiny_sd15_components, tiny_sd15_pipeline, tiny_sdxl_pipeline

HUB_ID = "editkit-tests/not-a-real-model"


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No Hub access and an empty Hugging Face home for every test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))


@pytest.fixture(scope="module")
def sd15_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("models") / "tiny-sd15"
    tiny_sd15_pipeline(path=folder)
    return folder


@pytest.fixture(scope="module")
def sdxl_pipe() -> StableDiffusionXLPipeline:
    return tiny_sdxl_pipeline()


def _no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models, "_mps_available", lambda: False)


# ----------------------------------------------------------------------------- loading


def test_load_local_folder(sd15_folder: Path) -> None:
    pipe = load_pipeline(StableDiffusionPipeline, sd15_folder, device="cpu")
    assert isinstance(pipe, StableDiffusionPipeline)
    assert pipe.device == torch.device("cpu") and pipe.unet.dtype == torch.float32
    reference = tiny_sd15_pipeline()
    assert torch.equal(pipe.unet.conv_in.weight, reference.unet.conv_in.weight)
    assert model_family(pipe) == "sd"


def test_load_local_folder_as_string_with_dtype(sd15_folder: Path) -> None:
    pipe = load_pipeline(StableDiffusionPipeline, str(sd15_folder), device="cpu", dtype="bf16")
    assert pipe.unet.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16


def test_folder_without_model_index(tmp_path: Path) -> None:
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelLoadError, match=r"has no model_index\.json"):
        load_pipeline(StableDiffusionPipeline, tmp_path, device="cpu")


def test_folder_of_another_family_refused_before_loading(flux_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(ModelLoadError, match=r"is a FLUX\.1 model; StableDiffusionPipeline runs on Stable Diffusion"):
        load_pipeline(StableDiffusionPipeline, flux_dir, device="cpu")


def test_folder_with_missing_weights(sd15_folder: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in sd15_folder.iterdir():
        if item.name != "unet":
            (broken / item.name).symlink_to(item)
    (broken / "unet").mkdir()
    (broken / "unet" / "config.json").write_text((sd15_folder / "unet" / "config.json").read_text())
    with pytest.raises(ModelLoadError, match=r"cannot load model .*safetensors") as caught:
        load_pipeline(StableDiffusionPipeline, broken, device="cpu")
    assert isinstance(caught.value.__cause__, OSError)  # the details stay reachable for debugging


@pytest.mark.parametrize("name", ["model.ckpt", "model.pt", "model.bin", "model.pth"])
def test_pickle_checkpoints_refused(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"\x80\x04 not unpickled")
    with pytest.raises(ModelLoadError, match=r"only \.safetensors single-file checkpoints"):
        load_pipeline(StableDiffusionPipeline, tmp_path / name, device="cpu")


@pytest.mark.parametrize("model", ["./missing-folder", "~/missing/model", "models/sd/v1", "x.safetensors"])
def test_missing_local_path(model: str) -> None:
    with pytest.raises(ModelLoadError, match="no such model folder or file"):
        load_pipeline(StableDiffusionPipeline, model, device="cpu")


def test_remote_code_and_pickles_never_allowed(sd15_folder: Path) -> None:
    with pytest.raises(InputError, match="never trusts remote code"):
        load_pipeline(StableDiffusionPipeline, sd15_folder, device="cpu", trust_remote_code=True)
    with pytest.raises(InputError, match="safetensors weights only"):
        load_pipeline(StableDiffusionPipeline, sd15_folder, device="cpu", use_safetensors=False)


def test_offline_hub_id_gives_one_clear_error() -> None:
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as caught:
        load_pipeline(StableDiffusionPipeline, HUB_ID, device="cpu")
    assert time.perf_counter() - start < 2.0
    assert str(caught.value) == (
        f"model '{HUB_ID}' is not in the local Hugging Face cache and the Hub cannot be reached (offline). "
        "Download it once with network access, or pass a local diffusers folder: --model /path/to/folder"
    )
    assert caught.value.__cause__ is None
    assert isinstance(caught.value, EditkitError)


def test_offline_errors_from_diffusers_are_translated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "_in_cache", lambda repo_id, kwargs: True)  # reach diffusers itself
    with pytest.raises(ModelLoadError, match="is not in the local Hugging Face cache") as caught:
        load_pipeline(StableDiffusionPipeline, HUB_ID, device="cpu", local_files_only=True)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def _repository_not_found() -> RepositoryNotFoundError:
    error = RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # skip its HTTP-response argument
    Exception.__init__(error, "404 Client Error. Repository Not Found")
    return error


def _unreachable() -> OSError:
    try:
        raise ConnectionError("[Errno -2] Name or service not known")
    except ConnectionError as connection_error:
        error = OSError("Cannot load model: not cached and an error occurred while fetching metadata")
        error.__cause__ = connection_error
        return error


@pytest.mark.parametrize(
    ("make_error", "message"),
    [
        (_repository_not_found, "was not found on the Hugging Face Hub; check the id"),
        (_unreachable, "is not in the local Hugging Face cache and the Hub cannot be reached"),
    ],
)
def test_hub_errors_translated(monkeypatch: pytest.MonkeyPatch, make_error, message: str) -> None:
    class HubPipeline:
        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            raise make_error()

    monkeypatch.setattr(models, "_in_cache", lambda repo_id, kwargs: False)
    with pytest.raises(ModelLoadError, match=message) as caught:
        load_pipeline(HubPipeline, HUB_ID, device="cpu", local_files_only=False)
    assert caught.value.__cause__ is None


class _SingleFilePipeline:
    """Stands in for a pipeline class: records how ``from_single_file`` was called."""

    calls: ClassVar[list[tuple[str, dict]]] = []
    error: ClassVar[Exception | None] = None

    @classmethod
    def from_single_file(cls, path: str, **kwargs):
        cls.calls.append((path, kwargs))
        if cls.error is not None:
            raise cls.error
        return tiny_sd15_pipeline()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        raise AssertionError("a single file must go through from_single_file")


def _sd_checkpoint(folder: Path) -> Path:
    """A safetensors file that an SD 1.x checkpoint's key names (diffusers' sentinel) make an "sd" one."""
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES
    from safetensors.torch import save_file

    checkpoint = folder / "model.safetensors"
    save_file({CHECKPOINT_KEY_NAMES["v1"]: torch.zeros(1)}, str(checkpoint))
    return checkpoint


def test_single_safetensors_file_uses_from_single_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint = _sd_checkpoint(tmp_path)
    monkeypatch.setattr(_SingleFilePipeline, "calls", [])
    pipe = load_pipeline(_SingleFilePipeline, checkpoint, device="cpu", config="some/config")
    assert model_family(pipe) == "sd"
    ((path, kwargs),) = _SingleFilePipeline.calls
    assert path == str(checkpoint)
    assert kwargs == {"dtype": torch.float32, "local_files_only": True, "config": "some/config"}


def test_single_file_offline_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint = _sd_checkpoint(tmp_path)
    monkeypatch.setattr(_SingleFilePipeline, "error", LocalEntryNotFoundError("not cached"))
    with pytest.raises(ModelLoadError, match="needs its diffusers config from the Hub"):
        load_pipeline(_SingleFilePipeline, checkpoint, device="cpu")


def test_load_sdxl_fp16_keeps_vae_force_upcast(tmp_path: Path, sdxl_pipe: StableDiffusionXLPipeline) -> None:
    sdxl_pipe.save_pretrained(tmp_path / "sdxl", safe_serialization=True)
    with pytest.warns(UserWarning, match="float16 on the CPU"):
        pipe = load_pipeline(StableDiffusionXLPipeline, tmp_path / "sdxl", device="cpu", dtype="fp16")
    assert model_family(pipe) == "sdxl"
    assert pipe.unet.dtype == torch.float16
    assert pipe.vae.config.force_upcast is True


# ----------------------------------------------------------------------------- families


def test_model_family(sdxl_pipe: StableDiffusionXLPipeline) -> None:
    sd_unet = tiny_sd15_components()["unet"]
    assert model_family(sd_unet) == "sd"
    assert model_family(sdxl_pipe) == "sdxl"
    assert model_family(sdxl_pipe.unet) == "sdxl"


def test_unsupported_families() -> None:
    class FluxLikePipeline:
        transformer = torch.nn.Linear(2, 2)

    with pytest.raises(ModelLoadError, match="unsupported model family: FluxLikePipeline; editkit supports"):
        model_family(FluxLikePipeline())
    unet = tiny_sd15_components()["unet"]
    unet.register_to_config(addition_embed_type="image")
    with pytest.raises(ModelLoadError, match="UNet conditioning 'image'"):
        model_family(unet)


def test_is_v_prediction() -> None:
    assert not is_v_prediction(tiny_sd15_components()["scheduler"])
    assert is_v_prediction(tiny_sd15_components(prediction_type="v_prediction")["scheduler"])


# ----------------------------------------------------------------------------- device and dtype


def test_choose_device_defaults_to_cpu_without_accelerators(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_gpu(monkeypatch)
    assert choose_device() == torch.device("cpu")
    assert choose_device("cpu") == torch.device("cpu")
    assert choose_device(torch.device("cpu")) == torch.device("cpu")


def test_choose_device_prefers_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert choose_device() == torch.device("cuda")
    assert choose_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(InputError, match="does not exist"):
        choose_device("cuda:3")


def test_choose_device_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_gpu(monkeypatch)
    with pytest.raises(InputError, match=r"CUDA is not available.*--device cpu"):
        choose_device("cuda")
    with pytest.raises(InputError, match="MPS is not available"):
        choose_device("mps")
    with pytest.raises(InputError, match="unknown device 'gpu0'"):
        choose_device("gpu0")
    with pytest.raises(InputError, match="unsupported device 'meta'"):
        choose_device("meta")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("fp32", torch.float32),
        ("float32", torch.float32),
        ("bf16", torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        ("BF16", torch.bfloat16),
        ("torch.float32", torch.float32),
        (torch.bfloat16, torch.bfloat16),
    ],
)
def test_choose_dtype_names(name: str | torch.dtype, expected: torch.dtype) -> None:
    assert choose_dtype("cpu", name) == expected


def test_choose_dtype_defaults_and_errors() -> None:
    assert choose_dtype("cpu") == torch.float32
    assert choose_dtype(torch.device("cuda")) == torch.float16
    assert choose_dtype("mps") == torch.float32
    assert choose_dtype("cuda", "fp16") == torch.float16
    with pytest.warns(UserWarning, match="float16 on the CPU"):
        assert choose_dtype("cpu", "float16") == torch.float16
    for bad in ("int8", "fp64", torch.float64):
        with pytest.raises(InputError, match="unsupported dtype"):
            choose_dtype("cpu", bad)
