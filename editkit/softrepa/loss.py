"""SoftREPA's contrastive denoising objective: the B x B error matrix, logits, cross-entropy.

For images ``x_i`` and captions ``c_j`` of a batch, one timestep ``t`` and one noise sample
``eps`` are shared by every pair; ``err[i, j] = mean((target_i - model(x_i,t, c_j))^2)``. The
matching caption should have the lowest error: logits ``-err / tau`` or ``s * exp(-err / tau)``
(the reference code), cross-entropy over captions per image (rows), over images per caption
(columns) or both, plus ``denoise_weight`` times the plain denoising loss of the matched pairs.
Extra columns (a negative bank of caption embeddings) act as negatives for the rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "ContrastiveLossConfig",
    "contrastive_loss",
    "diffusion_target",
    "error_logits",
    "noisy_latents",
    "pair_errors",
    "row_chunks",
]

DIRECTIONS = ("rows", "columns", "both")
LOGIT_FORMS = ("exp", "linear")


@dataclass(frozen=True)
class ContrastiveLossConfig:
    """The objective's knobs (defaults: the reference code).

    Args:
        logit_form: ``"exp"`` for ``scale * exp(-err / tau)``, ``"linear"`` for ``-err / tau``.
        tau: temperature of the errors (0.07 in the reference).
        scale: ``s`` of the exponential form (4 in the reference).
        direction: cross-entropy over captions per image (``"rows"``), over images per caption
            (``"columns"``) or the mean of both.
        denoise_weight: weight of the plain denoising loss on the matched pairs (10 in the reference).
    """

    logit_form: str = "exp"
    tau: float = 0.07
    scale: float = 4.0
    direction: str = "rows"
    denoise_weight: float = 10.0

    def __post_init__(self) -> None:
        if self.logit_form not in LOGIT_FORMS:
            raise ValueError(f"logit_form must be one of {LOGIT_FORMS}, got {self.logit_form!r}")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {self.direction!r}")
        if not self.tau > 0:
            raise ValueError(f"tau must be positive, got {self.tau}")


def noisy_latents(latents: torch.Tensor, noise: torch.Tensor, alpha_prod: torch.Tensor) -> torch.Tensor:
    """Forward diffusion ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps`` (DDPM eq. 4)."""
    return alpha_prod.sqrt() * latents + (1 - alpha_prod).sqrt() * noise


def diffusion_target(latents: torch.Tensor, noise: torch.Tensor, alpha_prod: torch.Tensor, prediction_type: str):
    """The regression target: ``eps``, or ``v = sqrt(a_t) eps - sqrt(1 - a_t) x_0`` (Salimans & Ho eq. 11)."""
    if prediction_type == "epsilon":
        return noise.expand_as(latents)
    if prediction_type == "v_prediction":
        return alpha_prod.sqrt() * noise - (1 - alpha_prod).sqrt() * latents
    raise ValueError(f"unsupported prediction type {prediction_type!r} (epsilon or v_prediction)")


def error_logits(errors: torch.Tensor, config: ContrastiveLossConfig) -> torch.Tensor:
    """Logits from denoising errors: ``-err / tau`` or ``s * exp(-err / tau)`` (SoftREPA eq. 6)."""
    if config.logit_form == "linear":
        return -errors / config.tau
    return config.scale * torch.exp(-errors / config.tau)


def contrastive_loss(
    errors: torch.Tensor, config: ContrastiveLossConfig, rows: slice | None = None, batch_size: int | None = None
) -> torch.Tensor:
    """Contrastive loss of an error matrix ``(rows, columns)``; column ``i`` matches image ``i``.

    With ``rows`` (the absolute image indices of ``errors``' rows) and ``batch_size`` the result is
    this chunk's share of the full batch loss (row direction only), so chunk losses sum to the
    full loss and can be backpropagated one chunk at a time.
    """
    rows = rows if rows is not None else slice(0, errors.shape[0])
    batch_size = batch_size if batch_size is not None else errors.shape[0]
    labels = torch.arange(rows.start, rows.stop, device=errors.device)
    logits = error_logits(errors, config)
    matched = errors[torch.arange(errors.shape[0], device=errors.device), labels]
    denoise = config.denoise_weight * matched.sum() / batch_size
    row_loss = F.cross_entropy(logits, labels, reduction="sum") / batch_size
    if config.direction == "rows":
        return row_loss + denoise
    if errors.shape[0] != batch_size:
        raise ValueError("the column direction needs the whole error matrix (no row chunks)")
    column_loss = F.cross_entropy(logits[:, :batch_size].T, labels, reduction="mean")
    if config.direction == "columns":
        return column_loss + denoise
    return 0.5 * (row_loss + column_loss) + denoise


def row_chunks(batch_size: int, chunk_rows: int | None) -> list[slice]:
    """Row slices of at most ``chunk_rows`` rows covering ``batch_size`` (``None``: one chunk)."""
    step = batch_size if not chunk_rows else max(1, int(chunk_rows))
    return [slice(start, min(start + step, batch_size)) for start in range(0, batch_size, step)]


def pair_errors(
    predict: Callable[[torch.Tensor, torch.Tensor, dict | None], torch.Tensor],
    noisy: torch.Tensor,
    target: torch.Tensor,
    prompt_embeds: torch.Tensor,
    rows: slice,
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``err[i, j]`` for images ``rows`` against every caption: one model call on all those pairs.

    ``predict(sample, prompt_embeds, added_cond_kwargs)`` is the denoiser at the shared timestep;
    ``noisy``/``target``: ``(B, C, H, W)``; ``prompt_embeds``: ``(N, T, D)`` for N captions.
    Returns ``(rows, N)``.
    """
    num_rows = rows.stop - rows.start
    num_captions = prompt_embeds.shape[0]
    sample = noisy[rows].repeat_interleave(num_captions, dim=0)  # (rows * N, C, H, W), image-major
    context = prompt_embeds.repeat(num_rows, 1, 1)
    added = None
    if added_cond_kwargs is not None:
        added = {key: value.repeat(num_rows, *[1] * (value.ndim - 1)) for key, value in added_cond_kwargs.items()}
    prediction = predict(sample, context, added).float()
    prediction = prediction.view(num_rows, num_captions, *prediction.shape[1:])
    squared = (prediction - target[rows].float().unsqueeze(1)) ** 2
    return squared.mean(dim=(2, 3, 4))
