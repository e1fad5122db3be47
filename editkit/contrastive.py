"""Delta denoising score and patch-wise contrastive losses: DDS, CDS and the dual contrastive loss.

The numerics of score-distillation editing as small pure functions, plus the feature recorder that
collects self-attention features on the shared attention layer:

- DDS (Hertz et al., ICCV 2023): noise the source and the edited latent with the SAME timestep
  and noise; the edit direction is ``eps_hat(z_t_trg, y_trg) - eps_hat(z_t_src, y_src)`` with
  classifier-free guidance on both branches (v-prediction converted to eps first).
- CDS (Nam et al., CVPR 2024): a PatchNCE loss (CUT, Park et al. 2020) between self-attention
  features of the source branch (no grad) and the target branch (backpropagated to the latent)
  keeps the structure. CDS anchors on the source patch; CUT anchors on the generated patch.
- ``"dual"``: the dual contrastive denoising score (DCDS, arXiv 2508.12718) has no released code.
  editkit's reading, an interpretation and not the paper's code, is DCLGAN's two NCE terms: the
  mean of the source-anchored and the target-anchored PatchNCE on the same patches. Other readings
  are one option away: ``direction="source"`` or ``"target"`` alone; the pipeline's
  ``identity_branch=True`` (also contrast with the edited latent under the source prompt); the
  compared feature (``feature=`` output / query / key / value) and layers (``contrast_sites=``).

PatchNCE itself lives in :mod:`editkit.patchnce` (re-exported here). Features are recorded by
site name for a named branch (``"source"``, ``"target"``, ``"identity"``), never by position in
the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.utils.torch_utils import randn_tensor

from editkit.attention import AttentionController, Site, site_matches
from editkit.conditioning import classifier_free_guidance
from editkit.inversion import model_eps
from editkit.patchnce import (
    DIRECTIONS,
    batched_patch_nce,
    contrastive_loss,
    patch_nce,
    patch_nce_loss,
    pool_patches,
    sample_locations,
    tokens_to_grid,
)

__all__ = [
    "DIRECTIONS",
    "FEATURES",
    "ContrastiveFeatureRecorder",
    "batched_patch_nce",
    "classifier_free_guidance",
    "contrastive_loss",
    "dds_gradient",
    "dds_latent_gradient",
    "guided_eps",
    "noise_latents",
    "patch_nce",
    "patch_nce_loss",
    "pool_patches",
    "sample_locations",
    "sample_noise",
    "sample_timestep",
    "sample_timesteps",
    "tokens_to_grid",
]

FEATURES = ("output", "query", "key", "value")
DEFAULT_SITES = ("up_blocks",)
#: Latent pixels of SD 1.x at 512 px, where the reference scale 2000 / (H_lat * W_lat) was tuned.
REFERENCE_LATENT_PIXELS = 64 * 64


# -- DDS ----------------------------------------------------------------------------------------
def noise_latents(latents: torch.Tensor, noise: torch.Tensor, alpha_prod: torch.Tensor | float) -> torch.Tensor:
    """z_t = sqrt(a_t) z_0 + sqrt(1 - a_t) eps  (DDPM forward process, Ho et al. 2020, eq. 4)."""
    return alpha_prod**0.5 * latents + (1 - alpha_prod) ** 0.5 * noise


def guided_eps(
    uncond: torch.Tensor,
    cond: torch.Tensor,
    latents: torch.Tensor,
    alpha_prod: torch.Tensor | float,
    *,
    guidance_scale: float = 7.5,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """eps_hat of the guided model output at z_t (v-prediction: eps = sqrt(a_t) v + sqrt(1 - a_t) z_t), fp32."""
    output = classifier_free_guidance(uncond.float(), cond.float(), guidance_scale)
    return model_eps(output, latents.float(), alpha_prod, prediction_type)


def dds_gradient(eps_target: torch.Tensor, eps_source: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """grad = w(t) (eps_hat(z_t_trg, y_trg) - eps_hat(z_t_src, y_src))  (DDS, Hertz et al. 2023, eq. 5)."""
    return weight * (eps_target - eps_source)


def dds_latent_gradient(
    gradient: torch.Tensor,
    *,
    loss_scale: float = 2000.0,
    reference_pixels: int = REFERENCE_LATENT_PIXELS,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """d/dz of loss_scale * sum(m * z * grad) / reference_pixels: a per-element step free of resolution.

    The reference code divides by the latent's own H * W (2000 / 4096 at 64x64); dividing by a fixed
    ``reference_pixels`` keeps that step at every resolution. This scale belongs to the DDS surrogate
    only: CDS backpropagates its PatchNCE loss as ``w_cut * loss`` with no other factor
    (``(cutloss * 3).backward()`` in the CDS release).
    """
    gradient = gradient * (loss_scale / reference_pixels)
    return gradient if mask is None else gradient * mask


def sample_timestep(generator: torch.Generator | None, *, min_timestep: int = 50, max_timestep: int = 950) -> int:
    """One timestep uniform in [min_timestep, max_timestep), drawn from ``generator``."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(min_timestep, max_timestep, (1,), generator=generator, device=device).item())


