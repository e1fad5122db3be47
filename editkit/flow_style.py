"""Attention-swapping style transfer (AttenST / StyleID) on MM-DiT transformers: SD3 / SD3.5 and FLUX.1.

The method of :mod:`editkit.style`, moved to joint attention (``shared/methods/style-transfer.md``,
``shared/design/mmdit.md``), written against the backbone interface (:mod:`editkit.backbones`) so
both families share one loop:

1. Content and style are inverted with the flow ODE (:func:`editkit.flow_inversion.flow_invert`,
   Euler) along the generation schedule (shifted sigmas, FLUX's dynamic ``mu`` of the content size).
2. While inverting, :class:`FlowStyleFeatureRecorder` keeps only what injection needs, from the
   **image tokens** of the chosen sites: the content's queries, the style's keys and values, per
   call timestep (fp16, optionally on the CPU).
3. Generation (Euler, ``FlowMatchEulerDiscreteScheduler.step``'s arithmetic) starts from the
   content-aware AdaIN of the two inverted start latents; :class:`FlowStyleInjectionController`
   replaces the image-token keys/values by the style's, mixes the image-token queries
   ``q = gamma q_content + (1 - gamma) q`` and multiplies every logit against an injected key by
   ``tau``. Text tokens keep the content's queries, keys and values.

Timing: a velocity call of the inversion at timestep ``t_i`` (on the inverted latent at
``sigma_i``) is the call generation makes at ``t_i``; its features are injected there (StyleID's
original timing, no extra call). Euler inversion calls at ``0, t_{N-1}, ..., t_1``: the first
generation step ``t_0`` has no recorded features and runs without injection (a deviation from
the UNet method, where DDIM inversion's shifted call covers every step; it keeps the cost at
exactly 3N calls).

Temperature: on a UNet every key is injected and AttenST scales the logits by ``tau / sqrt(d)``.
In joint attention only the image keys are injected, so the injected keys are scaled by ``tau``:
exactly the logits against injected keys are multiplied by ``tau``, text-key logits are not
(on an image-only site such as SD3.5's ``attn2`` this is the UNet formula).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from editkit.attention import AttentionController, Site, attention_sites, select_sites, uncompiled
from editkit.errors import InputError
from editkit.style import preserve_query

__all__ = [
    "FLOW_STYLE_KINDS",
    "FlowStyleFeatureRecorder",
    "FlowStyleInjectionController",
    "default_flow_style_sites",
    "default_num_inference_steps",
    "flow_model_fingerprint",
    "resolve_flow_style_sites",
    "timestep_key",
]

logger = logging.getLogger(__name__)

#: Site kinds injection can run at: joint blocks, FLUX single-stream blocks, SD3.5's image-only attn2.
FLOW_STYLE_KINDS = ("joint", "single", "image_self")
#: SD3 / SD3.5 default: the joint blocks of the third quarter of the depth, ``[n/2, 3n/4)`` (at least one),
#: chosen on shapes-sd3 (benchmarks/RESULTS.md, "Issue 23: style transfer on MM-DiT"): earlier blocks copy
#: the style image wholesale (layout lost), the last quarter keeps the layout but barely moves the colour.
SD3_BLOCKS = (1, 2), (3, 4)
#: FLUX.1: the single-stream blocks from index 20 of 38 on (scaled to the model's depth): RF-Solver-Edit's
#: released code shares image features in the single-stream blocks with ``info['id'] > 19`` (Wang et al.
#: 2024, arXiv:2411.04746; it swaps values, for editing); the double-stream blocks keep the content's.
FLUX_FIRST_SINGLE_OF_38 = 20
#: Pipeline defaults of the released models (StableDiffusion3Pipeline / FluxPipeline; schnell's card: 4).
DEFAULT_STEPS = {"sd3": 28, "flux": 28, "flux-schnell": 4}
#: Logit penalty that removes a key for a query in masked injection (exp(-1e4) is 0 in every dtype).
_MASK_PENALTY = 1e4


def timestep_key(timestep: float | torch.Tensor) -> int:
    """A flow timestep (a float of the scheduler) as the integer key of a style cache: thousandths."""
    value = float(timestep.item() if isinstance(timestep, torch.Tensor) else timestep)
    return round(value * 1000)


def default_num_inference_steps(family: str, transformer: torch.nn.Module) -> int:
    """The family pipeline's default step count: SD3 28, FLUX.1-dev 28, FLUX.1-schnell (no guidance embeds) 4."""
    if family == "flux" and not uncompiled(transformer).config.get("guidance_embeds", False):
        return DEFAULT_STEPS["flux-schnell"]
    return DEFAULT_STEPS[family]


