"""SoftREPA's held-out alignment metrics (the keep-best choice): in-group captions and hard negatives.

Both ask whether an image's own caption has the lowest denoising error, with errors summed over
the fixed validation timesteps and one fixed noise per timestep:

- ``"group"``: among the captions of a group of ``val_group`` validation images (random captions,
  which differ in several attributes; chance 1 / group);
- ``"hard-negatives"``: among the own caption and its hard negatives
  (:func:`editkit.softrepa.hard_negatives.hard_negatives`: colours swapped, relation flipped),
  the distinctions generation gets wrong; images whose caption has none are skipped.

Each metric is ``[accuracy, margin]`` with margin the mean ``min(other errors) - own error`` per
timestep (a tie-breaker), or ``None`` when no image counted.
"""

from __future__ import annotations

import torch

from editkit.softrepa.config import KEEP_BEST_METRICS
from editkit.softrepa.hard_negatives import hard_negatives
from editkit.softrepa.loss import pair_errors

__all__ = ["METRICS", "held_out_metrics", "summarise"]

METRICS = KEEP_BEST_METRICS


def summarise(own: list[float], others: list[float], num_timesteps: int) -> list[float] | None:
    """``[accuracy, margin]`` of own errors against the lowest other error per image (``None``: no image)."""
    if not own:
        return None
    hits = [o < m for o, m in zip(own, others, strict=True)]
    margins = [(m - o) / num_timesteps for o, m in zip(own, others, strict=True)]
    return [sum(hits) / len(hits), sum(margins) / len(margins)]


def _group_errors(trainer, latents, columns, timestep_index: int, timestep: int, hard_columns: dict):
    """This timestep's ``(group, group)`` error matrix and each hard-negative row ``[own, *negatives]``."""
    generator = torch.Generator().manual_seed(trainer.config.seed + 104729 + timestep_index)
    _, noisy, target = trainer.noised(latents, generator, timestep)
    trainer.controller.begin_step(-1, timestep)
    predict = trainer.predictor(timestep)
    rows = slice(0, latents.shape[0])
    errors = pair_errors(predict, noisy, target, columns.prompt_embeds, rows, columns.added_cond_kwargs)
    hard = {
        i: pair_errors(predict, noisy, target, c.prompt_embeds, slice(i, i + 1), c.added_cond_kwargs)[0]
        for i, c in hard_columns.items()
    }
    return errors, hard


@torch.no_grad()
def held_out_metrics(trainer) -> dict[str, list[float] | None]:
    """Both held-out metrics of ``trainer``'s current tokens on its validation set (see the module)."""
    config, val_set = trainer.config, trainer.val_set
    group = max(2, min(config.val_group, len(val_set)))
    own = {name: [] for name in METRICS}
    others = {name: [] for name in METRICS}
    for start in range(0, len(val_set) - group + 1, group):
        images, captions = val_set.batch(start, group, list(range(len(val_set))))
        latents, columns = trainer.latents(images), trainer.encode(captions)
        hard_columns = {}
        for i, caption in enumerate(captions):
            negatives = hard_negatives(caption)
            if negatives:
                hard_columns[i] = trainer.encode([caption, *negatives])
        errors = torch.zeros(group, group, device=trainer.device)
        hard = {i: 0.0 for i in hard_columns}
        for index, timestep in enumerate(config.val_timesteps):
            step_errors, step_hard = _group_errors(trainer, latents, columns, index, timestep, hard_columns)
            errors += step_errors
            hard = {i: hard[i] + step_hard[i] for i in hard}
        masked = errors + torch.diag(torch.full((group,), float("inf"), device=trainer.device))
        own["group"] += errors.diagonal().tolist()
        others["group"] += masked.min(dim=1).values.tolist()
        own["hard-negatives"] += [float(row[0]) for row in hard.values()]
        others["hard-negatives"] += [float(row[1:].min()) for row in hard.values()]
    steps = len(config.val_timesteps)
    return {name: summarise(own[name], others[name], steps) for name in METRICS}
