"""diffusers' pipeline conventions for editkit's pipelines: image inputs, outputs, batches, callbacks.

One place for what every pipeline shares with diffusers' stock pipelines, so the three behave alike:

- :func:`prepare_images`: PIL images, paths, numpy arrays ``(H, W, C)`` / ``(B, H, W, C)`` in
  [0, 1], torch tensors ``(C, H, W)`` / ``(B, C, H, W)`` in [0, 1] and lists of any of these, as
  ``VaeImageProcessor.preprocess`` reads them (a tensor with negative values is read as [-1, 1],
  with diffusers' FutureWarning; a tensor with the VAE's latent channels is taken as latents).
- :func:`postprocess`: ``output_type`` ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
- :func:`batch_size` / :func:`check_generators`: prompt lists, ``num_images_per_prompt`` and one
  generator per output image.
- :class:`DiffusersPipelineMixin` and :func:`step_callback`: ``callback_on_step_end`` with
  ``callback_on_step_end_tensor_inputs`` and the properties diffusers' callbacks read.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import PIL.Image
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import FromSingleFileMixin
from diffusers.pipelines.pipeline_utils import StableDiffusionMixin
from diffusers.utils.torch_utils import randn_tensor

from editkit.conditioning import PromptEncodingMixin, as_prompt_list
from editkit.errors import InputError
from editkit.image import fit_size, load_image
from editkit.inversion import decode_latents, encode_image_latents

__all__ = [
    "OUTPUT_TYPES",
    "DiffusersPipelineMixin",
    "as_list",
    "as_prompt_list",
    "batch_size",
    "broadcast",
    "callback_tensor_names",
    "check_alpha_scheduler",
    "check_generators",
    "check_num_images",
    "check_output_type",
    "image_latents",
    "is_latents",
    "mask_batch_tensor",
    "phase_label",
    "pipeline_images",
    "pixel_size",
    "postprocess",
    "prepare_images",
    "prepare_noise",
    "scheduler_step_kwargs",
    "split_image_batch",
    "step_callback",
    "unet_call_kwargs",
]

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


# -- image inputs --------------------------------------------------------------------------------
def prepare_images(
    images,
    *,
    vae_scale_factor: int = 8,
    height: int | None = None,
    width: int | None = None,
    latent_channels: int = 4,
    name: str = "image",
) -> torch.Tensor:
    """Any diffusers image input -> a ``(batch, 3, H, W)`` float tensor in [-1, 1], or latents as given.

    Every item of a batch is kept. Without ``height``/``width`` the first image's size is rounded
    to the nearest multiple of ``vae_scale_factor`` (diffusers rounds down; editkit keeps the
    nearer size, as ``editkit.image.fit_size`` does everywhere); all items are resized to it
    (PIL: Lanczos; arrays and tensors: diffusers' interpolation). PIL images and paths go through
    ``editkit.image.load_image`` (EXIF orientation, alpha on white, size limits). 8-bit numpy
    arrays are scaled by 1/255 (diffusers expects floats in [0, 1]). Grayscale becomes RGB.
    A tensor with ``latent_channels`` channels is returned unchanged: the caller treats it as latents.
    """
    items = _image_items(images, name)
    first = items[0]
    if isinstance(first, torch.Tensor) and first.shape[-3] == latent_channels and latent_channels != 3:
        return torch.cat([item if item.ndim == 4 else item[None] for item in items])
    if (height is None) != (width is None):
        raise InputError(f"give both height and width for the {name}, or neither")
    if height is None:
        width, height = fit_size(*_item_size(first), multiple=vae_scale_factor)
    if height % vae_scale_factor or width % vae_scale_factor:
        raise InputError(f"{name} size {width}x{height} must be a multiple of {vae_scale_factor}")
    processor = VaeImageProcessor(vae_scale_factor=vae_scale_factor, vae_latent_channels=latent_channels)
    pixels = processor.preprocess(items[0] if len(items) == 1 else items, height=height, width=width).float()
    return pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels


def pipeline_images(pipe, images, *, height: int | None = None, width: int | None = None, name: str = "image"):
    """:func:`prepare_images` with ``pipe``'s VAE factor and latent channels."""
    channels = pipe.vae.config.latent_channels
    return prepare_images(
        images, vae_scale_factor=pipe.vae_scale_factor, height=height, width=width, latent_channels=channels, name=name
    )


def image_latents(pipe, batch: torch.Tensor) -> torch.Tensor:
    """A prepared batch -> scaled latents: given latents as they are, else the VAE's (posterior mean)."""
    device = pipe._execution_device
    return batch.to(device) if is_latents(batch, pipe.vae) else encode_image_latents(pipe.vae, batch.to(device))


def is_latents(batch: torch.Tensor, vae) -> bool:
    """Whether a prepared batch holds latents (the VAE's latent channels) rather than RGB pixels."""
    return batch.shape[1] == vae.config.latent_channels and batch.shape[1] != 3


def pixel_size(batch: torch.Tensor, vae, vae_scale_factor: int) -> tuple[int, int]:
    """(height, width) in pixels of a prepared image or latent batch."""
    factor = vae_scale_factor if is_latents(batch, vae) else 1
    return int(batch.shape[-2]) * factor, int(batch.shape[-1]) * factor


def as_list(value) -> list:
    """None -> [], a list or tuple -> a list, anything else -> [value]."""
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def _image_items(images, name: str) -> list:
    """Flatten the input into PIL images, (H, W, C)/(B, H, W, C) arrays or (C, H, W)/(B, C, H, W) tensors."""
    if images is None:
        raise InputError(f"an {name} is needed")
    items = list(images) if isinstance(images, list | tuple) else [images]
    if not items:
        raise InputError(f"the {name} list is empty")
    items = [_image_item(item, name) for item in items]
    kinds = {type(item) if not isinstance(item, PIL.Image.Image) else PIL.Image.Image for item in items}
    if len(kinds) > 1:
        raise InputError(f"an {name} list must hold one kind (PIL, numpy or torch), got a mix")
    if isinstance(items[0], torch.Tensor | np.ndarray) and len({_item_size(i) for i in items}) > 1:
        raise InputError(f"the {name} arrays/tensors of a list must share one size")
    return items


def _image_item(item, name: str):
    if isinstance(item, str | os.PathLike | PIL.Image.Image):
        return load_image(item)
    if isinstance(item, np.ndarray):
        return _check_array(item, name)
    if isinstance(item, torch.Tensor):
        return _check_tensor(item, name)
    raise InputError(f"{name} must be a PIL image, a path, a numpy array or a torch tensor, got {type(item).__name__}")


def _check_array(array: np.ndarray, name: str) -> np.ndarray:
    if array.ndim == 2:
        array = array[..., None]  # (H, W) grayscale -> (H, W, 1)
    if array.ndim not in (3, 4) or array.shape[-1] not in (1, 3):
        raise InputError(f"a numpy {name} must be (H, W, 3) or (B, H, W, 3), got shape {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if not np.issubdtype(array.dtype, np.floating):
        raise InputError(f"a numpy {name} must be float in [0, 1] or uint8, got dtype {array.dtype}")
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
        raise InputError(f"a float numpy {name} must hold finite values in [0, 1]")
    return array.astype(np.float32)


def _check_tensor(tensor: torch.Tensor, name: str) -> torch.Tensor:
    if tensor.ndim == 2:
        tensor = tensor[None]  # (H, W) grayscale -> (1, H, W)
    if tensor.ndim not in (3, 4):
        raise InputError(f"a tensor {name} must be (C, H, W) or (B, C, H, W), got shape {tuple(tensor.shape)}")
    if tensor.shape[-3] not in (1, 3, 4):
        raise InputError(f"a tensor {name} needs 1 or 3 channels (or the VAE's latent channels), got {tensor.shape}")
    tensor = tensor.float()
    if tensor.shape[-3] != 4 and (not torch.isfinite(tensor).all() or tensor.min() < -1 or tensor.max() > 1):
        raise InputError(f"a tensor {name} must hold finite values in [0, 1] (or [-1, 1], deprecated in diffusers)")
    return tensor


def _item_size(item) -> tuple[int, int]:
    """(width, height) of a PIL image, an array (.., H, W, C) or a tensor (.., C, H, W)."""
    if isinstance(item, PIL.Image.Image):
        return item.size
    if isinstance(item, np.ndarray):
        return int(item.shape[-2]), int(item.shape[-3])
    return int(item.shape[-1]), int(item.shape[-2])


# -- outputs -------------------------------------------------------------------------------------
def check_output_type(output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise InputError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")


def postprocess(vae, latents: torch.Tensor, output_type: str):
    """Latents -> ``output_type``: PIL list, (B, H, W, 3) numpy or (B, 3, H, W) torch in [0, 1], or latents."""
    check_output_type(output_type)
    if output_type == "latent":
        return latents
    return VaeImageProcessor().postprocess(decode_latents(vae, latents), output_type=output_type)


# -- batches -------------------------------------------------------------------------------------
def batch_size(name_counts: dict[str, int]) -> int:
    """The common batch size of inputs that each hold 1 (broadcast) or the same number of items."""
    sizes = {count for count in name_counts.values() if count != 1}
    if len(sizes) > 1:
        listed = ", ".join(f"{name}: {count}" for name, count in name_counts.items())
        raise InputError(f"batched inputs must have the same length (or length 1); got {listed}")
    return sizes.pop() if sizes else 1


def broadcast(lists: dict[str, list], others: dict[str, int] | None = None) -> dict[str, list]:
    """Lists of one item (broadcast) or of the batch size, each returned at the batch size.

    ``others`` adds counts that must agree too (e.g. rows of given embeddings).
    """
    size = batch_size({**{k: len(v) for k, v in lists.items()}, **(others or {})})
    return {k: v * size if len(v) == 1 else list(v) for k, v in lists.items()}


def prepare_noise(shape: tuple[int, ...], generator, device, dtype, latents: torch.Tensor | None) -> torch.Tensor:
    """diffusers' ``prepare_latents`` noise: drawn at once for the batch (one generator per row for a list)."""
    if latents is None:
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    if tuple(latents.shape) != tuple(shape):
        raise InputError(f"latents must have the shape {shape} (one per output image), got {tuple(latents.shape)}")
    return latents.to(device=device, dtype=dtype)


def scheduler_step_kwargs(scheduler, generator, eta: float) -> dict:
    """``generator`` and ``eta`` for ``scheduler.step`` where it takes them (``prepare_extra_step_kwargs``)."""
    params = set(inspect.signature(scheduler.step).parameters)
    return {k: v for k, v in {"generator": generator, "eta": eta}.items() if k in params}


def check_num_images(num_images_per_prompt: int) -> None:
    if not isinstance(num_images_per_prompt, int) or isinstance(num_images_per_prompt, bool):
        raise InputError(f"num_images_per_prompt must be an integer, got {num_images_per_prompt!r}")
    if num_images_per_prompt < 1:
        raise InputError(f"num_images_per_prompt must be at least 1, got {num_images_per_prompt}")


def check_generators(generator, count: int) -> None:
    """A list of generators must hold one generator per output image, as in diffusers."""
    if isinstance(generator, list) and len(generator) != count:
        raise InputError(f"got {len(generator)} generators for {count} output images; pass one per image")


def check_alpha_scheduler(scheduler, method: str) -> None:
    """Refuse, before any model work, a scheduler without a DDPM alpha-bar table (EDM/sigma-only ones)."""
    if getattr(scheduler, "alphas_cumprod", None) is None:
        raise InputError(
            f"{method} needs a scheduler with DDPM alphas (alphas_cumprod), e.g. DDIMScheduler; "
            f"{type(scheduler).__name__} has none (EDM-type schedulers are not supported)"
        )


@contextlib.contextmanager
def unet_call_kwargs(unet, cross_attention_kwargs: dict | None) -> Iterator[None]:
    """Every UNet call inside gets ``cross_attention_kwargs`` (LoRA ``{"scale": ...}``, ``ip_adapter_masks``).

    A forward pre-hook rather than an argument threaded through each call, so the inversion and
    guidance passes get them too; an explicit ``cross_attention_kwargs`` of a call wins.
    """
    if not cross_attention_kwargs:
        yield
        return

    def add_kwargs(module, args, kwargs):
        kwargs.setdefault("cross_attention_kwargs", dict(cross_attention_kwargs))
        return args, kwargs

    handle = unet.register_forward_pre_hook(add_kwargs, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


# -- callbacks and properties --------------------------------------------------------------------
class DiffusersPipelineMixin(PromptEncodingMixin, StableDiffusionMixin, FromSingleFileMixin):
    """diffusers' pipeline conventions for editkit's pipelines (put before ``DiffusionPipeline``).

    ``encode_prompt``; ``StableDiffusionMixin`` (FreeU, ``fuse_qkv_projections``, which editkit's
    processor supports); ``FromSingleFileMixin``; the run state diffusers' callbacks read
    (``guidance_scale``, ``num_timesteps``, ``interrupt``); and a ``from_pretrained`` that skips the
    SD components the pipeline never runs.

    A callback may set ``pipe._interrupt = True`` to stop the loop after the current step (the
    pipeline then decodes what it has), as in diffusers' Stable Diffusion pipelines.
    """

    #: diffusers' SD components the pipeline accepts (as None) but never runs; never loaded.
    _unused_components: tuple[str, ...] = ()
    _guidance_scale: float = 1.0
    _num_timesteps: int = 0
    _interrupt: bool = False

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """diffusers' ``from_pretrained``, without loading the components this pipeline never runs.

        They are listed (``_unused_components``, e.g. the safety checker) so that
        ``StableDiffusionPipeline.from_pipe(this_pipeline)`` works without extra arguments.
        """
        for name in cls._unused_components:
            kwargs.setdefault(name, None)
        return super().from_pretrained(*args, **kwargs)

    def compile_unet(self, *, mode: str | None = None, backend="inductor", fullgraph: bool = False, **options):
        """``torch.compile`` the UNet in place (``editkit.acceleration.compile_unet``); returns the pipeline.

        The same as diffusers' ``pipe.unet = torch.compile(pipe.unet)``, which also works, but the
        module object stays the same (attached controllers, ``attn_processors`` and hooks unchanged).
        ``mode`` is torch.compile's (``"reduce-overhead"`` adds CUDA graphs). The first call of each
        phase pays the compilation (tens of seconds for SD 1.5 with inductor); controllers keep the
        same graphs from step to step, so later steps and later calls at the same size reuse them.
        """
        from editkit.acceleration import compile_unet

        compile_unet(self.unet, mode=mode, backend=backend, fullgraph=fullgraph, **options)
        return self

    def progress_bar(self, iterable=None, total=None, desc: str | None = None):
        """diffusers' progress bar, named after the phase it counts (``desc``: "inverting content", "generating").

        The name shows in terminals and in gradio's progress (``track_tqdm``). A ``desc`` set with
        ``set_progress_bar_config`` wins, and ``disable=True`` still disables the bar.
        """
        config = getattr(self, "_progress_bar_config", None)
        if desc is None or not isinstance(config, dict | None) or "desc" in (config or {}):
            return super().progress_bar(iterable=iterable, total=total)
        self._progress_bar_config = {**(config or {}), "desc": desc}  # diffusers builds the bar from this dict
        try:
            return super().progress_bar(iterable=iterable, total=total)
        finally:
            self._progress_bar_config = config if config is not None else {}

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    def _begin_run(self, guidance_scale: float, num_timesteps: int) -> None:
        self._guidance_scale, self._num_timesteps, self._interrupt = float(guidance_scale), int(num_timesteps), False


def phase_label(phase: str, index: int, count: int) -> str:
    """A progress bar's name for item ``index`` (0-based) of ``count``: "inverting style 1/2", or the phase alone."""
    return f"{phase} {index + 1}/{count}" if count > 1 else phase


def callback_tensor_names(pipe, callback, tensor_inputs: Sequence[str] | None) -> list[str]:
    """The tensor names passed to ``callback``: a ``PipelineCallback``'s own, else the given ones, checked."""
    if isinstance(callback, PipelineCallback | MultiPipelineCallbacks):
        tensor_inputs = callback.tensor_inputs
    names = list(tensor_inputs or [])
    unknown = [n for n in names if n not in pipe._callback_tensor_inputs]
    if unknown:
        raise InputError(f"callback_on_step_end_tensor_inputs {unknown} not among {pipe._callback_tensor_inputs}")
    if callback is not None and not callable(callback):
        raise InputError(f"callback_on_step_end must be callable, got {type(callback).__name__}")
    return names


def step_callback(
    pipe, callback: Callable | None, step: int, timestep, tensors: dict[str, object], names: Sequence[str]
) -> dict[str, object]:
    """Call ``callback(pipe, step, timestep, {name: tensor})``; returns ``tensors`` updated by what it returned."""
    if callback is None:
        return tensors
    returned = callback(pipe, step, timestep, {name: tensors[name] for name in names}) or {}
    if not isinstance(returned, dict):
        raise InputError(f"callback_on_step_end must return a dict, got {type(returned).__name__}")
    return {**tensors, **{k: v for k, v in returned.items() if k in tensors}}


def split_image_batch(image) -> list:
    """A batched (4-d) tensor / array is several images; anything else is one (style transfer's styles)."""
    if isinstance(image, torch.Tensor | np.ndarray) and image.ndim == 4:
        return [image[i : i + 1] for i in range(image.shape[0])]
    return [image]


def mask_batch_tensor(mask) -> torch.Tensor | None:
    """A mask (H, W), (1, H, W) or (B, 1, H, W) as a float (B, 1, H, W) tensor; None stays None."""
    if mask is None:
        return None
    mask = torch.as_tensor(mask, dtype=torch.float32)
    while mask.ndim < 4:
        mask = mask[None]
    return mask
