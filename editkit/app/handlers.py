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
from editkit.commands.common import png_metadata
from editkit.errors import EditkitError, InputError
from editkit.image import fit_size, load_image, load_mask, resize_to, save_image
from editkit.jsonio import MAX_JSON_DEPTH, json_depth, parse_json
from editkit.model_card import is_shapes_model
from editkit.numerics import APP_OUT_OF_MEMORY_ADVICE, out_of_memory_message

logger = logging.getLogger(__name__)

__all__ = ["MAX_PIXELS", "UNEXPECTED_ERROR", "Handlers"]

#: Largest upload in pixels (width * height), checked from the image header before decoding.
MAX_PIXELS = 4096 * 4096
#: Guided (attention-loss) denoising steps of the compose tab: the paper's 25 of 50, at most half the steps.
COMPOSE_GUIDED_STEPS = 25
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


def read_mask(path: str | None, size: tuple[int, int]):
    """An optional (vetted) uploaded mask as a (1, 1, H, W) tensor of 0s and 1s at ``size`` = (width, height)."""
    if path is None:
        return None
    try:
        return load_mask(path, size)
    except InputError as error:
        raise InputError(str(error).replace(path, "the mask image")) from None


def number(value: Any, label: str, low: float = -math.inf, high: float = math.inf) -> float:
    """A finite number in [low, high] from a form or API value."""
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{label} must be a number, got {value!r}") from None
    if not math.isfinite(result) or not low <= result <= high:
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


