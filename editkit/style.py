"""Attention-swapping style transfer (AttenST / StyleID): AdaIN, feature recording, injection, style cache.

- ``content_aware_adain``: the initial latent (AttenST eq. for z_T; ``style_strength=1`` is StyleID's
  plain AdaIN, ``0`` keeps the content's colours).
- ``FeatureRecorder``: records, during an inversion, only what injection needs: the style's keys and
  values, or the content's queries, at the injected self-attention sites and timesteps (fp16,
  optionally offloaded to the CPU).
- ``StyleInjectionController``: during generation, at the injected sites and timesteps, the query
  becomes ``gamma * Q_content(t) + (1 - gamma) * Q(t)``, keys/values become the style's ``K(t), V(t)``
  and the logits are scaled by ``tau / sqrt(d)``; an optional mask limits the injected output to
  query tokens inside it.
- ``StyleCache`` (defined in ``editkit.style_file`` with its file format, re-exported here): recorded
  features + the inverted start latent, saved as safetensors with a JSON header (model fingerprint,
  sites, timesteps, size) validated on load and before reuse.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

from editkit.attention import AttentionController, QKVRecorder, Site, attention_sites, select_sites
from editkit.errors import InputError
from editkit.style_file import FEATURE_TIMINGS, StyleCache, check_feature_timing

__all__ = [
    "DEFAULT_SITE_PATTERNS",
    "FEATURE_TIMINGS",
    "FeatureRecorder",
    "StyleCache",
    "StyleInjectionController",
    "adain",
    "channel_stats",
    "check_feature_timing",
    "check_style_arguments",
    "content_aware_adain",
    "default_style_sites",
    "model_fingerprint",
    "resolve_style_sites",
]

logger = logging.getLogger(__name__)

# Decoder self-attention sites per model family (method note: StyleID's layers 7-12 for SD 1.x/2.x,
# AttenST's up_blocks.1.attentions.{1,2} for SDXL). The "sd" names hold for SD 1.x/2.x's four-level
# UNet only; ``default_style_sites`` resolves that family by level (its last two decoder levels).
DEFAULT_SITE_PATTERNS: dict[str, tuple[str, ...]] = {
    "sd": ("up_blocks.2.attentions", "up_blocks.3.attentions"),
    "sdxl": ("up_blocks.1.attentions.1", "up_blocks.1.attentions.2"),
}


# -- AdaIN ---------------------------------------------------------------------------------------
def channel_stats(latents: torch.Tensor, eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel mean and (population) std over the spatial dims: (B, C, 1, 1) each."""
    mean = latents.mean(dim=(-2, -1), keepdim=True)
    std = latents.std(dim=(-2, -1), keepdim=True, correction=0) + eps
    return mean, std


