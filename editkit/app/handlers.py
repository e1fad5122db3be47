"""One function per app endpoint: validate the inputs, run the method's pipeline, render the result.

Every endpoint returns the result image, a PNG file with the run's parameters in its text chunks
(the download), and the run's messages (warnings such as a resized mask). Errors a user can fix
(``EditkitError``) become a ``gr.Error`` with their one-line message; anything else is logged
with its traceback on the server and shown as a generic message, never as a traceback.

The events run with ``preprocess=False``: images arrive as upload records (``{"path": ...}``)
and are read here with :func:`editkit.image.load_image`, so an unreadable or oversized image gets
editkit's own message rather than a decoder error. Gradio vets only the records that carry its
FileData ``meta``, so every file input (image, mask, token file) is checked here: its resolved
path (symlinks followed) must lie inside the app's upload folders (gradio's upload cache by
default), otherwise one neutral message answers, whether the path exists or not.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import logging
import math
import os
import shutil
import tempfile
import uuid
import warnings
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gradio as gr
import torch
from PIL import Image

from editkit.app.models import ModelManager
from editkit.errors import EditkitError, InputError
from editkit.image import load_image, read_mask_image, save_image
from editkit.jsonio import MAX_JSON_DEPTH, json_depth, parse_json
from editkit.numerics import APP_OUT_OF_MEMORY_ADVICE, out_of_memory_message
from editkit.tasks import (
    ComposeInputs,
    ComposeOptions,
    EditInputs,
    EditOptions,
    GenerateInputs,
    GenerateOptions,
    StylizeInputs,
    StylizeOptions,
    png_metadata,
)
from editkit.tasks import compose as compose_task
from editkit.tasks import edit as edit_task
from editkit.tasks import generate as generate_task
from editkit.tasks import stylize as stylize_task
from editkit.tasks.options import OptionError, knob_of

logger = logging.getLogger(__name__)

__all__ = ["MAX_PIXELS", "UNEXPECTED_ERROR", "Handlers"]

#: Largest upload in pixels (width * height), checked from the image header before decoding.
MAX_PIXELS = 4096 * 4096
#: Downloads kept in the output folder; older ones are deleted (gradio serves its own cached copies).
KEPT_OUTPUTS = 64
#: Longest constraints JSON accepted from the compose tab (its schema needs far less).
MAX_CONSTRAINTS_CHARS = 16_384
_FLAG_WORDS = {"true": True, "yes": True, "1": True, "on": True, "false": False, "no": False, "0": False, "off": False}
UNEXPECTED_ERROR = "Something went wrong on the server (the details are in its log). Please try again."

Outputs = tuple[Image.Image, str, str]
#: Notes about the current request's uploads (e.g. an animated image), shown with its messages.
_UPLOAD_NOTES: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("upload_notes", default=None)


# -- input parsing ------------------------------------------------------------------------------
def gradio_upload_folder() -> Path:
    """Gradio's folder of uploads and cached files (``$GRADIO_TEMP_DIR`` or ``<tmp>/gradio``)."""
    from gradio.utils import get_upload_folder

    return Path(get_upload_folder())


def upload_path(value: Any) -> str | None:
    """The file path of an upload record (dict or object with ``path``), a plain path, or None."""
    if value is None or value == "":
        return None
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    path = value.get("path") if isinstance(value, dict) else getattr(value, "path", None)
    if not path:
        raise InputError("the upload did not arrive; please upload the file again")
    return str(path)


def vetted_upload(value: Any, label: str, folders: Sequence[str | os.PathLike]) -> str | None:
    """The resolved path of an upload that lies inside one of ``folders`` (symlinks followed), or None.

    Anything else (a server path named in an API request, a symlink out of the folders) gets one
    neutral message that says nothing about whether the path exists or what it is.
    """
    path = upload_path(value)
    if path is None:
        return None
    resolved = os.path.realpath(path)
    for folder in folders:
        root = os.path.realpath(folder)
        if os.path.commonpath([resolved, root]) == root and resolved != root:
            return resolved
    raise InputError(f"the {label} file is not an upload of this app; please upload it again")


