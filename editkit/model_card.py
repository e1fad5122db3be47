"""What a model's card and tokenizer say about a prompt: known words, the shapes-world tag.

A local diffusers folder may carry a ``README.md`` model card with YAML front matter. Two keys
matter here: ``tags`` (``shapes-world`` marks ``assets/models/shapes-sd``, whose natural verifier
is the shapes detector) and ``vocabulary`` (every word the model was trained on). Without a
vocabulary, a CLIP tokenizer is asked instead: a word it splits into many sub-word pieces is
probably rare for the text encoder.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

__all__ = ["card_metadata", "is_shapes_model", "vocabulary_warnings"]

logger = logging.getLogger(__name__)

_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")


def card_metadata(model: str | Path) -> dict[str, Any]:
    """The YAML front matter of ``model``'s ``README.md`` ({} for Hub ids, files, or no card)."""
    card = Path(model).expanduser() / "README.md"
    if not card.is_file():
        return {}
    from huggingface_hub import metadata_load

    try:
        return metadata_load(card) or {}
    except (OSError, ValueError) as error:  # an unreadable card only loses the hints
        logger.warning("cannot read the model card %s: %s", card, error)
        return {}


def is_shapes_model(model: str | Path) -> bool:
    """Whether ``model`` is a shapes-world model (``tags: [shapes-world]`` on its card)."""
    return "shapes-world" in (card_metadata(model).get("tags") or [])


def vocabulary_warnings(
    prompt: str, tokenizer, vocabulary: set[str] | None = None, *, max_pieces: int = 3
) -> list[str]:
    """One warning per distinct prompt word the model probably does not know.

    With ``vocabulary`` (the card's list): every word outside it. Otherwise: every word the
    tokenizer splits into ``max_pieces`` or more sub-word tokens (a heuristic: rare words, typos).
    """
    warnings, seen = [], set()
    for word in (m.group(0).lower() for m in _WORD.finditer(prompt)):
        if word in seen:
            continue
        seen.add(word)
        if vocabulary is not None:
            if word not in vocabulary:
                warnings.append(f"{word!r} is outside the model's training vocabulary (its model card lists it)")
            continue
        pieces = len(tokenizer(word, add_special_tokens=False).input_ids)
        if pieces >= max_pieces:
            warnings.append(f"{word!r} is split into {pieces} sub-word tokens: the text encoder may not know it")
    return warnings
