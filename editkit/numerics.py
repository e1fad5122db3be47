"""Numerical fault checks: NaN/inf latents and images, out-of-memory advice.

Half-precision models can overflow (the SDXL VAE in float16 is the well-known case) and produce
NaN or infinite values that silently become black or noisy images. :func:`check_finite` turns them
into a :class:`~editkit.errors.NumericalError` naming where they appeared and the likely cause;
``editkit.inversion.decode_latents`` uses it (and retries a float16 VAE decode in float32 once).
"""

from __future__ import annotations

import torch

from editkit.errors import NumericalError

__all__ = ["APP_OUT_OF_MEMORY_ADVICE", "OUT_OF_MEMORY_ADVICE", "check_finite", "is_finite", "out_of_memory_message"]

OUT_OF_MEMORY_ADVICE = (
    "try a smaller --size/--height/--width, --dtype fp16, CPU offload, fewer cached steps or "
    "attention --sites, or --device cpu"
)


def is_finite(tensor: torch.Tensor) -> bool:
    """Whether every value of ``tensor`` is finite (no NaN, no +-inf)."""
    return bool(torch.isfinite(tensor).all())


def check_finite(tensor: torch.Tensor, where: str, *, advice: str | None = None) -> torch.Tensor:
    """Return ``tensor`` unchanged, or raise NumericalError naming ``where`` NaN/inf values appeared and why.

    ``where`` reads as a subject: "the UNet's latents at step 12", "the VAE decode".
    """
    if is_finite(tensor):
        return tensor
    kind = "NaN" if bool(torch.isnan(tensor).any()) else "infinite"
    if tensor.dtype in (torch.float16, torch.bfloat16):
        cause = f"{str(tensor.dtype).removeprefix('torch.')} overflow?"
        advice = advice or "try --dtype fp32 or bf16"
    else:
        cause = "diverged?"
        advice = advice or "try fewer steps or a lower guidance scale / learning rate"
    raise NumericalError(f"{where} produced {kind} values ({cause}): {advice}")


#: The same advice in the web demo's terms (its controls, and the options the demo starts with).
APP_OUT_OF_MEMORY_ADVICE = "try a smaller image, fewer steps, or restart the demo with --dtype fp16 or --device cpu"


def out_of_memory_message(error: BaseException, advice: str = OUT_OF_MEMORY_ADVICE) -> str:
    """One line for an out-of-memory error, with the knobs that reduce memory (CLI terms by default)."""
    first = (str(error).strip().splitlines() or ["out of memory"])[0][:160]
    return f"out of memory ({first}); {advice}"
