"""Recognising files by their first bytes: safetensors or a pickle (which editkit never loads).

A safetensors file starts with an 8-byte little-endian header length N followed by a JSON header
(``{``); a pickle starts with ``\\x80`` and its protocol (2-5), and ``torch.save`` writes a zip
archive (``PK\\x03\\x04``). Checking the layout, not only the first byte, matters: a valid
safetensors file whose header length ends in 0x80 must not be mistaken for a pickle.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["is_pickle", "looks_like_safetensors"]

_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOLS = range(2, 6)


def looks_like_safetensors(path: str | os.PathLike) -> bool:
    """Whether the file has the safetensors layout: a plausible header length, then a JSON object."""
    path = Path(path)
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) < 9:
        return False
    header_length = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 2 <= header_length <= path.stat().st_size - 8


def is_pickle(path: str | os.PathLike) -> bool:
    """Whether the file is a pickle or a ``torch.save`` zip archive (and not a safetensors file)."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    pickled = head[:1] == b"\x80" and len(head) > 1 and head[1] in _PICKLE_PROTOCOLS
    return (pickled or head == _ZIP_MAGIC) and not looks_like_safetensors(path)
