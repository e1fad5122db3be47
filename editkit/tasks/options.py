"""Options dataclasses with their defaults and ranges written once, and validated once.

Every method's options are a frozen dataclass whose fields are made with :func:`knob`: the
default, a one-line help text, the valid range (checked by :func:`check_options`, which each
dataclass calls in ``__post_init__``) and, for the app, a suggested slider range inside it. The
CLI turns its arguments into these options (its defaults and help come from here through
:func:`cli_default` and :func:`cli_help`), the app turns its form into the same options; a bad
value raises :class:`OptionError`, which names the field so each front end can name its own
control.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from editkit.errors import InputError

__all__ = [
    "Knob",
    "OptionError",
    "check_options",
    "cli_default",
    "cli_help",
    "defaults_table",
    "is_finite_number",
    "knob",
    "knob_of",
]


class OptionError(InputError):
    """A value outside an option's range; ``field`` is the dataclass field, ``problem`` the reason."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field} {problem}")
        self.field = field
        self.problem = problem


@dataclass(frozen=True)
class Knob:
    """What a field's metadata holds: help, range, choices, label and the app's slider (low, high, step)."""

    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: value > low (e.g. a temperature > 0)
    choices: tuple[Any, ...] | None = None
    label: str | None = None
    slider: tuple[float, float, float] | None = None
    integer: bool = False

    def check(self, name: str, value: Any) -> None:
        """Raise :class:`OptionError` unless ``value`` is valid (``None`` is valid for optional fields)."""
        if value is None:
            return
        if self.choices is not None:
            if value not in self.choices:
                raise OptionError(name, f"must be one of {', '.join(map(str, self.choices))}, got {value!r}")
            return
        if self.low is None and self.high is None and not self.integer:
            return
        if not is_finite_number(value):
            raise OptionError(name, f"must be a finite number, got {value!r}")
        if self.integer and value != int(value):
            raise OptionError(name, f"must be a whole number, got {value!r}")
        self._check_range(name, value)

    def _check_range(self, name: str, value: float) -> None:
        if self.low is not None and self.low_open and not value > self.low:
            raise OptionError(name, f"must be greater than {self.low:g}, got {value:g}")
        if self.low is not None and not self.low_open and value < self.low:
            above = "at least" if self.high is None else "between"
            bound = f"{self.low:g}" if self.high is None else f"{self.low:g} and {self.high:g}"
            raise OptionError(name, f"must be {above} {bound}, got {value:g}")
        if self.high is not None and value > self.high:
            bound = f"at most {self.high:g}" if self.low is None else f"between {self.low:g} and {self.high:g}"
            raise OptionError(name, f"must be {bound}, got {value:g}")


def is_finite_number(value: Any) -> bool:
    """An int or float (not a bool) that is neither infinite nor NaN."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def knob(default: Any, help: str, **spec: Any) -> Any:
    """A dataclass field with a default and a :class:`Knob` (``low``, ``high``, ``choices``, ``slider``, ...)."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple default")
    return dataclasses.field(default=default, metadata={"knob": Knob(help, **spec)})


def knob_of(options: type | Any, name: str) -> Knob:
    """The :class:`Knob` of field ``name``."""
    for item in dataclasses.fields(options):
        if item.name == name:
            return item.metadata["knob"]
    raise KeyError(name)


def check_options(options: Any) -> None:
    """Check every field of an options dataclass against its knob (call it in ``__post_init__``)."""
    for item in dataclasses.fields(options):
        knob_spec = item.metadata.get("knob")
        if knob_spec is not None:
            knob_spec.check(item.name, getattr(options, item.name))


def cli_default(options: type, name: str) -> Any:
    """The default of field ``name`` (what the CLI's flag defaults to)."""
    for item in dataclasses.fields(options):
        if item.name == name:
            return item.default
    raise KeyError(name)


def cli_help(options: type, name: str) -> str:
    """The help of field ``name`` with argparse's ``%(default)s``; the range when it has one."""
    spec = knob_of(options, name)
    text = spec.help
    if spec.low is not None or spec.high is not None:
        low = "" if spec.low is None else (f"> {spec.low:g}" if spec.low_open else f">= {spec.low:g}")
        high = "" if spec.high is None else f"<= {spec.high:g}"
        text += f"; {', '.join(part for part in (low, high) if part)}"
    if cli_default(options, name) is not None:
        text += " (default: %(default)s)"
    return text


def defaults_table(rows: Sequence[tuple[str, type, dict[str, str]]]) -> str:
    """A Markdown table of defaults: one row per (method, options class, {field: "CLI flag"})."""
    lines = ["| method | option (CLI flag, API argument) | default | valid |", "| --- | --- | --- | --- |"]
    for method, options, flags in rows:
        for name, flag in flags.items():
            spec = knob_of(options, name)
            valid = _valid_text(spec)
            default = cli_default(options, name)
            shown = "the model's" if default is None else f"`{default}`"
            lines.append(f"| {method} | `{flag}`, `{name}` | {shown} | {valid} |")
    return "\n".join(lines)


def _valid_text(spec: Knob) -> str:
    if spec.choices is not None:
        return ", ".join(f"`{choice}`" for choice in spec.choices)
    low = "" if spec.low is None else (f"> {spec.low:g}" if spec.low_open else f">= {spec.low:g}")
    high = "" if spec.high is None else f"<= {spec.high:g}"
    return ", ".join(part for part in (low, high) if part) or "any"
