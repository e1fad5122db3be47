"""Loading pipelines: device and dtype choice, model sources, family checks and clear errors.

A model is a Hugging Face Hub id (``stable-diffusion-v1-5/stable-diffusion-v1-5``), a local
diffusers folder (one with ``model_index.json``, as written by ``save_pretrained``) or a
single-file ``.safetensors`` checkpoint. Weights are always loaded from safetensors: pickle-based
files (``.ckpt``, ``.bin``, ...) can run code when loaded and are refused, and remote code is never
trusted. The family (SD 1.x/2.x, SDXL, SD3/SD3.5, FLUX.1: :mod:`editkit.backbones.families`) is
recognised before weights are read. Failures the user can fix raise :class:`~editkit.errors.ModelLoadError` (sources) or
:class:`~editkit.errors.InputError` (options), each with a one-line message naming the fix.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
import socket
import warnings
from pathlib import Path
from typing import Any, TypeVar

import torch

from editkit.backbones.families import (
    FAMILIES,
    SUPPORTED_FAMILIES,
    UNET_FAMILIES,
    family_of_checkpoint,
    family_of_index,
    family_of_model,
    missing_components,
    read_index,
    read_json,
    supported_families,
)
from editkit.errors import EditkitError, InputError, ModelLoadError
from editkit.safefiles import is_pickle

__all__ = [
    "DEFAULT_SD_MODEL",
    "SUPPORTED_FAMILIES",
    "choose_device",
    "choose_dtype",
    "is_v_prediction",
    "load_pipeline",
    "model_family",
    "model_source_family",
    "source_denoiser_config",
    "source_family",
    "supported_families",
]

logger = logging.getLogger(__name__)

#: The model every command and the app load when none is given.
DEFAULT_SD_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"

DTYPES = {
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")
SINGLE_FILE_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
OFFLINE_MESSAGE = (
    "model '{model}' is not in the local Hugging Face cache and the Hub cannot be reached (offline). "
    "Download it once with network access, or pass a local diffusers folder: --model /path/to/folder"
)
OFFLINE_SINGLE_FILE_MESSAGE = (
    "{model}: a single-file checkpoint needs its diffusers config from the Hub, which cannot be reached "
    "(offline) and is not cached; pass config=<local diffusers folder> or use a diffusers folder"
)
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
PipelineT = TypeVar("PipelineT")
_TRUE = ("1", "true", "yes", "on")
# HTTP client modules (optional imports) and their "could not reach the server" exceptions.
_HTTP_CONNECTION_ERRORS = (
    ("httpx2", ("TransportError",)),
    ("httpx", ("TransportError",)),
    ("requests", ("ConnectionError", "Timeout")),
)


def choose_device(device: str | torch.device | None = None) -> torch.device:
    """The device to run on: the given one (checked to exist), else CUDA, else MPS, else CPU."""
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if resolved.type not in DEVICE_TYPES:
        raise InputError(f"unsupported device {device!r}; use cpu, cuda, cuda:N or mps")
    _check_available(resolved)
    return resolved


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def _check_available(device: torch.device) -> None:
    """Raise an InputError when ``device`` is not present on this machine."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(
                f"device '{device}' requested but CUDA is not available (no GPU or a CPU-only torch); use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"device '{device}' does not exist: {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not _mps_available():
        raise InputError("device 'mps' requested but Apple MPS is not available; use --device cpu")
    elif device.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise InputError("device 'xpu' requested but no Intel XPU is available; use --device cpu")


def choose_dtype(device: str | torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """The weights dtype: the given one (fp16, bf16 or fp32), else float16 on CUDA and float32 elsewhere.

    float16 on the CPU is allowed but slow and poorly supported, so it warns.
    """
    device = torch.device(device)
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        resolved = dtype if dtype in DTYPES.values() else None
    else:
        resolved = DTYPES.get(str(dtype).lower().removeprefix("torch."))
    if resolved is None:
        raise InputError(f"unsupported dtype {dtype!r}; use fp16, bf16 or fp32")
    if resolved == torch.float16 and device.type == "cpu":
        warnings.warn("float16 on the CPU is slow and some operations lack it; fp32 is advised", stacklevel=2)
    return resolved


def model_family(model: Any) -> str:
    """``"sd"``, ``"sdxl"``, ``"sd3"`` (SD3 / SD3.5) or ``"flux"`` for a pipeline, UNet or transformer.

    A ``torch.compile`` wrapper is seen through; anything else (a PixArt transformer, a UNet with
    other added conditioning) raises ModelLoadError. See :mod:`editkit.backbones.families`.
    """
    return family_of_model(model)


def is_v_prediction(scheduler: Any) -> bool:
    """Whether the scheduler (and so the model) predicts velocity v rather than noise epsilon."""
    return scheduler.config.get("prediction_type", "epsilon") == "v_prediction"


def load_pipeline(
    pipeline_class: type[PipelineT] | None,
    model: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    variant: str | None = None,
    local_files_only: bool | None = None,
    **kwargs: Any,
) -> PipelineT:
    """Load ``pipeline_class`` from a Hub id, a diffusers folder or a ``.safetensors`` file, on ``device``.

    ``pipeline_class=None`` loads the family's own diffusers pipeline (``StableDiffusion3Pipeline``
    for an SD3 folder, ``FluxPipeline`` for FLUX, ...). The model's family is recognised before any
    weights are read (folder index, cached Hub index, checkpoint keys): a UNet pipeline given an
    MM-DiT model (or the reverse) and a folder with a missing component are ModelLoadErrors naming
    the cause. ``local_files_only=None`` follows ``HF_HUB_OFFLINE``. Extra ``kwargs`` go to
    ``from_pretrained`` (or ``from_single_file``, e.g. ``config=``). The SDXL VAE keeps its
    ``force_upcast`` behaviour in float16. Raises ModelLoadError for anything about the model,
    InputError for bad options.
    """
    if kwargs.get("trust_remote_code") or kwargs.get("use_safetensors") is False:
        raise InputError("editkit loads safetensors weights only and never trusts remote code")
    kwargs.pop("trust_remote_code", None)
    kwargs.pop("use_safetensors", None)
    device = choose_device(device)
    dtype = choose_dtype(device, dtype)
    kind, source = _resolve_source(model)
    offline = _offline(local_files_only)
    if kind == "hub" and offline and not _in_cache(source, kwargs):
        raise ModelLoadError(OFFLINE_MESSAGE.format(model=source))
    family = source_family(kind, source, kwargs)
    if kind == "folder":
        _check_components(Path(source), family)
    pipeline_class = _pipeline_class_for(pipeline_class, family, model)
    try:
        if kind == "file":
            if variant is not None:
                raise InputError("variant applies to diffusers folders and Hub ids, not single files")
            pipe = pipeline_class.from_single_file(str(source), dtype=dtype, local_files_only=offline, **kwargs)
        else:
            if kind == "folder":
                kwargs = {**_null_components(Path(source), pipeline_class), **kwargs}
            pipe = pipeline_class.from_pretrained(
                str(source), dtype=dtype, variant=variant, use_safetensors=True, local_files_only=offline, **kwargs
            )
    except EditkitError:
        raise
    except Exception as error:
        translated, cause = _translate(error, str(source), kind, kwargs)
        raise translated from cause
    family = model_family(pipe)
    _note_vae_upcast(pipe, family, dtype)
    logger.info("loaded %s (%s, %s) on %s", model, family, dtype, device)
    return pipe.to(device, silence_dtype_warnings=True)  # fp16 on the CPU: choose_dtype warned once already


def _null_components(folder: Path, pipeline_class: type) -> dict[str, None]:
    """Components the folder's index lists as null (e.g. a model trained without T5) that ``pipeline_class``
    takes: passed as None, which diffusers requires for a null component it does not count as optional."""
    import inspect

    parameters = inspect.signature(pipeline_class.__init__).parameters
    index = read_index(folder)
    return {
        name: None
        for name, entry in index.items()
        if not name.startswith("_") and name in parameters and isinstance(entry, list) and None in entry
    }


def source_family(kind: str, source: str | Path, kwargs: dict[str, Any] | None = None) -> str | None:
    """The family of a resolved model source before loading it; None for a Hub repo not in the cache."""
    if kind == "file":
        return family_of_checkpoint(Path(source))
    if kind == "folder":
        return _folder_family(Path(source))
    from huggingface_hub import try_to_load_from_cache

    kwargs = kwargs or {}
    cached = {
        name: try_to_load_from_cache(
            str(source), name, cache_dir=kwargs.get("cache_dir"), revision=kwargs.get("revision")
        )
        for name in ("model_index.json", "unet/config.json")
    }
    if not isinstance(cached["model_index.json"], str):
        return None
    index = read_json(Path(cached["model_index.json"]))
    unet_config = read_json(Path(cached["unet/config.json"])) if isinstance(cached["unet/config.json"], str) else None
    return family_of_index(index, f"{source} (model_index.json)", unet_config)


def model_source_family(model: str | os.PathLike) -> str | None:
    """The family of a model path / Hub id before loading it (None: a Hub repo not in the cache yet).

    ModelLoadError for a missing path, a pickle, or an unsupported family."""
    kind, source = _resolve_source(model)
    return source_family(kind, source)


def source_denoiser_config(model: str | os.PathLike, denoiser: str = "transformer") -> dict | None:
    """``denoiser/config.json`` of a diffusers folder or a cached Hub repo, read without loading the model.

    None where there is none to read: a single-file checkpoint, a Hub repo not in the cache, a folder
    without that config (a malformed one is left for loading to report). ModelLoadError as
    :func:`model_source_family` for a missing path or a pickle.
    """
    kind, source = _resolve_source(model)
    if kind == "file":
        return None
    if kind == "folder":
        path = Path(source) / denoiser / "config.json"
    else:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(str(source), f"{denoiser}/config.json")
        path = Path(cached) if isinstance(cached, str) else None
    if path is None or not path.is_file():
        return None
    try:
        config = read_json(path)
    except EditkitError:
        return None
    return config if isinstance(config, dict) else None


def _pipeline_class_for(pipeline_class: type | None, family: str | None, model: str | os.PathLike) -> type:
    """``pipeline_class`` checked against the model's family, or the family's own pipeline when None."""
    if pipeline_class is None:
        import diffusers

        # unknown before download (a Hub repo not cached yet): the class its model_index.json names
        return diffusers.DiffusionPipeline if family is None else getattr(diffusers, FAMILIES[family].pipeline)
    accepted = _accepted_families(pipeline_class)
    if family is not None and accepted is not None and family not in accepted:
        runs_on = " or ".join(FAMILIES[name].label for name in accepted)
        raise ModelLoadError(
            f"{os.fspath(model)} is a {FAMILIES[family].label} model; {pipeline_class.__name__} runs on "
            f"{runs_on} models only"
        )
    return pipeline_class


def _accepted_families(pipeline_class: type) -> tuple[str, ...] | None:
    """The families a pipeline class can load, from its ``unet`` / ``transformer`` parameter (None: unknown)."""
    import inspect

    try:
        parameters = inspect.signature(pipeline_class.__init__).parameters
    except (TypeError, ValueError):
        return None
    if "unet" in parameters:
        return UNET_FAMILIES
    if "transformer" in parameters:
        annotation = getattr(parameters["transformer"].annotation, "__name__", parameters["transformer"].annotation)
        found = tuple(name for name, family in FAMILIES.items() if family.denoiser == str(annotation).split(".")[-1])
        return found or None
    return None


def _resolve_source(model: str | os.PathLike) -> tuple[str, str | Path]:
    """Classify ``model`` as ("file", path), ("folder", path) or ("hub", id), checking local paths."""
    text = os.fspath(model)
    path = Path(text).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelLoadError(
            f"{path}: only .safetensors single-file checkpoints are loaded (pickle-based files can run code)"
        )
    if path.is_file():
        if path.suffix.lower() != SINGLE_FILE_SUFFIX:
            raise ModelLoadError(f"{path} is not a .safetensors checkpoint or a diffusers folder")
        if is_pickle(path):
            raise ModelLoadError(f"{path} is a pickle renamed .safetensors; pickle-based checkpoints can run code")
        return "file", path
    if path.is_dir():
        return "folder", path
    if isinstance(model, Path) or _looks_like_path(text):
        raise ModelLoadError(f"no such model folder or file: {text}")
    return "hub", text


def _looks_like_path(text: str) -> bool:
    """A string meant as a local path: ./x, ../x, /x, ~x, x.safetensors, or with separators but not org/name."""
    if text.startswith((".", "/", "~")) or text.lower().endswith(SINGLE_FILE_SUFFIX):
        return True
    separators = [sep for sep in (os.sep, os.altsep) if sep]
    return any(sep in text for sep in separators) and not _HUB_ID.match(text)


def _folder_family(folder: Path) -> str:
    """The family of a diffusers folder; ModelLoadError for no index or an unsupported family."""
    unet_config_file = folder / "unet" / "config.json"
    unet_config = read_json(unet_config_file) if unet_config_file.is_file() else None
    return family_of_index(read_index(folder), str(folder / "model_index.json"), unet_config)


def _check_components(folder: Path, family: str) -> None:
    """ModelLoadError naming the components a folder of ``family`` lacks (null or no subfolder)."""
    missing = missing_components(folder, read_index(folder), family)
    if missing:
        raise ModelLoadError(
            f"{folder} is an incomplete {FAMILIES[family].label} folder: component(s) {', '.join(missing)} "
            f"missing (no {missing[0]}/ subfolder or null in model_index.json); re-save or re-download the model"
        )


def _offline(local_files_only: bool | None) -> bool:
    """Whether to stay off the network: the explicit flag, else HF_HUB_OFFLINE."""
    if local_files_only is not None:
        return local_files_only
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE or bool(constants.HF_HUB_OFFLINE)


def _in_cache(repo_id: str, kwargs: dict[str, Any]) -> bool:
    """Whether the Hub repo's ``model_index.json`` is in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(
        repo_id, "model_index.json", cache_dir=kwargs.get("cache_dir"), revision=kwargs.get("revision")
    )
    return isinstance(found, str)


def _connection_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean the Hub could not be reached (or offline mode forbade it)."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    errors: list[type[BaseException]] = [
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        ConnectionError,
        TimeoutError,
        socket.gaierror,
    ]
    for module_name, names in _HTTP_CONNECTION_ERRORS:
        with contextlib.suppress(ImportError):
            module = importlib.import_module(module_name)
            errors += [getattr(module, name) for name in names if hasattr(module, name)]
    return tuple(errors)


def _chain(error: BaseException) -> list[BaseException]:
    """The error and its causes/contexts, outermost first."""
    seen: list[BaseException] = []
    while error is not None and error not in seen:
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen


def _is_offline(error: BaseException) -> bool:
    return any(isinstance(link, _connection_errors()) for link in _chain(error))


def _translate(
    error: Exception, model: str, kind: str, kwargs: dict[str, Any]
) -> tuple[ModelLoadError, Exception | None]:
    """One short ModelLoadError for a loading failure, and the cause worth chaining (None: no traceback)."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    chain = _chain(error)
    if kind != "folder" and any(isinstance(link, GatedRepoError) for link in chain):
        return ModelLoadError(f"model '{model}' is gated: accept its license on the Hub and run `hf auth login`"), None
    if kind == "hub" and any(isinstance(link, RepositoryNotFoundError) for link in chain):
        return ModelLoadError(f"model '{model}' was not found on the Hugging Face Hub; check the id"), None
    if kind == "hub" and (_is_offline(error) or not _in_cache(model, kwargs)):
        return ModelLoadError(OFFLINE_MESSAGE.format(model=model)), None
    if kind == "file" and _is_offline(error):
        return ModelLoadError(OFFLINE_SINGLE_FILE_MESSAGE.format(model=model)), None
    first_line = (str(error).strip().splitlines() or [""])[0][:300]
    return ModelLoadError(f"cannot load model '{model}': {type(error).__name__}: {first_line}"), error


def _note_vae_upcast(pipe: Any, family: str, dtype: torch.dtype) -> None:
    """Log that the SDXL VAE decodes in float32 under float16 (diffusers' force_upcast, left intact)."""
    vae = getattr(pipe, "vae", None)
    if family == "sdxl" and dtype == torch.float16 and vae is not None and vae.config.get("force_upcast"):
        logger.info("the SDXL VAE is upcast to float32 for decoding (force_upcast); pass an fp16-fix VAE to avoid it")
