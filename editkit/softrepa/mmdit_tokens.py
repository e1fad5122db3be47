"""SoftREPA tokens for MM-DiT transformers (SD3 / SD3.5; FLUX.1 double-stream blocks as editkit's extension).

The paper's SD3 design (arXiv 2503.08250, sec. 4; released ``transformer.py``,
``SD3Transformer2DModel_DC``): per-layer tokens ``(layers, m, joint_attention_dim)`` in the T5
embedding space, passed through the transformer's frozen ``context_embedder``, plus a per-(time
bucket, layer) vector of the text stream's width (``Embedding(100, width * layers)`` split per
layer, bucket ``t // 10`` of the transformer's 0-1000 timestep), are prepended to the text stream
entering each of the first ``layers`` joint blocks (5 by default; all blocks when fewer) and
stripped from it after the block. Both are initialised N(0, 0.02).

editkit inserts them at the attention layer (``inserted_tokens`` / ``on_context`` of the shared
processors), which is exactly equivalent: inside a joint block the only operation mixing tokens
is the joint attention; the block's ``norm1_context`` modulation is applied to the tokens here
(with the call's ``temb``, caught by a forward hook on ``transformer.time_text_embed``) as the
block applies it to the text, and what the block's context MLP makes of the soft tokens is
discarded by the reference at the next block anyway. ``tests/test_flow_softrepa.py`` checks the
equivalence against block hooks written after the released code.

Differences from the reference, stated: ``strength`` (not in the reference) scales the tokens'
modulated embedding entering the attention (1: the paper; 0: no tokens at all, the model's own
output); the time bucket is ``floor(t * buckets / 1000)`` per row, clamped to the last bucket (the
reference subtracts 1 from every row of a batch in which any ``t >= 1000``). FLUX.1 is not in the
paper: the same tokens on its double-stream blocks (``transformer_blocks.{i}.attn``), with the
rotary angle of the first text position.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from diffusers.models.normalization import AdaLayerNormContinuous
from torch import nn

from editkit.attention import AttentionController, Site, attention_sites, uncompiled
from editkit.errors import ModelLoadError
from editkit.softrepa.files import MAX_TOKEN_ABS, check_tensor, parse_int, parse_json, refuse_unexpected
from editkit.softrepa.tokens import (
    FORMAT_NAME,
    FORMAT_VERSION,
    INIT_STD,
    KIND_MMDIT,
    NUM_TRAIN_TIMESTEPS,
    check_finite_tensors,
    check_token_family,
    copy_with_tensors,
)

__all__ = [
    "DEFAULT_LAYERS",
    "KIND_MMDIT",
    "MMDiTSoftTokenController",
    "MMDiTSoftTokens",
    "default_mmdit_sites",
    "mmdit_tokens_from_file",
    "validate_for_transformer",
]

logger = logging.getLogger(__name__)

#: The reference's ``--n_dc_layers`` for SD3: the first 5 joint blocks.
DEFAULT_LAYERS = 5
MMDIT_FAMILIES = ("sd3", "flux")


class MMDiTSoftTokens(nn.Module):
    """Per-layer soft tokens and per-(time bucket, layer) vectors for the first joint blocks.

    Args:
        tokens: ``(layers, m, joint_attention_dim)`` tokens in the text encoder's space (the
            ``context_embedder`` projects them to the text stream's width).
        sites: the joint attention sites (``transformer_blocks.{i}.attn``), one per layer.
        width: the text stream's width (``context_embedder.out_features``) of the time vectors.
        time_buckets: buckets of the time vectors (0: none; the reference: 100, ``t // 10``).
        num_train_timesteps: the timestep scale the buckets divide (1000).
        base_model, family: recorded in files; the family is checked on load.
        generator: the generator of the N(0, 0.02) initialisation of the time vectors.
    """

    kind = KIND_MMDIT

    def __init__(
        self,
        tokens: torch.Tensor,
        sites: list[str],
        *,
        width: int,
        time_buckets: int = 100,
        num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
        base_model: str = "",
        family: str = "",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if tokens.ndim != 3 or tokens.shape[0] != len(sites):
            raise ValueError(f"MM-DiT soft tokens must be (layers={len(sites)}, m, width), got {tuple(tokens.shape)}")
        if time_buckets < 0 or num_train_timesteps < 1 or width < 1:
            raise ValueError("time buckets must be >= 0, num_train_timesteps and width >= 1")
        self.tokens = nn.Parameter(tokens.detach().clone().float())
        self.sites = list(sites)
        self.stream_width = int(width)
        self.time_buckets = int(time_buckets)
        self.num_train_timesteps = int(num_train_timesteps)
        self.base_model, self.family = base_model, family
        self.time_embedding = None
        if self.time_buckets:
            shape = (self.time_buckets, len(sites), self.stream_width)
            self.time_embedding = nn.Parameter(torch.randn(shape, generator=generator) * INIT_STD)

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[1]

    @property
    def width(self) -> int:
        """The tokens' width (the transformer's ``joint_attention_dim``)."""
        return self.tokens.shape[2]

    def buckets(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Per-row time buckets ``floor(t * buckets / num_train_timesteps)`` clamped to the buckets (long)."""
        value = timesteps.flatten().to(self.time_embedding.device, torch.float32)
        return torch.floor(value * self.time_buckets / self.num_train_timesteps).clamp(0, self.time_buckets - 1).long()

    def stream_tokens(self, index: int, context_embedder: nn.Module, buckets: torch.Tensor | None) -> torch.Tensor:
        """Layer ``index``'s tokens in the text stream ``(rows, m, width)``: projected, plus the time vector."""
        weight = context_embedder.weight
        projected = context_embedder(self.tokens[index].to(weight.device, weight.dtype))  # (m, width)
        if self.time_embedding is None or buckets is None:
            return projected.unsqueeze(0)
        time = self.time_embedding[:, index].index_select(0, buckets)  # (rows, width)
        return projected.unsqueeze(0) + time.to(projected.dtype).unsqueeze(1)

    def metadata(self) -> dict[str, str]:
        """The file metadata (all values strings, as safetensors requires)."""
        return {
            "format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "kind": self.kind,
            "num_tokens": str(self.num_tokens), "token_width": str(self.width), "stream_width": str(self.stream_width),
            "sites": json.dumps(self.sites), "time_buckets": str(self.time_buckets),
            "num_train_timesteps": str(self.num_train_timesteps), "base_model": self.base_model, "family": self.family,
        }  # fmt: skip

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of a token file (detached, CPU, contiguous float32)."""
        out = {"tokens": self.tokens}
        if self.time_embedding is not None:
            out["time_embedding"] = self.time_embedding
        return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in out.items()}

    def with_tensors(self, tensors: dict[str, torch.Tensor]) -> MMDiTSoftTokens:
        """A copy of this module holding ``tensors`` (e.g. the best tokens of a run)."""
        return copy_with_tensors(self, tensors)

    def check_finite(self, when: str) -> None:
        """Raise :class:`NumericalError` when a value is NaN, infinite or beyond ``MAX_TOKEN_ABS``."""
        check_finite_tensors(self.tensors(), when)


class MMDiTSoftTokenController(AttentionController):
    """Prepends each layer's soft tokens to the text stream of its joint attention, in every batch row.

    The tokens get the block's ``norm1_context`` modulation with the call's ``temb`` (caught by
    :meth:`register_hooks`, which ``editkit.attention.attach`` calls), so they enter the attention
    as the reference's tokens prepended to the block's input do. ``inserted_tokens`` is ``(0, m)``:
    map stores drop them and the text output keeps its length. ``strength`` scales that embedding
    (0: nothing inserted).
    """

    def __init__(self, soft_tokens: MMDiTSoftTokens, strength: float = 1.0) -> None:
        super().__init__()
        if not math.isfinite(float(strength)):
            raise ValueError(f"strength {strength} is not finite")
        self.soft_tokens = soft_tokens
        self.strength = float(strength)
        self._layer = {name: index for index, name in enumerate(soft_tokens.sites)}
        self._model: nn.Module | None = None
        self._temb: torch.Tensor | None = None
        self._buckets: torch.Tensor | None = None

    def register_hooks(self, model: nn.Module) -> list:
        """A forward hook on ``model.time_text_embed``: the call's ``temb`` and per-row timesteps (0-1000)."""
        model = uncompiled(model)
        self._model = model

        def record(module, args, kwargs, output):
            self._temb = output
            timestep = args[0] if args else kwargs.get("timestep")
            if self.soft_tokens.time_embedding is not None:
                self._buckets = self.soft_tokens.buckets(timestep)

        return [model.time_text_embed.register_forward_hook(record, with_kwargs=True)]

    def applies_to(self, site: Site) -> bool:
        return site.kind == "joint" and site.name in self._layer

    def inserted_tokens(self, site: Site) -> tuple[int, int] | None:
        if self.strength == 0 or not self.applies_to(site):
            return None
        return 0, self.soft_tokens.num_tokens

    def on_context(self, site: Site, context: torch.Tensor) -> torch.Tensor:
        if self.strength == 0:
            return context
        if self._model is None or self._temb is None:
            raise RuntimeError(
                "MM-DiT soft tokens need the transformer's temb: attach them with editkit.attention.attach"
            )
        block = self._model.transformer_blocks[site.block_index]
        tokens = self.soft_tokens.stream_tokens(self._layer[site.name], self._model.context_embedder, self._buckets)
        tokens = tokens.expand(context.shape[0], -1, -1).to(context.dtype)  # (batch, m, width)
        norm = block.norm1_context
        if isinstance(norm, AdaLayerNormContinuous):  # the last SD3 block (context_pre_only)
            normed = norm(tokens, self._temb)
        else:  # AdaLayerNormZero: (normed, gates and MLP modulation)
            normed = norm(tokens, emb=self._temb)[0]
        if self.strength != 1:
            normed = self.strength * normed
        return torch.cat([normed.to(context.dtype), context], dim=1)


