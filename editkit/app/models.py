"""The app's models: one base model loaded on first use, shared by every method's pipeline.

The first request loads the base model once (``editkit.models.load_pipeline``) with the class of
the method it asks for; every other method's pipeline is built from it with
``Pipeline.from_pipe(base, dtype=...)``, so all tabs share one UNet, VAE and text encoder. The
shared UNet gets one attention controller at a time: :meth:`ModelManager.session` is a lock every
run holds, so two requests never attach controllers to the UNet at once even when the queue lets
several events run.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from editkit.errors import ModelLoadError
from editkit.tasks.loading import text_to_image_class

logger = logging.getLogger(__name__)

__all__ = ["METHODS", "MethodSpec", "ModelManager"]


@dataclass(frozen=True)
class MethodSpec:
    """An endpoint's task in :mod:`editkit.tasks`; ``task`` None: the model family's plain diffusers
    text-to-image pipeline (what ``editkit softrepa generate`` uses)."""

    task: str | None
    title: str

    def load_class(self, family: str | None = None) -> type:
        """The task's pipeline class for a model ``family`` (None: the UNet class)."""
        from editkit.tasks import pipeline_class

        return pipeline_class(self.task, family)


#: The app's methods by endpoint name.
METHODS: dict[str, MethodSpec] = {
    "stylize": MethodSpec("stylize", "style transfer"),
    "edit": MethodSpec("edit", "contrastive editing"),
    "compose": MethodSpec("compose", "compositional generation"),
    "generate_with_tokens": MethodSpec(None, "soft-token generation"),
}


class ModelManager:
    """Loads the base model lazily, once, and hands out per-method pipelines that share its modules.

    ``model`` is a Hub id, a diffusers folder, a ``.safetensors`` file, or an already loaded
    pipeline (tests, notebooks). Nothing is loaded at construction.
    """

    def __init__(self, model: Any, *, device: str | None = None, dtype: str | None = None) -> None:
        self.model = model
        self.device = device
        self.dtype = dtype
        self._base = None if isinstance(model, (str, os.PathLike)) else model
        self._pipelines: dict[str, Any] = {}
        self._load_lock = threading.Lock()
        self._run_lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        """Whether the base model is in memory."""
        return self._base is not None

    @property
    def name(self) -> str:
        """The model as the user gave it (for metadata)."""
        if isinstance(self.model, (str, os.PathLike)):
            return os.fspath(self.model)
        return str(getattr(self.model, "name_or_path", None) or type(self.model).__name__)

    def family(self) -> str | None:
        """The model's family (``sd``, ``sdxl``, ``sd3``, ``flux``), known before loading where possible."""
        from editkit.models import model_family, model_source_family

        return model_family(self._base) if self._base is not None else model_source_family(self.model)

    def defaults_family(self) -> str | None:
        """:meth:`family`, with a FLUX.1 model without a guidance embedding (FLUX.1-schnell) told apart as
        ``"flux-schnell"``: from the loaded transformer's config, or before loading from the folder's (or the
        cached Hub repo's) ``transformer/config.json``; a single-file FLUX checkpoint reads as ``"flux"`` (dev)."""
        from editkit.models import source_denoiser_config

        family = self.family()
        if family != "flux":
            return family
        config = self._base.transformer.config if self._base is not None else source_denoiser_config(self.model)
        return "flux-schnell" if config is not None and config.get("guidance_embeds") is False else family

    def pipeline(self, method: str) -> Any:
        """The pipeline of ``method`` (an endpoint name of :data:`METHODS`), loading the base on first use."""
        spec = METHODS[method]
        with self._load_lock:
            if spec.task is None:
                if self._base is None:  # the base loads with a method class: no safety checker, no extras
                    base = self._build(METHODS["compose"].load_class(self.family()))
                    self._pipelines[type(base).__name__] = base
                pipe_class = text_to_image_class(self._base)
            else:
                pipe_class = spec.load_class(self.family())
            if pipe_class.__name__ not in self._pipelines:
                self._pipelines[pipe_class.__name__] = self._build(pipe_class)
            return self._pipelines[pipe_class.__name__]

    def _build(self, pipe_class: type) -> Any:
        if self._base is None:
            from editkit.models import load_pipeline

            logger.info("loading %s", self.name)
            self._base = load_pipeline(pipe_class, self.model, device=self.device, dtype=self.dtype)
        if isinstance(self._base, pipe_class):
            return self._base
        try:
            if "requires_safety_checker" not in inspect.signature(pipe_class.__init__).parameters:
                return pipe_class.from_pipe(self._base, dtype=self._base.dtype)  # editkit's: nothing to skip
            return pipe_class.from_pipe(  # the plain SD pipeline: no safety checker to load or skip
                self._base,
                dtype=self._base.dtype,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        except Exception as error:
            raise ModelLoadError(f"cannot build {pipe_class.__name__} from the loaded model: {error}") from error

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Hold the shared UNet for one run: at most one attention controller is attached at a time."""
        with self._run_lock:
            yield

    def interrupt(self) -> None:
        """Ask the running pipeline to stop after its current step (the app's Cancel button).

        Sets diffusers' ``_interrupt`` flag on every built pipeline; each pipeline clears it when a
        call begins and checks it after each denoising step (it then decodes what it has).
        """
        for pipe in list(self._pipelines.values()):
            pipe._interrupt = True

    def resolution(self, pipe: Any) -> tuple[int, int]:
        """(native side, size multiple) in pixels, as the task layer decides them (``editkit.tasks.common``)."""
        from editkit.tasks.common import native_side, size_multiple

        return native_side(pipe), size_multiple(pipe)