def default_flow_style_sites(transformer: torch.nn.Module) -> list[str]:
    """The family's default injection sites (see :data:`SD3_BLOCKS`, :data:`FLUX_FIRST_SINGLE_OF_38`).

    SD3 / SD3.5: the joint attention of blocks ``[n/2, 3n/4)`` of ``n`` (SD3.5-medium: 12-17 of 24; SD3.5's
    image-only ``attn2`` is not injected by default). FLUX.1: single-stream blocks 20-37 of 38 (RF-Solver-Edit's).
    """
    sites = attention_sites(transformer)
    joint = [site for site in sites if site.kind == "joint" and site.block == "transformer"]
    single = [site for site in sites if site.kind == "single"]
    if single:
        chosen = single[len(single) * FLUX_FIRST_SINGLE_OF_38 // 38 :]
    else:
        (start_num, start_den), (stop_num, stop_den) = SD3_BLOCKS
        start = len(joint) * start_num // start_den
        chosen = joint[start : max(start + 1, len(joint) * stop_num // stop_den)]
    return [site.name for site in chosen]


def resolve_flow_style_sites(transformer: torch.nn.Module, patterns: str | Sequence[str] | None) -> list[str]:
    """Site names of ``transformer`` matching ``patterns`` (names, prefixes, globs); ``None``: the defaults."""
    if patterns is None:
        return default_flow_style_sites(transformer)
    sites = [site for site in attention_sites(transformer) if site.kind in FLOW_STYLE_KINDS]
    try:
        return select_sites(sites, patterns)
    except ValueError as error:
        raise InputError(f"injection_sites: {error}") from None


def flow_model_fingerprint(transformer: torch.nn.Module) -> str:
    """A short hash of the transformer's config and its input and output projections."""
    model = uncompiled(transformer)
    digest = hashlib.sha256(json.dumps(dict(model.config), sort_keys=True, default=str).encode())
    for name in ("pos_embed.proj", "x_embedder", "proj_out"):
        module = dict(model.named_modules()).get(name)
        if module is not None:
            digest.update(module.weight.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


class _KeyedSiteController(AttentionController):
    """A controller acting at ``sites`` on the transformer calls whose :func:`timestep_key` is in ``keys``:
    ``begin_step`` (run before each call with its timestep) sets ``_key`` to that key, or None outside ``keys``."""

    def __init__(self, sites: Iterable[str], keys: Iterable[int]) -> None:
        super().__init__()
        self.sites, self.keys = frozenset(sites), frozenset(keys)
        self._key: int | None = None

    def applies_to(self, site: Site) -> bool:
        return site.name in self.sites

    def begin_step(self, index: int, timestep: int | float | torch.Tensor) -> None:
        super().begin_step(index, timestep)
        key = timestep_key(timestep)
        self._key = key if key in self.keys else None


class FlowStyleFeatureRecorder(_KeyedSiteController):
    """Records the image-token ``keep`` features (``query`` or ``key``/``value``) at ``sites`` for call timesteps
    whose :func:`timestep_key` is in ``keys``; a repeated (site, key) overwrites.

    ``begin_step`` must run before each transformer call with that call's timestep. Stored tensors are
    ``(1, heads, image tokens, head_dim)`` in ``dtype``, on ``offload`` when given.
    """

    def __init__(
        self,
        sites: Iterable[str],
        keep: Sequence[str],
        keys: Iterable[int],
        dtype: torch.dtype = torch.float16,
        offload: str | torch.device | None = None,
    ) -> None:
        super().__init__(sites, keys)
        self.keep, self.dtype, self.offload = tuple(keep), dtype, offload
        self.features: dict[tuple[str, int], dict[str, torch.Tensor]] = {}

    def on_qkv(self, site, query, key, value):
        if self._key is not None and site.name in self.sites:
            image = site.layout.image
            tensors = {"query": query, "key": key, "value": value}
            self.features[(site.name, self._key)] = {
                name: self._stored(tensors[name][:1, :, image]) for name in self.keep
            }
        return query, key, value

    def _stored(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach().to(self.dtype)
        return (tensor.to(self.offload) if self.offload is not None else tensor.clone()).contiguous()


class FlowStyleInjectionController(_KeyedSiteController):
    """Style-guided joint attention on ``sites`` at the call timesteps whose key is in ``keys``.

    Args:
        sites: site names (joint, single-stream or image-only).
        style: a style cache (``StyleCache`` of kind ``"style"``): image-token keys/values per (site, key).
        content: a content cache (queries); needed when ``gamma > 0``.
        gamma: query preservation of the image tokens, ``q = gamma q_content + (1 - gamma) q``.
        tau: temperature: logits against the injected (style) keys are multiplied by ``tau``.
        keys: the :func:`timestep_key` values to inject at.
        mask: optional ``(1, 1, H, W)`` {0, 1} mask (any resolution): image queries inside it attend to
            the style's keys (and the text), those outside to the current image keys (and the text),
            as without injection; text queries attend as without injection. It is one kernel call over
            the current and the style keys, each query kept from the other set by two extra q/k
            dimensions whose product is a -1e4 logit penalty.
    """

    def __init__(
        self,
        sites: Iterable[str],
        style,
        content=None,
        *,
        gamma: float = 0.75,
        tau: float = 1.5,
        keys: Iterable[int],
        mask: torch.Tensor | None = None,
    ) -> None:
        if gamma > 0 and content is None:
            raise ValueError("gamma > 0 needs the content's recorded queries")
        super().__init__(sites, keys)
        self.style, self.content = style, content
        self.gamma, self.tau, self.mask = float(gamma), float(tau), mask
        self.injected: set[tuple[str, int]] = set()
        self._token_masks: dict[tuple[int, int], torch.Tensor] = {}

    def on_qkv(self, site, query, key, value):
        if self._key is None or site.name not in self.sites:
            return query, key, value
        self.injected.add((site.name, self._key))
        image = site.layout.image
        style_key = self._recorded(self.style, site, "key", query) * self.tau
        style_value = self._recorded(self.style, site, "value", query)
        image_query = query[:, :, image]
        if self.gamma > 0:
            content_query = self._recorded(self.content, site, "query", query)
            if content_query.shape[-2] != image_query.shape[-2]:
                raise InputError("the content cache was recorded at another size than this run's content")
            image_query = preserve_query(content_query, image_query, self.gamma)
        if self.mask is not None:
            return self._masked(site, query, key, value, image_query, style_key, style_value)
        query = _replace_tokens(query, image, image_query)
        return query, _replace_tokens(key, image, style_key), _replace_tokens(value, image, style_value)

    def softmax_scale(self, site: Site, default: float | None) -> float | None:
        if self._key is None or self.mask is None or site.name not in self.sites or default is not None:
            return default
        return 1.0 / math.sqrt(self._head_dim)  # the extra mask dimensions must not change the scale

    def _masked(self, site, query, key, value, image_query, style_key, style_value):
        """Queries over [current keys; style keys], each image query kept from one set (see the class doc)."""
        self._head_dim = query.shape[-1]
        image = site.layout.image
        inside = self._token_mask(site, image_query.shape[-2], query).to(query.dtype)  # (image tokens,)
        big = math.sqrt(_MASK_PENALTY * math.sqrt(self._head_dim))
        tokens, styled = query.shape[-2], style_key.shape[-2]
        query_extra = query.new_zeros(tokens, 2)
        query_extra[:, 1] = big  # text queries (and image queries outside): no style keys
        query_extra[image, 0], query_extra[image, 1] = big * inside, big * (1 - inside)
        key_extra = query.new_zeros(tokens + styled, 2)
        key_extra[image, 0] = -big  # current image keys: not for queries inside the mask
        key_extra[tokens:, 1] = -big  # style keys: not for queries outside
        mixed_query = torch.where(inside[:, None] > 0, image_query, query[:, :, image])
        query = _with_extra(_replace_tokens(query, image, mixed_query), query_extra)
        key = _with_extra(torch.cat([key, style_key.expand(key.shape[0], -1, -1, -1)], dim=2), key_extra)
        value = torch.cat([value, style_value.expand(value.shape[0], -1, -1, -1)], dim=2)
        return query, key, value

    def _recorded(self, cache, site: Site, name: str, like: torch.Tensor) -> torch.Tensor:
        tensor = cache.feature(site.name, self._key, name)
        return tensor.to(device=like.device, dtype=like.dtype, non_blocking=True).expand(like.shape[0], -1, -1, -1)

    def _token_mask(self, site: Site, tokens: int, like: torch.Tensor) -> torch.Tensor:
        grid = site.grid
        if grid is None or grid[0] * grid[1] != tokens:
            raise RuntimeError(f"cannot place the mask on {site.name}: {tokens} image tokens, unknown grid")
        if grid not in self._token_masks:
            resized = F.interpolate(self.mask.float(), size=grid, mode="area")[0, 0]
            self._token_masks[grid] = (resized >= 0.5).reshape(tokens)
        return self._token_masks[grid].to(like.device)


def _replace_tokens(tensor: torch.Tensor, image: slice, replacement: torch.Tensor) -> torch.Tensor:
    """``tensor`` (batch, heads, tokens, dim) with its ``image`` tokens replaced (any count): text kept in place."""
    return torch.cat([tensor[:, :, : image.start], replacement, tensor[:, :, image.stop :]], dim=2)


def _with_extra(tensor: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
    """(batch, heads, tokens, dim) with ``extra`` (tokens, 2) appended to every row's last dimension."""
    return torch.cat([tensor, extra.to(tensor.dtype).expand(*tensor.shape[:2], -1, -1)], dim=-1)


#: (step index, timestep, latents) -> latents: the generation's per-step hook (``callback_on_step_end``).
StepHook = Callable[[int, float, torch.Tensor], torch.Tensor]