def default_mmdit_sites(transformer: nn.Module, layers: int = DEFAULT_LAYERS) -> list[str]:
    """The joint attention sites of the first ``layers`` joint (FLUX: double-stream) blocks, in block order."""
    joint = [s for s in attention_sites(transformer) if s.kind == "joint" and s.block == "transformer"]
    joint.sort(key=lambda site: site.block_index)
    return [site.name for site in joint[: max(1, int(layers))]]


def mmdit_tokens_from_file(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> MMDiTSoftTokens:
    """Validate an MM-DiT token file's metadata and tensors and build the module."""
    from editkit.softrepa.tokens import _family_field

    num_tokens = parse_int(metadata, "num_tokens", path, minimum=1)
    width = parse_int(metadata, "token_width", path, minimum=1)
    stream = parse_int(metadata, "stream_width", path, minimum=1)
    steps = parse_int(metadata, "num_train_timesteps", path, minimum=1, default=NUM_TRAIN_TIMESTEPS)
    buckets = parse_int(metadata, "time_buckets", path)
    if buckets > steps:
        raise ModelLoadError(f"{path}: {buckets} time buckets for {steps} timesteps")
    sites = parse_json(metadata, "sites", path, list)
    if not sites or not all(isinstance(s, str) and s for s in sites) or len(set(sites)) != len(sites):
        raise ModelLoadError(f"{path}: 'sites' must be a non-empty list of distinct site names")
    family = _family_field(metadata, path)
    if family and family not in MMDIT_FAMILIES:
        raise ModelLoadError(f"{path}: MM-DiT soft tokens recorded for a {family} model")
    refuse_unexpected(tensors, {"tokens"} | ({"time_embedding"} if buckets else set()), path)
    tokens = check_tensor(tensors, "tokens", path, (len(sites), num_tokens, width), bound=MAX_TOKEN_ABS)
    module = MMDiTSoftTokens(
        tokens, sites, width=stream, time_buckets=buckets, num_train_timesteps=steps,
        base_model=str(metadata.get("base_model", "")), family=family,
    )  # fmt: skip
    if buckets:
        shape = (buckets, len(sites), stream)
        module.time_embedding.data.copy_(check_tensor(tensors, "time_embedding", path, shape, bound=MAX_TOKEN_ABS))
    return module


def validate_for_transformer(
    soft_tokens: MMDiTSoftTokens, transformer: nn.Module, path: object = "soft tokens"
) -> None:
    """Refuse tokens made for another model: same family, widths, and existing joint sites."""
    from editkit.models import model_family

    check_token_family(soft_tokens, model_family(transformer), path)
    origin = soft_tokens.base_model or "another model"
    embedder = uncompiled(transformer).context_embedder
    if (soft_tokens.width, soft_tokens.stream_width) != (embedder.in_features, embedder.out_features):
        raise ModelLoadError(
            f"{path}: tokens of width {soft_tokens.width} -> {soft_tokens.stream_width} do not fit this model "
            f"(joint_attention_dim {embedder.in_features}, text stream {embedder.out_features}); trained for {origin}"
        )
    names = {s.name for s in attention_sites(transformer) if s.kind == "joint"}
    missing = [site for site in soft_tokens.sites if site not in names]
    if missing:
        raise ModelLoadError(
            f"{path}: {len(missing)} token site(s) are no joint attention of this model (e.g. {missing[0]}); "
            f"they were trained for {origin}"
        )
