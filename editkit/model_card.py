"""What a model's card and tokenizer say about a prompt: known words, the shapes-world tag.

A local diffusers folder may carry a ``README.md`` model card with YAML front matter. Three keys
matter here: ``tags`` (``shapes-world`` marks ``assets/models/shapes-sd``, whose natural verifier
is the shapes detector), ``vocabulary`` (every word the model was trained on) and, for SD3 / FLUX
models, ``max_sequence_length`` (the T5 tokens the model was trained with: 0 for
``assets/models/shapes-sd3``, which has no T5; diffusers' pipelines would append 256 zero tokens). Without a
vocabulary, a CLIP tokenizer is asked instead: a word it splits into many sub-word pieces is
probably rare for the text encoder.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

__all__ = ["card_metadata", "card_sequence_length", "is_shapes_model", "vocabulary_warnings"]

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


def card_sequence_length(pipe: Any) -> int | None:
    """The ``max_sequence_length`` a loaded pipeline's model card names (None: none named, or no local card).

    A value that is not a whole number >= 0 is ignored with a warning (the card is a hint, not an input)."""
    model = getattr(pipe, "name_or_path", None)
    value = card_metadata(model).get("max_sequence_length") if model else None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        logger.warning("ignoring max_sequence_length %r in the model card of %s (not a whole number >= 0)",
                       value, model)  # fmt: skip
        return None
    return value


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
