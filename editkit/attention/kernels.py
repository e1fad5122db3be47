"""Attention kernels: every place editkit computes ``softmax(q k^T * scale) v``.

- ``sdpa``: torch's ``scaled_dot_product_attention`` (default), optionally restricted to chosen
  backends with ``torch.nn.attention.sdpa_kernel``;
- ``xformers``: ``xformers.ops.memory_efficient_attention`` when installed and on CUDA,
  otherwise a warning (once per kernel object) and SDPA;
- ``explicit_attention``: the probabilities materialised, used only on calls where a controller
  asks for them, chunked over queries so the working memory is bounded by the chunk size.

Memory-efficient kernels never return probabilities; temperature goes through ``scale``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

__all__ = ["AttentionKernel", "explicit_attention", "xformers_available"]

ProbsCallback = Callable[[torch.Tensor, slice], None]


def xformers_available() -> bool:
    """Whether ``xformers.ops`` imports (it is an optional extra)."""
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # ImportError, or a broken binary build
        return False
    return True


def explicit_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    chunk_size: int = 1024,
    on_probs: ProbsCallback | None = None,
) -> torch.Tensor:
    """softmax(Q K^T * scale + mask) V with the probabilities handed to ``on_probs`` per chunk.

    Shapes: ``(batch, heads, tokens, head_dim)``; ``attn_mask`` additive or boolean, broadcast
    to ``(batch, heads, queries, keys)``. At most ``chunk_size`` query rows are materialised at
    a time. Differentiable (used with gradients for cross-attention map losses).
    """
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    num_queries = query.shape[-2]
    outputs = []
    for start in range(0, num_queries, chunk_size):
        rows = slice(start, min(start + chunk_size, num_queries))
        logits = torch.matmul(query[..., rows, :], key.transpose(-1, -2)) * scale
        if attn_mask is not None:
            mask = attn_mask[..., rows, :] if attn_mask.shape[-2] == num_queries else attn_mask
            logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
        probs = logits.softmax(dim=-1)
        if on_probs is not None:
            on_probs(probs, rows)
        outputs.append(torch.matmul(probs, value))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-2)


@dataclass
class AttentionKernel:
    """The kernel choice for one ``attach``.

    Args:
        backend: ``"sdpa"`` (default) or ``"xformers"``.
        sdpa_backends: restrict SDPA to these ``torch.nn.attention.SDPBackend`` members
            (e.g. ``[SDPBackend.FLASH_ATTENTION]``); ``None`` lets torch choose.
        chunk_size: query rows per chunk on the explicit-probability path.
    """

    backend: str = "sdpa"
    sdpa_backends: Sequence[object] | None = None
    chunk_size: int = 1024
    _warned: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        if self.backend not in ("sdpa", "xformers"):
            raise ValueError(f"unknown attention backend {self.backend!r}; use 'sdpa' or 'xformers'")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of query rows, got {self.chunk_size}")

    def __call__(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        scale: float | None = None,
        on_probs: ProbsCallback | None = None,
    ) -> torch.Tensor:
        """Attention output ``(batch, heads, queries, head_dim)``."""
        if on_probs is not None:
            return explicit_attention(query, key, value, attn_mask, scale, self.chunk_size, on_probs)
        if self.backend == "xformers" and self._xformers_usable(query):
            return self._xformers(query, key, value, attn_mask, scale)
        with self._sdpa_context():
            if scale is None:  # keep the call identical to AttnProcessor2_0 (bit-exact pass-through)
                return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask)
            return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, scale=scale)

    def _sdpa_context(self):
        if self.sdpa_backends is None:
            return contextlib.nullcontext()
        from torch.nn.attention import sdpa_kernel

        return sdpa_kernel(list(self.sdpa_backends))

    def _xformers_usable(self, query: torch.Tensor) -> bool:
        if query.is_cuda and xformers_available():
            return True
        if not self._warned:
            reason = "not installed" if not xformers_available() else "needs CUDA tensors"
            logger.warning("xformers attention %s; using torch SDPA instead", reason)
            self._warned = True
        return False

    @staticmethod
    def _xformers(query, key, value, attn_mask, scale) -> torch.Tensor:
        import xformers.ops as xops

        # xformers layout is (batch, tokens, heads, head_dim)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~attn_mask, float("-inf")
            )
        if attn_mask is not None:
            attn_mask = attn_mask.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
        out = xops.memory_efficient_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_bias=attn_mask, scale=scale
        )
        return out.transpose(1, 2)
