"""Reading JSON that a user (or a crafted file) supplies: bounded depth, finite numbers, one-line errors.

``json.loads`` turns 100,000 nested brackets into a RecursionError and accepts ``NaN``,
``Infinity`` and ``1e400`` (which becomes ``inf``); every JSON that editkit reads from outside
(constraints, prompt files, manifests, file headers) goes through :func:`parse_json` instead, so
such input is an :class:`~editkit.errors.InputError` (CLI exit code 2) naming what was read.
"""

from __future__ import annotations

import json
import math
from typing import Any

from editkit.errors import InputError

__all__ = ["MAX_JSON_DEPTH", "json_depth", "parse_json"]

#: Deepest nesting of arrays/objects accepted; editkit's own formats nest at most 4 levels.
MAX_JSON_DEPTH = 32


def parse_json(text: str | bytes, what: str, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """The value of ``text``; InputError ("``what`` is not valid JSON ...") when it is not
    JSON, nests deeper than ``max_depth``, or holds a non-finite number (NaN, Infinity, 1e400)."""
    try:
        data = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except json.JSONDecodeError as error:
        raise InputError(f"{what} is not valid JSON: {error.msg} (line {error.lineno})") from None
    except RecursionError:
        raise InputError(f"{what} is nested too deeply (at most {max_depth} levels)") from None
    except ValueError as error:  # from the hooks below, or an integer too long to convert
        raise InputError(f"{what} is not valid JSON: {error}") from None
    if json_depth(data) > max_depth:
        raise InputError(f"{what} is nested too deeply (at most {max_depth} levels)")
    return data


def json_depth(data: Any) -> int:
    """How deep arrays and objects nest in ``data`` (0 for a scalar), without recursion."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a finite number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is not a finite number")
    return value