def adain(content: torch.Tensor, style: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """AdaIN: (z_c - mu_c) / (sigma_c + eps) * sigma_s + mu_s  (Huang & Belongie 2017, eq. 8)."""
    return content_aware_adain(content, style, style_strength=1.0, eps=eps)


def content_aware_adain(
    content: torch.Tensor, style: torch.Tensor, style_strength: float = 0.6, eps: float = 1e-5
) -> torch.Tensor:
    """z = (z_c - mu_c) / (sigma_c + eps) * (a_s sigma_s + a_c sigma_c) + (a_s mu_s + a_c mu_c), a_c = 1 - a_s.

    AttenST's content-aware AdaIN, per channel over spatial dims (the style may have another size).
    ``style_strength`` a_s = 1 is plain AdaIN (StyleID); a_s = 0 returns the content unchanged.
    """
    if not 0.0 <= style_strength <= 1.0:
        raise ValueError(f"style_strength must be in [0, 1], got {style_strength}")
    if style_strength == 0.0:
        return content
    dtype = content.dtype
    content, style = content.float(), style.float()
    mu_c, sigma_c = channel_stats(content)
    mu_s, sigma_s = channel_stats(style)
    a_s, a_c = style_strength, 1.0 - style_strength
    normalized = (content - mu_c) / (sigma_c + eps)
    return (normalized * (a_s * sigma_s + a_c * sigma_c) + (a_s * mu_s + a_c * mu_c)).to(dtype)


# -- sites and model identity ------------------------------------------------------------------
def default_style_sites(unet: torch.nn.Module) -> list[str]:
    """The decoder self-attention sites the method note recommends for this UNet's family.

    SD 1.x/2.x: StyleID's layers 7-12 are the self-attention of the last two decoder levels that have
    attention (``up_blocks.2`` and ``.3``: 32x32 and 64x64 tokens at 512 px, half and full latent
    resolution). They are chosen by level, not by name, so a UNet with fewer levels (the shapes model:
    ``up_blocks.1`` and ``.2``) gets its own last two, not a lone ``up_blocks.2``. SDXL: AttenST's
    named blocks; an SDXL-like UNet without them falls back to the same last-two-levels rule.
    """
    from editkit.models import model_family

    sites = [site for site in attention_sites(unet) if site.kind == "self"]
    family = model_family(unet)
    if family == "sdxl":
        patterns = DEFAULT_SITE_PATTERNS[family]
        chosen = [site.name for site in sites if any(_under(site.name, p) for p in patterns)]
        if chosen:
            return chosen
        logger.info("no %s sites in this UNet; using the self-attention of its last two decoder levels", patterns)
    blocks = sorted({site.block_index for site in sites if site.block == "up"})[-2:]
    return [site.name for site in sites if site.block == "up" and site.block_index in blocks]


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def resolve_style_sites(unet: torch.nn.Module, patterns: str | Sequence[str] | None) -> list[str]:
    """Self-attention site names of ``unet`` matching ``patterns`` (``None``: the family defaults)."""
    if patterns is None:
        return default_style_sites(unet)
    names = [site.name for site in attention_sites(unet)]
    try:
        return select_sites(names, patterns, kind="self")
    except ValueError as error:
        raise InputError(str(error)) from None


def model_fingerprint(unet: torch.nn.Module) -> str:
    """A short hash of the UNet's config and its first and last convolution weights."""
    digest = hashlib.sha256(json.dumps(dict(unet.config), sort_keys=True, default=str).encode())
    for module in (getattr(unet, "conv_in", None), getattr(unet, "conv_out", None)):
        if module is not None:
            digest.update(module.weight.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


# -- recording -----------------------------------------------------------------------------------
class FeatureRecorder(QKVRecorder):
    """Records ``keep`` (e.g. the style's key and value) at the given self-attention sites and timesteps.

    Only the timesteps in ``timesteps`` are stored (the injection window); a repeated call at the same
    (site, timestep), as when inversion resamples, overwrites: the last evaluation is kept.

    Inside the UNet the hook only holds on to the call's query, key and value (no copy, whatever
    ``keep`` and the window say); :meth:`flush`, run by the next ``begin_step`` and by ``records``,
    stores what is kept. A compiled UNet therefore sees one graph for a content inversion (queries),
    a style inversion (keys and values) and the steps outside the window. The price: one call's
    q/k/v at the recorded sites stay alive until the next step begins.
    """

    def __init__(
        self,
        sites: Sequence[str],
        keep: Sequence[str],
        timesteps: Iterable[int],
        dtype: torch.dtype = torch.float16,
        offload: str | torch.device | None = None,
    ) -> None:
        super().__init__(sites=None, keep=keep, dtype=dtype, offload=offload, kind="self")
        self.site_names = frozenset(sites)
        self.timesteps = frozenset(int(t) for t in timesteps)
        self._step_wanted = False
        self._pending: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def applies_to(self, site: Site) -> bool:
        return site.kind == "self" and site.name in self.site_names

    def begin_step(self, index: int, timestep: int | float | torch.Tensor) -> None:
        self.flush()
        super().begin_step(index, timestep)
        self._step_wanted = self.timestep in self.timesteps  # decided here: the hooks read no timestep

    def on_qkv(self, site, query, key, value):
        self._pending[site.name] = (query, key, value)
        return query, key, value

    def flush(self) -> None:
        """Store the kept features of the last UNet call (when its step is in the window)."""
        if self._pending and self._step is None:
            raise RuntimeError("FeatureRecorder needs begin_step(index, timestep) before each UNet call")
        if self._step_wanted:
            for name, (query, key, value) in self._pending.items():
                tensors = {"query": query, "key": key, "value": value}
                rows = self.rows(query.shape[0])
                self._step[name] = {part: self._stored(tensors[part][rows]) for part in self.keep}
        self._pending.clear()

    @property
    def records(self) -> dict[tuple[str, int], dict[str, torch.Tensor]]:
        self.flush()
        return super().records


# -- injection ------------------------------------------------------------------------------------
class StyleInjectionController(AttentionController):
    """AttenST's style-guided self-attention on ``sites`` at ``timesteps``.

    Args:
        sites: self-attention site names to inject at.
        style: a ``StyleCache`` of kind ``"style"`` (keys/values per site and timestep).
        content: a ``StyleCache`` of kind ``"content"`` (queries); needed when ``gamma > 0``.
        gamma: query preservation: ``Q = gamma * Q_content + (1 - gamma) * Q`` (AttenST/StyleID).
        tau: attention temperature: logits scaled by ``tau / sqrt(d)`` (> 1 sharpens).
        timesteps: the timesteps to inject at (``None``: every timestep the style cache holds).
        mask: optional ``(1, 1, H, W)`` mask in {0, 1} (any resolution): the injected attention output
            is used for query tokens inside it, the unmodified one elsewhere. This computes both
            attentions at the injected sites (one kernel call on a doubled batch).

    Every injected (site, timestep) is listed in ``injected`` (a set) for inspection. Per-step
    state is set up in ``begin_step`` (no timestep is read inside the hooks), so a compiled UNet
    keeps one graph across the injected steps.
    """

    def __init__(
        self,
        sites: Sequence[str],
        style: StyleCache,
        content: StyleCache | None = None,
        *,
        gamma: float = 0.75,
        tau: float = 1.5,
        timesteps: Iterable[int] | None = None,
        mask: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if gamma > 0 and content is None:
            raise ValueError("gamma > 0 needs the content's recorded queries")
        self.sites = frozenset(sites)
        self.style = style
        self.content = content
        self.gamma = float(gamma)
        self.tau = float(tau)
        self.timesteps = frozenset(int(t) for t in (style.timesteps if timesteps is None else timesteps))
        self.mask = mask
        self._token_masks: dict[tuple[int, int], torch.Tensor] = {}
        self._injected_by_step: dict[int, dict[str, int]] = {}
        # This step's state, set by begin_step: the hooks read no timestep, so torch.compile sees
        # the same graph at every injected step (dynamo would specialise on a Python timestep).
        self._step_active = False
        self._step_injected: dict[str, int] = {}  # site -> head_dim, for the sites injected so far
        self._step_features: dict[tuple[str, str], torch.Tensor] = {}

    @property
    def injected(self) -> set[tuple[str, int]]:
        """Every ``(site, timestep)`` injected so far."""
        return {(site, t) for t, sites in self._injected_by_step.items() for site in sites}

    def begin_step(self, index: int, timestep: int | float | torch.Tensor) -> None:
        super().begin_step(index, timestep)
        self._step_active = self.timestep in self.timesteps
        if not self._step_active:
            self._step_injected, self._step_features = {}, {}
            return
        self._step_injected = self._injected_by_step.setdefault(self.timestep, {})
        wanted = [(self.style, "key"), (self.style, "value")] + ([(self.content, "query")] if self.gamma > 0 else [])
        self._step_features = {
            (site, name): cache.feature(site, self.timestep, name) for site in self.sites for cache, name in wanted
        }

    def applies_to(self, site: Site) -> bool:
        return site.kind == "self" and site.name in self.sites

    def _active(self, site: Site) -> bool:
        return self._step_active and site.name in self.sites

    def on_qkv(self, site, query, key, value):
        if not self._active(site):
            return query, key, value
        batch = query.shape[0]
        self._step_injected[site.name] = query.shape[-1]
        style_key = self._recorded(site, "key", query).expand(batch, -1, -1, -1)
        style_value = self._recorded(site, "value", query).expand(batch, -1, -1, -1)
        injected_query = query
        if self.gamma > 0:
            content_query = self._recorded(site, "query", query)
            injected_query = preserve_query(content_query, query, self.gamma)
        if self.mask is None:
            return injected_query, style_key, style_value
        if style_key.shape[-2] != key.shape[-2]:
            raise InputError("a style mask needs the style at the content's size (same token count per layer)")
        return _doubled_batch(injected_query * self.tau, query, style_key, key, style_value, value)

    def softmax_scale(self, site: Site, default: float | None) -> float | None:
        if not self._active(site) or self.mask is not None:  # masked: tau is folded into the query
            return default
        base = default if default is not None else 1.0 / math.sqrt(self._step_injected[site.name])
        return self.tau * base

    def on_output(self, site: Site, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.mask is None or not self._active(site):
            return hidden_states
        tokens = hidden_states.shape[1] // 2
        injected, plain = hidden_states[:, :tokens], hidden_states[:, tokens:]
        inside = self._token_mask(site.grid, tokens, hidden_states)
        return torch.where(inside, injected, plain)

    def _recorded(self, site: Site, name: str, like: torch.Tensor) -> torch.Tensor:
        tensor = self._step_features[(site.name, name)]
        return tensor.to(device=like.device, dtype=like.dtype, non_blocking=True)

    def _token_mask(self, grid: tuple[int, int] | None, tokens: int, like: torch.Tensor) -> torch.Tensor:
        if grid is None or grid[0] * grid[1] != tokens:
            raise RuntimeError(f"cannot place the mask on a layer of {tokens} tokens (unknown grid)")
        if grid not in self._token_masks:
            resized = F.interpolate(self.mask.float(), size=grid, mode="area")[0, 0]
            self._token_masks[grid] = (resized >= 0.5).reshape(1, tokens, 1)
        return self._token_masks[grid].to(like.device)


def preserve_query(content_query: torch.Tensor, query: torch.Tensor, gamma: float) -> torch.Tensor:
    """Q = gamma * Q_content + (1 - gamma) * Q  (StyleID query preservation, eq. 5)."""
    return gamma * content_query + (1.0 - gamma) * query


def _doubled_batch(query_a, query_b, key_a, key_b, value_a, value_b):
    """Interleave rows (a_0, b_0, a_1, b_1, ...): the processor's reshape then puts b's tokens after a's."""

    def interleave(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.stack([a, b], dim=1).flatten(0, 1)  # (2 * batch, heads, tokens, head_dim)

    return interleave(query_a, query_b), interleave(key_a, key_b), interleave(value_a, value_b)


def check_style_arguments(content_image, styles, caches, gamma: float, tau: float, adain_strength, steps: int) -> None:
    """InputError for the style transfer arguments both families share: a content image, a style
    (image or cache), gamma in [0, 1], tau > 0, AdaIN strength in [0, 1] or None, steps >= 1."""
    if content_image is None:
        raise InputError("a content image is needed")
    if not styles and not caches:
        raise InputError("at least one style image or style cache is needed")
    if not 0.0 <= gamma <= 1.0:
        raise InputError(f"gamma must be in [0, 1], got {gamma}")
    if not tau > 0:
        raise InputError(f"tau must be > 0, got {tau}")
    if adain_strength is not None and not 0.0 <= adain_strength <= 1.0:
        raise InputError(f"adain_strength must be in [0, 1] (or None to skip AdaIN), got {adain_strength}")
    if steps < 1:
        raise InputError(f"num_inference_steps must be >= 1, got {steps}")