def read_image(path: str | None, label: str, *, required: bool = True) -> Image.Image | None:
    """Load an (already vetted) uploaded image as RGB; the message names ``label``, never the path."""
    if path is None:
        if required:
            raise InputError(f"upload a {label} image")
        return None
    try:
        image = load_image(path, max_pixels=MAX_PIXELS)
    except InputError as error:
        raise InputError(str(error).replace(path, f"the {label} image")) from None
    _note_frames(path, label)
    return image


def _note_frames(path: str, label: str) -> None:
    """Tell the user that only the first frame of an animated upload is used (the run's messages)."""
    with contextlib.suppress(OSError, ValueError), Image.open(path) as opened:
        frames = getattr(opened, "n_frames", 1)
        if frames > 1 and (notes := _UPLOAD_NOTES.get()) is not None:
            notes.append(f"the {label} image has {frames} frames; using the first")


def read_mask(path: str | None):
    """An optional (vetted) uploaded mask as grayscale at its own size (the task fits it to the image)."""
    if path is None:
        return None
    try:
        return read_mask_image(path)
    except InputError as error:
        raise InputError(str(error).replace(path, "the mask image")) from None


def _files(**paths: str | None) -> dict[str, tuple[str, str]]:
    """Upload role -> (shown name, path) for the record's hashes; the shown name is the file's name,
    never the server's temporary path."""
    return {role: (Path(path).name, path) for role, path in paths.items() if path is not None}


def form_options(options: type, **values: Any) -> Any:
    """``options`` from form or API values: each parsed by its field's kind, then checked by the
    dataclass (one range for the app, the CLI and the API); a bad value names its option (the API's name)."""
    parsed = {}
    for name, value in values.items():
        spec = knob_of(options, name)
        label = name.replace("_", " ")
        if value is None or isinstance(value, bool):
            parsed[name] = value
        elif spec.choices is not None:
            parsed[name] = text(value, label)
        elif spec.integer:
            parsed[name] = whole(value, label, -(2**63), 2**63 - 1)
        else:
            parsed[name] = number(value, label)
    try:
        return options(**parsed)
    except OptionError as error:
        raise InputError(f"{error.field.replace('_', ' ')} {error.problem}") from None


def number(value: Any, label: str, low: float = -math.inf, high: float = math.inf) -> float:
    """A finite number in [low, high] from a form or API value."""
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{label} must be a number, got {value!r}") from None
    if not math.isfinite(result):
        raise InputError(f"{label} must be a finite number, got {value!r}")
    if not low <= result <= high:
        raise InputError(f"{label} must be between {low:g} and {high:g}, got {value!r}")
    return result


def whole(value: Any, label: str, low: int = 0, high: int = 2**63 - 1) -> int:
    """A whole number in [low, high]."""
    result = number(value, label, low, high)
    if result != int(result):
        raise InputError(f"{label} must be a whole number, got {value!r}")
    return int(result)


def text(value: Any, label: str, *, required: bool = True) -> str:
    """A stripped prompt; required ones must not be empty."""
    result = "" if value is None else str(value).strip()
    if required and not result:
        raise InputError(f"enter a {label}")
    return result


def parse_constraints(value: Any) -> dict | None:
    """Optional explicit constraints as JSON (the schema of ``editkit.constraints``); empty: parse the prompt.

    At most :data:`MAX_CONSTRAINTS_CHARS` characters and :data:`~editkit.jsonio.MAX_JSON_DEPTH`
    levels; the number of constraints is capped by ``editkit.constraints.MAX_CONSTRAINTS``."""
    if isinstance(value, dict):
        if json_depth(value) > MAX_JSON_DEPTH:
            raise InputError(f"constraints are nested too deeply (at most {MAX_JSON_DEPTH} levels)")
        return value
    raw = text(value, "constraints", required=False)
    if not raw:
        return None
    if len(raw) > MAX_CONSTRAINTS_CHARS:
        raise InputError(f"constraints are {len(raw)} characters long; at most {MAX_CONSTRAINTS_CHARS} are accepted")
    data = parse_json(raw, "constraints")
    if not isinstance(data, dict):
        raise InputError('constraints must be a JSON object such as {"entities": ["car", "bird"]}')
    return data


