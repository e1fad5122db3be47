"""Kernel options for a pipeline's attention layer, set with diffusers' usual pipeline methods.

Diffusers' ``enable_xformers_memory_efficient_attention`` and ``enable_attention_slicing`` replace
the UNet's attention processors, which would bypass editkit's layer (``attach`` refuses or warns).
On editkit pipelines they choose the kernel of editkit's own processors instead, for every
``attach`` the pipeline makes:

- ``enable_xformers_memory_efficient_attention()``: xformers' memory-efficient kernel where it is
  installed and the tensors are on CUDA (SDPA with a warning otherwise);
- ``enable_attention_slicing()``: SDPA already never materialises the probabilities; what is left
  to bound is the explicit-probability path (maps for refinement, style statistics), whose query
  chunk becomes ``SLICED_CHUNK_SIZE`` rows (``set_attention_chunk_size`` sets any size);
- ``set_attention_sdpa_backends([SDPBackend.FLASH_ATTENTION])``: restrict SDPA's kernels.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

from editkit.attention.attach import attach
from editkit.attention.controller import AttentionController
from editkit.attention.kernels import AttentionKernel

logger = logging.getLogger(__name__)

#: Query rows per chunk of the explicit-probability path after ``enable_attention_slicing``.
SLICED_CHUNK_SIZE = 256


class AttentionKernelMixin:
    """Pipeline methods choosing the kernel of every editkit ``attach`` the pipeline makes."""

    @property
    def attention_kernel(self) -> AttentionKernel:
        """The kernel options in use (a fresh ``AttentionKernel`` per attach is built from them)."""
        kernel = self.__dict__.get("_editkit_attention_kernel")
        return kernel if kernel is not None else AttentionKernel()

    def _set_attention_kernel(self, **changes) -> None:
        current = self.attention_kernel
        options = {"backend": current.backend, "sdpa_backends": current.sdpa_backends, "chunk_size": current.chunk_size}
        self.__dict__["_editkit_attention_kernel"] = AttentionKernel(**(options | changes))

    def set_use_memory_efficient_attention_xformers(self, valid: bool, attention_op=None) -> None:
        """Called by ``enable_/disable_xformers_memory_efficient_attention``: editkit's xformers kernel.

        ``attention_op`` (a specific xformers operator) is not supported: xformers picks its own.
        """
        if attention_op is not None:
            logger.warning("attention_op is ignored: editkit lets xformers choose its operator")
        self._set_attention_kernel(backend="xformers" if valid else "sdpa")

    def set_attention_slice(self, slice_size) -> None:
        """Called by ``enable_/disable_attention_slicing``: chunks the explicit-probability path.

        SDPA and xformers never hold the full attention matrix, so there is nothing to slice there.
        ``None`` restores the default chunk; any other value (diffusers' ``"auto"``, ``"max"`` or a
        head count) uses ``SLICED_CHUNK_SIZE`` rows. ``set_attention_chunk_size`` sets an exact size.
        """
        chunk_size = AttentionKernel.chunk_size if slice_size is None else SLICED_CHUNK_SIZE
        self._set_attention_kernel(chunk_size=chunk_size)

    def set_attention_chunk_size(self, chunk_size: int) -> None:
        """Query rows per chunk where probabilities are computed explicitly (memory ~ chunk x keys)."""
        self._set_attention_kernel(chunk_size=int(chunk_size))

    def set_attention_sdpa_backends(self, sdpa_backends: Sequence[object] | None) -> None:
        """Restrict SDPA to these ``torch.nn.attention.SDPBackend`` members (``None``: torch chooses)."""
        self._set_attention_kernel(sdpa_backends=None if sdpa_backends is None else tuple(sdpa_backends))

    @contextlib.contextmanager
    def attach_controllers(
        self, controller: AttentionController | Sequence[AttentionController]
    ) -> Iterator[AttentionController]:
        """``attach(self.unet, controller)`` with this pipeline's kernel options."""
        kernel = self.attention_kernel
        with attach(
            self.unet,
            controller,
            backend=kernel.backend,
            sdpa_backends=kernel.sdpa_backends,
            chunk_size=kernel.chunk_size,
        ) as attached:
            yield attached