def fit_to_model(image: Image.Image, side: int, multiple: int) -> Image.Image:
    """Resize so the longer side is the model's native side, each side a multiple of ``multiple``."""
    return resize_to(image, fit_size(image.width, image.height, multiple=multiple, target=side))


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
                from editkit.softrepa import read_soft_tokens

                try:
                    read_soft_tokens(path)
                except EditkitError as error:
                    raise type(error)(str(error).replace(path, f"the {label} file")) from None
                return None, None
            return read_image(path, label.removesuffix(" image")).size, None
        except EditkitError as error:
            return None, str(error)

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
        progress: gr.Progress = gr.Progress(track_tqdm=True),  # noqa: B008 (gradio's idiom)
    ) -> Outputs:
        """Stylize ``content`` with ``style``'s look (attention swapping, AttenST/StyleID)."""
        params = {
            "gamma": number(gamma, "gamma (query preservation)", 0.0, 1.0),
            "tau": number(tau, "tau (attention temperature)", 0.1, 10.0),
            "adain_strength": number(adain_strength, "AdaIN style strength", 0.0, 1.0)
            if flag(use_adain, "use AdaIN")
            else None,
            "num_inference_steps": whole(steps, "steps", 1, 1000),
            "seed": whole(seed, "seed"),
        }
        content_image = read_image(self._upload(content, "content image"), "content")
        style_image = read_image(self._upload(style, "style image"), "style")
        mask_path = self._upload(mask, "mask image")

        def work(pipe) -> tuple[Image.Image, list[str]]:
            side, multiple = self.manager.resolution(pipe)
            content_fit = fit_to_model(content_image, side, multiple)
            mask_tensor = read_mask(mask_path, content_fit.size)
            params["mask"] = mask_tensor is not None
            output = pipe(
                content_fit,
                fit_to_model(style_image, side, multiple),
                gamma=params["gamma"],
                tau=params["tau"],
                adain_strength=params["adain_strength"],
                num_inference_steps=params["num_inference_steps"],
                mask=mask_tensor,
                generator=self.manager.generator(pipe, params["seed"]),
            )
            return output.images[0], []

        return self._run("stylize", params, work)

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
        params = {
            "source_prompt": text(source_prompt, "source prompt", required=False),
            "target_prompt": text(target_prompt, "target prompt"),
            "contrast": text(contrast, "contrast mode"),
            "num_inference_steps": whole(steps, "steps", 1, 1000),
            "guidance_scale": number(guidance_scale, "guidance scale", 0.0, 50.0),
            "seed": whole(seed, "seed"),
        }
        source = read_image(self._upload(image, "input image"), "input")
        mask_path = self._upload(mask, "mask image")

        def work(pipe) -> tuple[Image.Image, list[str]]:
            side, multiple = self.manager.resolution(pipe)
            fitted = fit_to_model(source, side, multiple)
            mask_tensor = read_mask(mask_path, fitted.size)
            params["mask"] = mask_tensor is not None
            output = pipe(
                fitted,
                params["source_prompt"],
                params["target_prompt"],
                contrast=None if params["contrast"] == "none" else params["contrast"],
                num_inference_steps=params["num_inference_steps"],
                guidance_scale=params["guidance_scale"],
                mask=mask_tensor,
                generator=self.manager.generator(pipe, params["seed"]),
            )
            return output.images[0], []

        return self._run("edit", params, work)

    @guarded
    def compose(
        self,
        prompt: Any,
        constraints: Any,
        refine: Any,
        steps: Any,
        guidance_scale: Any,
        seed: Any,
        progress: gr.Progress = gr.Progress(track_tqdm=True),  # noqa: B008
    ) -> tuple[Image.Image, str, str, dict]:
        """Generate ``prompt`` with its constraints enforced; also returns the constraint report."""
        params = {
            "prompt": text(prompt, "prompt"),
            "constraints": parse_constraints(constraints),
            "refine": flag(refine, "refine"),
            "num_inference_steps": whole(steps, "steps", 1, 1000),
            "guidance_scale": number(guidance_scale, "guidance scale", 0.0, 50.0),
            "seed": whole(seed, "seed"),
        }
        report: dict[str, Any] = {}

        def work(pipe) -> tuple[Image.Image, list[str]]:
            side, _ = self.manager.resolution(pipe)
            output = pipe(
                params["prompt"],
                constraints=params["constraints"],
                height=side,
                width=side,
                refine=params["refine"],
                verifier="shapes" if is_shapes_model(self.manager.name) else "attention",
                num_inference_steps=params["num_inference_steps"],
                max_iter_to_alter=min(COMPOSE_GUIDED_STEPS, params["num_inference_steps"] // 2),
                guidance_scale=params["guidance_scale"],
                generator=self.manager.generator(pipe, params["seed"]),
            )
            report.update(constraint_report(output))
            return output.images[0], list(getattr(output, "warnings", None) or [])

        image, path, messages = self._run("compose", params, work)
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
        params = {
            "prompt": text(prompt, "prompt"),
            "soft_token_strength": number(strength, "token strength", -10.0, 10.0),
            "num_inference_steps": whole(steps, "steps", 1, 1000),
            "guidance_scale": number(guidance_scale, "guidance scale", 0.0, 50.0),
            "seed": whole(seed, "seed"),
        }
        token_path = self._upload(tokens, "soft-token")
        if token_path is None:
            raise InputError("upload a soft-token file (.safetensors)")
        params["soft_tokens"] = Path(token_path).name

        def work(pipe) -> tuple[Image.Image, list[str]]:
            from editkit.softrepa import load_soft_tokens, use_soft_tokens

            try:
                controller = load_soft_tokens(token_path, unet=pipe.unet, strength=params["soft_token_strength"])
            except EditkitError as error:
                raise type(error)(str(error).replace(token_path, "the token file")) from None
            side, _ = self.manager.resolution(pipe)
            with use_soft_tokens(pipe.unet, controller):  # as `editkit softrepa generate` does
                output = pipe(
                    params["prompt"],
                    height=side,
                    width=side,
                    num_inference_steps=params["num_inference_steps"],
                    guidance_scale=params["guidance_scale"],
                    generator=self.manager.generator(pipe, params["seed"]),
                )
            return output.images[0], []

        return self._run("generate_with_tokens", params, work)

    # -- shared run/render ------------------------------------------------------------------
    def _run(self, command: str, params: dict[str, Any], work: Callable[[Any], tuple[Image.Image, list[str]]]):
        """Run ``work(pipe)`` holding the shared model, collect its warnings, save the download."""
        pipe = self.manager.pipeline(command)
        with self.manager.session(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            image, notes = work(pipe)
        uploads = _UPLOAD_NOTES.get() or []
        messages = [*uploads, *notes, *dict.fromkeys(str(w.message) for w in caught if _user_facing(w))]
        path = self._save(image, command, params)
        return image, str(path), "\n".join(messages) if messages else "Done."

    def _save(self, image: Image.Image, command: str, params: dict[str, Any]) -> Path:
        """The downloadable PNG, with the model and parameters in its ``editkit`` text chunk."""
        name = f"editkit-{command}-seed{params.get('seed', 0)}-{uuid.uuid4().hex[:8]}.png"
        metadata = png_metadata(command, {"model": self.manager.name, **params})
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