def flag(value: Any, label: str) -> bool:
    """A checkbox value from the form or the API: a JSON boolean, 0/1 or true/false/yes/no (any case)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _FLAG_WORDS:
        return _FLAG_WORDS[value.strip().lower()]
    raise InputError(f"{label} must be true or false, got {value!r}")


def constraint_report(output: Any) -> dict[str, Any]:
    """The compose pipeline's constraint report as JSON: each constraint before/after refinement."""

    def rows(statuses: Any) -> list[dict[str, Any]] | None:
        if statuses is None:
            return None
        return [
            {
                "kind": s.kind,
                "constraint": s.description,
                "satisfied": bool(s.satisfied),
                "score": round(s.score, 4),
                "threshold": s.threshold,
                "verifier": s.verifier,
                **({"note": s.note} if s.note else {}),
            }
            for s in statuses
        ]

    constraints = getattr(output, "constraints", None)
    return {
        "constraints": constraints.to_dict() if constraints is not None else None,
        "unparsed": list(getattr(constraints, "unparsed", []) or []),
        "before_refinement": rows(getattr(output, "report_before", None)),
        "after_refinement": rows(getattr(output, "report_after", None)),
        "chosen": getattr(output, "chosen", None),
    }


def guarded(endpoint: Callable) -> Callable:
    """Turn an endpoint's errors into messages: EditkitError's own line, a generic one for bugs."""

    @functools.wraps(endpoint)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        token = _UPLOAD_NOTES.set([])  # per request (thread/context), read by _run
        try:
            return endpoint(*args, **kwargs)
        except gr.Error:
            raise
        except EditkitError as error:
            raise gr.Error(str(error), title="Invalid input", print_exception=False) from None
        except (MemoryError, torch.OutOfMemoryError) as error:
            logger.warning("the %s endpoint ran out of memory: %s", endpoint.__name__, error)
            _release_cached_memory()
            message = out_of_memory_message(error, APP_OUT_OF_MEMORY_ADVICE)
            raise gr.Error(message, title="Out of memory", print_exception=False) from None
        except Exception:
            logger.exception("the %s endpoint failed", endpoint.__name__)
            raise gr.Error(UNEXPECTED_ERROR, print_exception=False) from None
        finally:
            _UPLOAD_NOTES.reset(token)

    return wrapper