def sample_timesteps(
    generator: torch.Generator | list[torch.Generator] | None,
    batch: int,
    *,
    min_timestep: int = 50,
    max_timestep: int = 950,
) -> torch.Tensor:
    """(batch,) timesteps: one draw shared by the batch, or one per generator of a list (one per item)."""
    generators = generator if isinstance(generator, list) else [generator]
    drawn = [sample_timestep(g, min_timestep=min_timestep, max_timestep=max_timestep) for g in generators]
    return torch.tensor(drawn if isinstance(generator, list) else drawn * batch)


def sample_noise(
    shape: Sequence[int], generator: torch.Generator | None, device: torch.device, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Standard normal noise from ``generator`` (diffusers' ``randn_tensor``: any generator device)."""
    return randn_tensor(tuple(shape), generator=generator, device=device, dtype=dtype)


# -- features on the shared attention layer -----------------------------------------------------
class ContrastiveFeatureRecorder(AttentionController):
    """Self-attention features by site, for the branch the pipeline names before each UNet call.

    Args:
        sites: site patterns (up-block self-attention by default).
        feature: ``"output"`` (after ``to_out``, the default), ``"query"``, ``"key"`` or ``"value"``.
        role: batch role whose rows are kept (``"cond"``); a call without that role records nothing.
        grad_branches: branches whose features stay in the autograd graph; the others are detached.

    Set ``branch`` (e.g. ``"source"``, ``"target"``) before a UNet call and back to ``None`` after;
    ``features[branch][site]`` is ``(batch, tokens, channels)``, ``grids[site]`` its token grid.
    Repeated calls (gradient checkpointing) overwrite by site.
    """

    def __init__(
        self,
        sites: str | Sequence[str] | None = DEFAULT_SITES,
        feature: str = "output",
        role: str | None = "cond",
        grad_branches: Sequence[str] = ("target",),
    ) -> None:
        super().__init__()
        if feature not in FEATURES:
            raise ValueError(f"feature must be one of {FEATURES}, got {feature!r}")
        self.site_patterns = sites
        self.feature = feature
        self.role = role
        self.grad_branches = tuple(grad_branches)
        self.branch: str | None = None
        self.features: dict[str, dict[str, torch.Tensor]] = {}
        self.grids: dict[str, tuple[int, int] | None] = {}

    def applies_to(self, site: Site) -> bool:
        return site.is_self and site_matches(site.name, self.site_patterns)

    def on_qkv(self, site, query, key, value):
        if self.feature != "output":
            tensor = {"query": query, "key": key, "value": value}[self.feature]
            self._record(site, tensor.transpose(1, 2).flatten(2))  # (batch, tokens, heads * head_dim)
        return query, key, value

    def on_output(self, site: Site, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.feature == "output":
            self._record(site, hidden_states)
        return hidden_states

    def _record(self, site: Site, tensor: torch.Tensor) -> None:
        if self.branch is None or (self.batch_roles and self.role not in self.batch_roles):
            return
        rows = self.role_rows(self.role, tensor.shape[0]) if self.role is not None else slice(None)
        kept = tensor[rows]
        self.features.setdefault(self.branch, {})[site.name] = (
            kept if self.branch in self.grad_branches else kept.detach()
        )
        self.grids[site.name] = site.grid

    def clear(self) -> None:
        """Forget the features and grids (each iteration starts from the same state: no retrace)."""
        self.features.clear()
        self.grids.clear()
