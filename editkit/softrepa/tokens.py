"""Soft tokens: the learnable module, the attention controller that inserts them, the file format.

SoftREPA (arXiv 2503.08250) keeps the text-to-image model frozen and learns ``m`` soft text
tokens of width ``cross_attention_dim``. They are inserted right after the start-of-text token
in the cross-attention context of chosen sites (SD 1.x/2.x: down blocks; SDXL: down + mid), so
the context there is ``77 + m`` tokens long, in both classifier-free-guidance branches. An
optional time embedding (``time_buckets`` buckets over the training timesteps, ``t // 10`` for
100 buckets on the 0-999 scale) is added to the tokens.

The injector is the :class:`SoftTokens` method ``tokens_for(site, timestep)``. MM-DiT models
(SD3 / SD3.5, FLUX.1) have per-layer tokens prepended to the text stream of the first joint blocks:
:mod:`editkit.softrepa.mmdit_tokens`, a file ``kind`` of its own; :func:`read_soft_tokens` and
:func:`load_soft_tokens` dispatch on the kind and refuse tokens of another family.

Files are safetensors with the configuration in their metadata (format version, kind, ``m``,
sites, time buckets, token width, base model) and are validated against the UNet on load.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from pathlib import Path

import torch
from torch import nn

from editkit.attention import AttentionController, Site, attention_sites
from editkit.errors import InputError, ModelLoadError, NumericalError
from editkit.softrepa.files import (
    MAX_TOKEN_ABS,
    check_tensor,
    parse_int,
    parse_json,
    read_safetensors,
    refuse_unexpected,
    write_safetensors,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "TOKEN_INITS",
    "SoftTokenController",
    "SoftTokens",
    "check_token_family",
    "default_sites",
    "initial_tokens",
    "load_soft_tokens",
    "read_soft_tokens",
    "save_soft_tokens",
]

logger = logging.getLogger(__name__)

FORMAT_NAME = "editkit-softrepa"
FORMAT_VERSION = 2  # 2: time_layout (shared Embedding(buckets, width) by default); 1 files read as per-token
KIND_UNET_CONTEXT = "unet-cross-context"
KIND_MMDIT = "mmdit-text-stream"  # editkit.softrepa.mmdit_tokens
MMDIT_FAMILIES = ("sd3", "flux")  # the families whose tokens are KIND_MMDIT
TIME_SHARED = "shared"
TIME_PER_TOKEN = "per-token"
TIME_LAYOUTS = (TIME_SHARED, TIME_PER_TOKEN)
INIT_STD = 0.02
TOKEN_INIT_TEXT = "text"
TOKEN_INITS = (TOKEN_INIT_TEXT, "normal")
NUM_TRAIN_TIMESTEPS = 1000


class SoftTokens(nn.Module):
    """``m`` learnable context tokens (and an optional time embedding) for a set of sites.

    Args:
        tokens: initial tokens ``(m, width)``.
        sites: names of the cross-attention sites that receive the tokens.
        time_buckets: number of timestep buckets of the additive time embedding (0: none; the
            reference release uses 100, ``t // 10`` on the 0-999 scale).
        time_layout: ``"shared"`` (the reference: one vector per bucket, an ``Embedding(buckets,
            width)`` added to all m tokens alike, initialised N(0, 0.02)) or ``"per-token"``
            (editkit's earlier layout, kept as an option: ``(buckets, m, width)``, initialised 0).
        num_train_timesteps: the timestep scale the buckets divide (1000 for SD).
        base_model: the model the tokens were trained for (informational, stored in files).
        family: the model family they were trained on (``editkit.models.model_family``: ``"sd"``,
            ``"sdxl"``, ...), stored in files and checked on load; ``""`` when unknown (older files).
        generator: the generator of the time embedding's N(0, 0.02) initialisation.
    """

    kind = KIND_UNET_CONTEXT

    def __init__(
        self,
        tokens: torch.Tensor,
        sites: list[str],
        *,
        time_buckets: int = 0,
        time_layout: str = TIME_SHARED,
        num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
        base_model: str = "",
        family: str = "",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if tokens.ndim != 2:
            raise ValueError(f"soft tokens must be (m, width), got {tuple(tokens.shape)}")
        if time_layout not in TIME_LAYOUTS:
            raise ValueError(f"time layout must be one of {', '.join(TIME_LAYOUTS)}, not {time_layout!r}")
        if time_buckets < 0 or num_train_timesteps < 1:
            raise ValueError("time buckets must be >= 0 and num_train_timesteps >= 1")
        self.tokens = nn.Parameter(tokens.detach().clone().float())
        self.sites = list(sites)
        self.time_buckets = int(time_buckets)
        self.time_layout = time_layout
        self.num_train_timesteps = int(num_train_timesteps)
        self.base_model = base_model
        self.family = family
        self.time_embedding = None
        if self.time_buckets:
            shape = self.time_embedding_shape(self.time_buckets, self.num_tokens, self.width, time_layout)
            if time_layout == TIME_SHARED:
                initial = torch.randn(shape, generator=generator) * INIT_STD
            else:
                initial = torch.zeros(shape)
            self.time_embedding = nn.Parameter(initial)

    @staticmethod
    def time_embedding_shape(buckets: int, num_tokens: int, width: int, layout: str) -> tuple[int, ...]:
        """``(buckets, width)`` for the shared layout, ``(buckets, m, width)`` per token."""
        return (buckets, width) if layout == TIME_SHARED else (buckets, num_tokens, width)

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[0]

    @property
    def width(self) -> int:
        return self.tokens.shape[1]

    def bucket(self, timestep) -> int:
        """Time bucket of ``timestep``: ``floor(t * buckets / num_train_timesteps)``, clamped to the buckets.

        With 100 buckets on the 1000-step scale that is the reference's ``t // 10``. Any
        scheduler's convention maps: integer timesteps (DDPM, DDIM, PNDM), fractional ones
        (Euler, LMS, Heun with Karras sigmas) by their floor, and ``t = num_train_timesteps``
        (some schedulers' first step) into the last bucket.
        """
        value = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        if not math.isfinite(value):
            raise ValueError(f"timestep {value} is not finite")
        return min(max(math.floor(value * self.time_buckets / self.num_train_timesteps), 0), self.time_buckets - 1)

    def tokens_for(self, site: Site, timestep) -> torch.Tensor:
        """The ``(m, width)`` tokens inserted at ``site`` at ``timestep``."""
        if self.time_embedding is None:
            return self.tokens
        if timestep is None:
            raise RuntimeError(
                "these soft tokens are time-dependent: the pipeline must call controller.begin_step(i, t) "
                "before each UNet evaluation (or use editkit.softrepa.use_soft_tokens)"
            )
        return self.tokens_in_bucket(torch.tensor(self.bucket(timestep), device=self.time_embedding.device))

    def tokens_in_bucket(self, bucket: torch.Tensor) -> torch.Tensor:
        """The ``(m, width)`` tokens of time bucket ``bucket`` (a 0-d long tensor).

        ``index_select``, not ``time_embedding[bucket]``: dynamo turns a 0-d tensor index into
        ``.item()`` and would guard on its value (one compiled graph per bucket).
        """
        row = self.time_embedding.index_select(0, bucket.view(1))[0]
        return self.tokens + row  # a shared (width,) row broadcasts over m; per-token rows are (m, width)

    def bucket_tensor(self, timestep: torch.Tensor) -> torch.Tensor:
        """``bucket`` in tensor arithmetic (a 0-d long tensor on the time embedding's device).

        No Python value is read, so a compiled UNet (whose hooks are traced too) keeps one graph
        across timesteps. Integer timesteps give exactly ``bucket``'s value.
        """
        value = timestep.flatten()[0].to(device=self.time_embedding.device, dtype=torch.float32)
        bucket = torch.floor(value * self.time_buckets / self.num_train_timesteps)
        return bucket.clamp(0, self.time_buckets - 1).long()

    def with_tensors(self, tensors: dict[str, torch.Tensor]) -> SoftTokens:
        """A copy of this module holding ``tensors`` (e.g. the best tokens of a run)."""
        return copy_with_tensors(self, tensors)

    def metadata(self) -> dict[str, str]:
        """The file metadata describing this module (all values strings, as safetensors requires)."""
        return {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "kind": self.kind,
            "num_tokens": str(self.num_tokens),
            "token_width": str(self.width),
            "sites": json.dumps(self.sites),
            "time_buckets": str(self.time_buckets),
            "time_layout": self.time_layout,
            "num_train_timesteps": str(self.num_train_timesteps),
            "base_model": self.base_model,
            "family": self.family,
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of a token file (detached, CPU, contiguous float32)."""
        out = {"tokens": self.tokens}
        if self.time_embedding is not None:
            out["time_embedding"] = self.time_embedding
        return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in out.items()}

    def check_finite(self, when: str) -> None:
        """Raise :class:`NumericalError` when a token value is NaN, infinite or beyond ``MAX_TOKEN_ABS``."""
        check_finite_tensors(self.tensors(), when)


def check_finite_tensors(tensors: dict[str, torch.Tensor], when: str) -> None:
    """Raise :class:`NumericalError` when a soft-token tensor is NaN, infinite or beyond ``MAX_TOKEN_ABS``."""
    for name, value in tensors.items():
        if not torch.isfinite(value).all() or value.abs().max() > MAX_TOKEN_ABS:
            raise NumericalError(
                f"the soft {name.replace('_', ' ')} became non-finite or exploded {when}; "
                "lower --learning-rate (the last good checkpoint is kept)"
            )


def copy_with_tensors(module: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A deep copy of a soft-token module (UNet or MM-DiT) holding ``tensors``: ``"tokens"`` and, when the
    module has one, ``"time_embedding"``, of the module's own shapes (e.g. the best tensors of its run)."""
    clone = copy.deepcopy(module)
    with torch.no_grad():
        clone.tokens.copy_(tensors["tokens"])
        if clone.time_embedding is not None:
            clone.time_embedding.copy_(tensors["time_embedding"])
    return clone


class SoftTokenController(AttentionController):
    """Inserts soft tokens right after start-of-text in the cross-attention context of their sites.

    Every row of the batch gets the tokens (both classifier-free-guidance branches, all editing
    roles). ``strength`` scales the tokens; 0 inserts nothing (exactly the model without tokens).
    ``inserted_tokens`` reports ``(1, m)`` so cross-attention map stores drop the tokens and
    prompt token indices never shift.
    """

    def __init__(self, soft_tokens: SoftTokens, strength: float = 1.0) -> None:
        super().__init__()
        self.soft_tokens = soft_tokens
        self.strength = float(strength)
        self._sites = frozenset(soft_tokens.sites)
        self._step_bucket: torch.Tensor | None = None  # time-dependent tokens: this step's bucket

    def begin_step(self, index: int, timestep: int | float | torch.Tensor) -> None:
        super().begin_step(index, timestep)
        self.set_timestep(timestep)

    def set_timestep(self, timestep: int | float | torch.Tensor) -> None:
        """The bucket the next UNet calls use, kept as a tensor: the hooks read no Python timestep,
        so torch.compile sees one graph at every step (``use_soft_tokens``'s hook calls this)."""
        if self.soft_tokens.time_embedding is None:
            return
        if not isinstance(timestep, torch.Tensor):
            if not math.isfinite(float(timestep)):
                raise ValueError(f"timestep {timestep} is not finite")
            timestep = torch.tensor(float(timestep))
        self._step_bucket = self.soft_tokens.bucket_tensor(timestep)

    def applies_to(self, site: Site) -> bool:
        return site.is_cross and site.name in self._sites

    def inserted_tokens(self, site: Site) -> tuple[int, int] | None:
        if self.strength == 0 or not self.applies_to(site):
            return None
        return 1, self.soft_tokens.num_tokens

    def on_context(self, site: Site, context: torch.Tensor) -> torch.Tensor:
        if self.strength == 0:
            return context
        tokens = self._step_tokens()
        if tokens.shape[-1] != context.shape[-1]:
            raise ValueError(f"soft tokens of width {tokens.shape[-1]} at {site.name} (context {context.shape[-1]})")
        tokens = (self.strength * tokens).to(context.dtype).to(context.device)
        tokens = tokens.unsqueeze(0).expand(context.shape[0], -1, -1)  # (batch, m, width)
        return torch.cat([context[:, :1], tokens, context[:, 1:]], dim=1)

    def _step_tokens(self) -> torch.Tensor:
        soft = self.soft_tokens
        if soft.time_embedding is None:
            return soft.tokens
        if self._step_bucket is None:
            soft.tokens_for(None, None)  # raises: the pipeline must tell the controller the timestep
        return soft.tokens_in_bucket(self._step_bucket)


def default_sites(unet) -> list[str]:
    """The method's sites: cross-attention of the down blocks (SD 1.x/2.x), down + mid (SDXL)."""
    from editkit.models import model_family

    blocks = ("down", "mid") if model_family(unet) == "sdxl" else ("down",)
    return [s.name for s in attention_sites(unet) if s.is_cross and s.block in blocks]


@torch.no_grad()
def initial_tokens(
    pipe, num_tokens: int, *, generator: torch.Generator | None = None, init: str = TOKEN_INIT_TEXT
) -> torch.Tensor:
    """The ``(m, width)`` starting tokens.

    ``init="text"`` (the default, the method note's SD 1.5 initialisation): on SD 1.x the
    start-of-text output embedding of the empty prompt, repeated (other families: N(0, 0.02)).
    ``init="normal"`` (an option, for every family): N(0, 0.02) drawn with ``generator``, as the
    reference initialises its time tokens and its tokens for other models.
    """
    from editkit.conditioning import encode_text
    from editkit.models import model_family

    if init not in TOKEN_INITS:
        raise ValueError(f"token init must be one of {', '.join(TOKEN_INITS)}, not {init!r}")
    width = pipe.unet.config.cross_attention_dim
    if init == TOKEN_INIT_TEXT and model_family(pipe.unet) == "sd" and getattr(pipe, "text_encoder", None) is not None:
        start = encode_text(pipe, [""]).prompt_embeds[0, 0].float().cpu()
        return start.expand(num_tokens, width).clone()
    return torch.randn(num_tokens, width, generator=generator) * INIT_STD


def save_soft_tokens(soft_tokens: SoftTokens, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``soft_tokens`` to a ``.safetensors`` file atomically (refuses an existing file unless ``overwrite``).

    Non-finite tokens are refused (:class:`NumericalError`) rather than written.
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise InputError(f"{path}: soft tokens are written as .safetensors files")
    soft_tokens.check_finite("before saving")
    return write_safetensors(path, soft_tokens.tensors(), soft_tokens.metadata(), overwrite=overwrite)


def read_soft_tokens(path: str | os.PathLike):
    """Read a token file (safetensors only); every field and tensor is checked (see :func:`tokens_from_file`).

    Returns :class:`SoftTokens` (UNet files) or ``MMDiTSoftTokens`` (MM-DiT files, by their ``kind``).
    """
    path = Path(path).expanduser()
    tensors, metadata = read_safetensors(path, "soft-token file")
    if metadata.get("format") == FORMAT_NAME and metadata.get("kind") == KIND_MMDIT:
        from editkit.softrepa.mmdit_tokens import mmdit_tokens_from_file

        parse_int(metadata, "format_version", path, minimum=FORMAT_VERSION)
        return mmdit_tokens_from_file(tensors, metadata, path)
    return tokens_from_file(tensors, metadata, path)


def tokens_from_file(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> SoftTokens:
    """Validate a token file's metadata and tensors (the one place that does) and build the module.

    Checks the format, version (1 or 2) and kind, that ``num_tokens``, ``token_width`` and
    ``num_train_timesteps`` are positive whole numbers and ``time_buckets`` a whole number no
    larger than the timestep count, that ``sites`` is a non-empty list of distinct names, the
    tensors' names, shapes, float dtype and finiteness (values within +-``MAX_TOKEN_ABS``).
    Version 1 files (before ``time_layout``) held the per-token layout and are read as such.
    """
    if metadata.get("format") != FORMAT_NAME:
        raise ModelLoadError(f"{path} is a safetensors file but not an editkit SoftREPA token file")
    version = parse_int(metadata, "format_version", path, minimum=1)
    if version > FORMAT_VERSION:
        raise ModelLoadError(f"{path} has token format version {version}; this editkit reads up to {FORMAT_VERSION}")
    if metadata.get("kind") != KIND_UNET_CONTEXT:
        raise ModelLoadError(f"{path} holds soft tokens of kind {metadata.get('kind')!r}, not for UNet models")
    num_tokens = parse_int(metadata, "num_tokens", path, minimum=1)
    width = parse_int(metadata, "token_width", path, minimum=1)
    steps = parse_int(metadata, "num_train_timesteps", path, minimum=1, default=NUM_TRAIN_TIMESTEPS)
    buckets = parse_int(metadata, "time_buckets", path)
    if buckets > steps:
        raise ModelLoadError(f"{path}: {buckets} time buckets for {steps} timesteps")
    layout = metadata.get("time_layout", TIME_PER_TOKEN) if version >= 2 else TIME_PER_TOKEN
    if layout not in TIME_LAYOUTS:
        raise ModelLoadError(f"{path}: unknown time layout {layout!r} (expected {' or '.join(TIME_LAYOUTS)})")
    sites = parse_json(metadata, "sites", path, list)
    if not sites or not all(isinstance(s, str) and s for s in sites) or len(set(sites)) != len(sites):
        raise ModelLoadError(f"{path}: 'sites' must be a non-empty list of distinct site names")
    expected = {"tokens"} | ({"time_embedding"} if buckets else set())
    refuse_unexpected(tensors, expected, path)
    module = SoftTokens(
        check_tensor(tensors, "tokens", path, (num_tokens, width), bound=MAX_TOKEN_ABS), sites,
        time_buckets=buckets, time_layout=layout, num_train_timesteps=steps,
        base_model=str(metadata.get("base_model", "")), family=_family_field(metadata, path),
    )  # fmt: skip
    if buckets:
        shape = SoftTokens.time_embedding_shape(buckets, num_tokens, width, layout)
        module.time_embedding.data.copy_(check_tensor(tensors, "time_embedding", path, shape, bound=MAX_TOKEN_ABS))
    if version < FORMAT_VERSION and buckets:
        logger.info("%s: a version %d token file, read with its per-token time layout", path, version)
    return module


def _family_field(metadata: dict[str, str], path: Path) -> str:
    """The optional ``family`` metadata field: a known family name, or "" (files written before it existed)."""
    from editkit.backbones.families import FAMILIES

    family = metadata.get("family", "")
    if family and family not in FAMILIES:
        raise ModelLoadError(f"{path}: unknown model family {family[:40]!r} (expected one of {', '.join(FAMILIES)})")
    return family


def check_token_family(soft_tokens, family: str, path: str | os.PathLike = "soft tokens") -> None:
    """Refuse tokens (UNet or MM-DiT) trained on another model family than ``family``, or of the other kind.

    Needs only the family's name, so the CLI runs it from the model's index before the model loads
    (:func:`editkit.tasks.check_soft_tokens_source`); :func:`load_soft_tokens` runs it again on the
    loaded model. Files written before the ``family`` field are checked by kind only.
    """
    mmdit_tokens = soft_tokens.kind == KIND_MMDIT
    other_family = bool(soft_tokens.family) and soft_tokens.family != family
    if other_family or mmdit_tokens != (family in MMDIT_FAMILIES):
        trained = f"a {soft_tokens.family}" if soft_tokens.family else ("an MM-DiT" if mmdit_tokens else "a UNet")
        raise ModelLoadError(
            f"{path}: soft tokens trained on {trained} model ({soft_tokens.base_model or '?'}) do not apply to "
            f"this {family} model; train tokens for this model family"
        )


def validate_for_unet(soft_tokens: SoftTokens, unet, path: str | os.PathLike = "soft tokens") -> None:
    """Refuse tokens made for another model: same family, width ``cross_attention_dim``, existing sites."""
    from editkit.models import model_family

    check_token_family(soft_tokens, model_family(unet), path)
    width = unet.config.cross_attention_dim
    if soft_tokens.width != width:
        raise ModelLoadError(
            f"{path}: tokens of width {soft_tokens.width} do not fit this model (cross_attention_dim {width}); "
            f"they were trained for {soft_tokens.base_model or 'another model'}"
        )
    names = {s.name for s in attention_sites(unet) if s.is_cross}
    missing = [site for site in soft_tokens.sites if site not in names]
    if missing:
        raise ModelLoadError(
            f"{path}: {len(missing)} token site(s) do not exist in this model (e.g. {missing[0]}); "
            f"they were trained for {soft_tokens.base_model or 'another model'}"
        )


def load_soft_tokens(path: str | os.PathLike, *, unet=None, model=None, strength: float = 1.0):
    """Load a token file, check it against the denoiser and return the controller that inserts the tokens.

    ``model`` (or ``unet``, its older name): the UNet or MM-DiT transformer (``pipe.unet`` /
    ``pipe.transformer``). Tokens of another family or kind are refused (:class:`ModelLoadError`).
    """
    from editkit.models import model_family

    model = model if model is not None else unet
    soft_tokens = read_soft_tokens(path)
    if model_family(model) in MMDIT_FAMILIES:  # both validators refuse tokens of another family or kind first
        from editkit.softrepa.mmdit_tokens import MMDiTSoftTokenController, validate_for_transformer

        validate_for_transformer(soft_tokens, model, path)
        controller_class = MMDiTSoftTokenController
    else:
        validate_for_unet(soft_tokens, model, path)
        controller_class = SoftTokenController
    soft_tokens.requires_grad_(False)
    soft_tokens.to(device=model.device)
    logger.info("soft tokens %s: m=%d at %d sites", path, soft_tokens.num_tokens, len(soft_tokens.sites))
    return controller_class(soft_tokens, strength=strength)
