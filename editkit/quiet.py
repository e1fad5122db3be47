"""Known, harmless log messages of diffusers and transformers, filtered at the program's edges.

:func:`quiet_library_noise` is called by the edges only (``editkit.cli.main``, the app's
launcher, the quickstart notebook), never when the library is imported: a program that uses
editkit as a library keeps every message of its dependencies. Each filter drops one message,
matched by its text, on the one logger that emits it; everything else on those loggers passes:

- transformers, ``transformers.utils.import_utils``: "`CLIPImageProcessor` requires torchvision
  (not installed); falling back to `CLIPImageProcessorPil`" (and the same for ``Siglip...``), logged
  when diffusers' pipeline modules import the class names. editkit does not need torchvision; the
  PIL processors it falls back to are what transformers 4 used.
- diffusers, ``diffusers.models.modeling_utils``: "There are modules in X that should be kept in
  float32: []", logged on every ``ModelMixin.to(dtype)`` even when the list is **empty** (nothing is
  kept in float32: ``from_pipe(..., dtype=)`` casts each model and logs it each time). The message
  with a non-empty list is kept. editkit's own casts avoid it (``vae.float()``/``vae.half()``).

``ResourceWarning`` ("unclosed event loop", from gradio's launch) is Python's own business:
Python ignores it by default, and the CLI sends it to the ``--debug`` log (``editkit.cli``).
"""

from __future__ import annotations

import logging
import re

__all__ = ["NOISE", "MessageFilter", "quiet_library_noise"]

#: logger name -> patterns of the harmless messages it emits (see the module docstring).
NOISE: dict[str, tuple[str, ...]] = {
    "transformers.utils.import_utils": (r"^`\w+ImageProcessor` requires torchvision \(not installed\); falling back",),
    "diffusers.models.modeling_utils": (r"^There are modules in \w+ that should be kept in float32: \[\]\.",),
}


class MessageFilter(logging.Filter):
    """Drops records whose message matches one of ``patterns`` (``re.search``); passes the rest."""

    def __init__(self, patterns: tuple[str, ...]) -> None:
        super().__init__()
        self.patterns = tuple(re.compile(pattern) for pattern in patterns)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(pattern.search(message) for pattern in self.patterns)


def quiet_library_noise(noise: dict[str, tuple[str, ...]] | None = None) -> None:
    """Install a :class:`MessageFilter` on each logger of ``noise`` (default :data:`NOISE`); idempotent."""
    for name, patterns in (NOISE if noise is None else noise).items():
        logger = logging.getLogger(name)
        if not any(isinstance(existing, MessageFilter) for existing in logger.filters):
            logger.addFilter(MessageFilter(patterns))