# -- the endpoints ------------------------------------------------------------------------------
class Handlers:
    """The app's endpoints, bound to one :class:`ModelManager`; results are written to ``output_dir``.

    ``upload_folders``: the only folders file inputs may come from (default: gradio's upload
    folder, :func:`gradio_upload_folder`, read at each request so ``$GRADIO_TEMP_DIR`` holds).
    """

    def __init__(
        self,
        manager: ModelManager,
        output_dir: str | os.PathLike | None = None,
        *,
        upload_folders: Sequence[str | os.PathLike] | None = None,
    ) -> None:
        self.manager = manager
        self.output_dir = Path(output_dir or tempfile.mkdtemp(prefix="editkit-app-"))
        self.upload_folders = None if upload_folders is None else [Path(f) for f in upload_folders]
        if output_dir is None:  # our own temporary folder: removed with the handlers
            weakref.finalize(self, shutil.rmtree, self.output_dir, ignore_errors=True)

    def _upload(self, value: Any, label: str) -> str | None:
        """The vetted path of the ``label`` file input (see :func:`vetted_upload`)."""
        folders = self.upload_folders if self.upload_folders is not None else [gradio_upload_folder()]
        return vetted_upload(value, label, folders)

    def check_upload(self, value: Any, label: str, kind: str = "image") -> tuple[tuple[int, int] | None, str | None]:
        """Check an upload as the run will: ((width, height) or None, None) if accepted, (None, reason) if not.

        ``kind``: "image" (upload folder, pixel limit, decoding) or "tokens" (a soft-token file's format).
        """
        try:
            path = self._upload(value, label)
            if path is None:
                return None, None
            if kind == "tokens":
                self._check_tokens(path, f"the {label} file")
                return None, None
            return read_image(path, label.removesuffix(" image")).size, None
        except EditkitError as error:
            return None, str(error)

    def _check_tokens(self, path: str, name: str) -> None:
        """Read a token file whole and refuse one trained on another family than the served model's, before the
        model loads (``name`` replaces the server's path in the message)."""
        from editkit.softrepa import check_token_family, read_soft_tokens

        try:
            tokens = read_soft_tokens(path)
            family = self.manager.family()
            if family is not None:
                check_token_family(tokens, family, path)
        except EditkitError as error:
            raise type(error)(str(error).replace(path, name)) from None

    @guarded
    def stylize(
        self,
        content: Any,
        style: Any,
        gamma: Any,
        tau: Any,
        use_adain: Any,
        adain_strength: Any,
        steps: Any,
        mask: Any,
        seed: Any,
        feature_timing: Any = StylizeOptions.feature_timing,
        prompt: Any = StylizeOptions.prompt,
        negative_prompt: Any = StylizeOptions.negative_prompt,
        guidance_scale: Any = StylizeOptions.guidance_scale,
        progress: gr.Progress = gr.Progress(track_tqdm=True),  # noqa: B008 (gradio's idiom)
    ) -> Outputs:
        """Stylize ``content`` with ``style``'s look (attention swapping, AttenST/StyleID); ``feature_timing``,
        ``prompt``, ``negative_prompt`` and ``guidance_scale`` as :class:`~editkit.tasks.StylizeOptions` (last,
        so API callers of the earlier forms keep working)."""
        adain = adain_strength if flag(use_adain, "use AdaIN") else None
        options = form_options(StylizeOptions, gamma=gamma, tau=tau, adain_strength=adain,
                               num_inference_steps=steps, seed=seed, feature_timing=feature_timing,
                               guidance_scale=guidance_scale)  # fmt: skip
        texts = {"prompt": text(prompt, "prompt", required=False),
                 "negative_prompt": text(negative_prompt, "negative prompt", required=False)}  # fmt: skip
        options = dataclasses.replace(options, **texts)
        content_path = self._upload(content, "content image")
        style_path = self._upload(style, "style image")
        content_image = read_image(content_path, "content")
        style_image = read_image(style_path, "style")
        mask_path = self._upload(mask, "mask image")
        files = _files(content=content_path, style=style_path, mask=mask_path)
        inputs = StylizeInputs(content_image, [style_image], mask=read_mask(mask_path), files=files)

        def work(pipe) -> tuple[Image.Image, dict, list[str]]:
            result = stylize_task.run(pipe, inputs, options)
            return result.images[0], result.records[0], []

        return self._run("stylize", work)

    @guarded
    def edit(
        self,
        image: Any,
        source_prompt: Any,
        target_prompt: Any,
        contrast: Any,
        steps: Any,
        guidance_scale: Any,
        mask: Any,
        seed: Any,
        progress: gr.Progress = gr.Progress(track_tqdm=True),  # noqa: B008
    ) -> Outputs:
        """Edit ``image`` from ``source_prompt`` towards ``target_prompt`` (contrastive denoising score)."""
        options = form_options(EditOptions, contrast=contrast, num_inference_steps=steps,
                               guidance_scale=guidance_scale, seed=seed)  # fmt: skip
        source, target = text(source_prompt, "source prompt"), text(target_prompt, "target prompt")
        image_path = self._upload(image, "input image")
        picture = read_image(image_path, "input")
        mask_path = self._upload(mask, "mask image")
        files = _files(image=image_path, mask=mask_path)
        inputs = EditInputs(picture, source, target, mask=read_mask(mask_path), files=files)

        def work(pipe) -> tuple[Image.Image, dict, list[str]]:
            result = edit_task.run(pipe, inputs, options)
            return result.images[0], result.records[0], []

        return self._run("edit", work)

    @guarded
    def compose(
        self,
        prompt: Any,
        constraints: Any,
        refine: Any,
        steps: Any,
        guidance_scale: Any,
        seed: Any,
        noise_refiner: Any = ComposeOptions.noise_refiner,
        noise_refinement_rounds: Any = ComposeOptions.noise_refinement_rounds,
        progress: gr.Progress = gr.Progress(track_tqdm=True),  # noqa: B008
    ) -> tuple[Image.Image, str, str, dict]:
        """Generate ``prompt`` with its constraints enforced; also returns the constraint report.

        ``noise_refiner`` and ``noise_refinement_rounds`` (stage 2) come last and have the options' defaults, so
        API calls written before they were exposed keep working."""
        options = form_options(ComposeOptions, refine=flag(refine, "refine"), num_inference_steps=steps,
                               guidance_scale=guidance_scale, seed=seed, noise_refiner=noise_refiner,
                               noise_refinement_rounds=noise_refinement_rounds)  # fmt: skip
        inputs = ComposeInputs(text(prompt, "prompt"), parse_constraints(constraints))
        report: dict[str, Any] = {}

        def work(pipe) -> tuple[Image.Image, dict, list[str]]:
            verifier = compose_task.make_task_verifier(pipe, options, model=self.manager.name)
            result = compose_task.run(pipe, inputs, options, verifier=verifier)
            report.update(constraint_report(result.output))
            return result.images[0], result.records[0], list(getattr(result.output, "warnings", None) or [])

        image, path, messages = self._run("compose", work)
        return image, path, messages, report

    @guarded
    def generate_with_tokens(
        self,
        prompt: Any,
        tokens: Any,
        strength: Any,
        steps: Any,
        guidance_scale: Any,
        seed: Any,
        progress: gr.Progress = gr.Progress(track_tqdm=True),  # noqa: B008
    ) -> Outputs:
        """Generate ``prompt`` with a SoftREPA token file inserted at ``strength`` (the family's plain pipeline)."""
        options = form_options(GenerateOptions, soft_token_strength=strength, num_inference_steps=steps,
                               guidance_scale=guidance_scale, seed=seed)  # fmt: skip
        prompt_text = text(prompt, "prompt")
        token_path = self._upload(tokens, "soft-token")
        if token_path is None:
            raise InputError("upload a soft-token file (.safetensors)")
        self._check_tokens(token_path, "the token file")
        inputs = GenerateInputs(prompt_text, token_path, files=_files(soft_tokens=token_path))

        def work(pipe) -> tuple[Image.Image, dict, list[str]]:
            try:
                result = generate_task.run(pipe, inputs, options)
            except EditkitError as error:
                raise type(error)(str(error).replace(token_path, "the token file")) from None
            return result.images[0], result.records[0], []

        return self._run("generate_with_tokens", work)

    # -- shared run/render ------------------------------------------------------------------
    def _run(self, command: str, work: Callable[[Any], tuple[Image.Image, dict, list[str]]]):
        """Run ``work(pipe)`` (a task run) holding the shared model, collect its warnings, save the download."""
        pipe = self.manager.pipeline(command)
        with self.manager.session(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            image, record, notes = work(pipe)
        uploads = _UPLOAD_NOTES.get() or []
        messages = [*uploads, *notes, *dict.fromkeys(str(w.message) for w in caught if _user_facing(w))]
        path = self._save(image, command, record)
        return image, str(path), "\n".join(messages) if messages else "Done."

    def _save(self, image: Image.Image, command: str, record: dict[str, Any]) -> Path:
        """The downloadable PNG, with the task's record (model, options, values used) in its text chunks."""
        seed = record.get("used", {}).get("seed", 0)
        name = f"editkit-{command}-seed{seed}-{uuid.uuid4().hex[:8]}.png"
        metadata = png_metadata({**record, "model": self.manager.name})
        path = save_image(image, self.output_dir / name, metadata=metadata)
        self._prune()
        return path

    def _prune(self) -> None:
        """Keep the newest KEPT_OUTPUTS downloads (gradio serves copies from its own cache)."""
        files = sorted(self.output_dir.glob("editkit-*.png"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
        for old in files[KEPT_OUTPUTS:]:
            old.unlink(missing_ok=True)


def _release_cached_memory() -> None:
    """Return cached accelerator memory after an out-of-memory error, so the next request can run."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _user_facing(caught: warnings.WarningMessage) -> bool:
    """Warnings worth showing: editkit's own UserWarnings, not library deprecation noise."""
    return issubclass(caught.category, UserWarning) and not issubclass(
        caught.category, (DeprecationWarning, FutureWarning)
    )
