"""How the page shows a run: an enlarged copy of small results, the compose report as a table,
errors in the Messages box, messages without server paths.

The API endpoints (``/stylize``, ...) return the handlers' values unchanged (the true-size image,
the constraint report as JSON, errors raised); :func:`page_event` wraps a handler for the page's
own buttons, where a result must be visible and an error must stay readable in the Messages box
(not only a toast, and no error badge on every output).
"""

from __future__ import annotations

import functools
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import gradio as gr
from PIL import Image

__all__ = [
    "DISPLAY_SIDE",
    "REPORT_HEADERS",
    "display_image",
    "error_outputs",
    "page_event",
    "report_rows",
    "scrub_paths",
    "upload_message",
]

#: Results whose longer side is smaller are shown enlarged by a whole factor (nearest neighbour) to about this.
DISPLAY_SIDE = 512
#: Columns of the compose tab's constraint table (a verdict reads "ok 0.83 / 0.5": score / threshold).
REPORT_HEADERS = ["constraint", "kind", "stage 1 (score / threshold)", "refined", "verifier"]


def display_image(image: Image.Image | None, side: int = DISPLAY_SIDE) -> Image.Image | None:
    """``image`` enlarged by the whole factor that brings its longer side closest to ``side`` from below
    (at least 1), with nearest-neighbour sampling: pixels stay crisp squares. The download keeps the original."""
    if image is None:
        return None
    factor = max(1, side // max(image.size))
    if factor == 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def _verdict(row: dict[str, Any] | None) -> str:
    if row is None:
        return "-"
    return f"{'ok' if row['satisfied'] else 'FAIL'} {row['score']:.2f} / {row['threshold']:g}"


def report_rows(report: dict[str, Any] | None) -> list[list[str]]:
    """The compose report (``handlers.constraint_report``) as rows of :data:`REPORT_HEADERS`."""
    before = (report or {}).get("before_refinement") or []
    after = (report or {}).get("after_refinement") or []
    rows = []
    for index, row in enumerate(before):
        refined = after[index] if index < len(after) else None
        verifier = row["verifier"] + (f" ({row['note']})" if row.get("note") else "")
        rows.append([row["constraint"], row["kind"], _verdict(row), _verdict(refined), verifier])
    return rows


def _server_folders() -> list[str]:
    """Folders whose paths must not reach the page: gradio's upload/cache folder and the temp folder."""
    from gradio.utils import get_upload_folder

    return [os.path.realpath(get_upload_folder()), os.path.realpath(tempfile.gettempdir()), tempfile.gettempdir()]


def scrub_paths(text: str, folders: Sequence[str] | None = None) -> str:
    """``text`` with every path under one of ``folders`` (default: the server's temp folders) cut to its file name."""
    for folder in sorted(set(folders if folders is not None else _server_folders()), key=len, reverse=True):
        text = re.sub(re.escape(folder.rstrip("/")) + r"/[^\s'\"]*", lambda m: os.path.basename(m.group(0)), text)
    return text


def error_outputs(message: str, count: int, report: bool = False) -> tuple[Any, ...]:
    """What the outputs show after a failed run: no image, no file, the message (and an empty table)."""
    text = scrub_paths(message)
    values: list[Any] = [None, None, f"Error: {text}"]
    values += [None] * (count - 3 - int(report))
    if report:
        values.append([])
    return tuple(values)


def page_event(endpoint: Callable, *, report: bool = False) -> Callable:
    """``endpoint`` for the page: an enlarged result, messages without server paths, the report as rows,
    and a failure shown in the Messages box (and as a warning toast) instead of an error on every output."""

    @functools.wraps(endpoint)  # gradio reads the handler's signature (its gr.Progress parameter)
    def run(*args: Any, **kwargs: Any) -> tuple[Any, ...]:
        try:
            image, path, messages, *extra = endpoint(*args, **kwargs)
        except gr.Error as error:
            gr.Warning(scrub_paths(str(error.message)))
            return error_outputs(str(error.message), 4 if report else 3, report)
        if report:
            chosen = (extra[0] or {}).get("chosen")
            note = f"\nKept the {'refined' if chosen == 'refined' else 'stage 1'} image." if chosen else ""
            return display_image(image), path, scrub_paths(messages) + note, report_rows(extra[0])
        return display_image(image), path, scrub_paths(messages)

    return run


def upload_message(label: str, size: tuple[int, int] | None, error: str | None) -> str:
    """The Messages line after an upload: accepted (with its size) or rejected (with the reason)."""
    if error is not None:
        return f"Rejected the {label}: {scrub_paths(error)}"
    return f"{label.capitalize()} uploaded" + (f" ({size[0]}x{size[1]} px)." if size else ".")
