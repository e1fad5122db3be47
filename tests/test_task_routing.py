"""The task layer picks each task's pipeline class from the model's family (``editkit.tasks.loading``)."""

from __future__ import annotations

import pytest

from editkit.errors import EditkitError
from editkit.tasks import pipeline_class
from editkit.tasks.loading import PIPELINES

FAMILY_OF_DENOISER = {"UNet2DConditionModel": ("sd", "sdxl"), "SD3Transformer2DModel": ("sd3",),
                      "FluxTransformer2DModel": ("flux",)}  # fmt: skip


@pytest.mark.parametrize(("task", "family"), sorted(PIPELINES))
def test_every_task_and_family_has_a_class_for_that_familys_denoiser(task, family):
    import inspect

    cls = pipeline_class(task, family)
    annotation = (
        inspect.signature(cls.__init__).parameters.get("unet")
        or inspect.signature(cls.__init__).parameters["transformer"]
    )
    name = getattr(annotation.annotation, "__name__", str(annotation.annotation)).split(".")[-1]
    assert family in FAMILY_OF_DENOISER[name]
    assert {"stylize": "Style", "edit": "Edit", "compose": "Compose"}[task] in cls.__name__


def test_every_method_covers_every_family():
    assert {
        (task, family) for task in ("stylize", "edit", "compose") for family in ("sd", "sdxl", "sd3", "flux")
    } == set(PIPELINES)


def test_unknown_family_and_task_are_refused():
    with pytest.raises(EditkitError, match="unknown model family 'kandinsky'"):
        pipeline_class("stylize", "kandinsky")
    with pytest.raises(KeyError):
        pipeline_class("generate", "sd3")  # the family's own diffusers pipeline, not a task class


def test_load_task_pipeline_reads_the_family_before_loading(sd3_dir, flux_dir):
    from editkit.tasks import load_task_pipeline

    assert type(load_task_pipeline("compose", sd3_dir, device="cpu")).__name__ == "SD3ComposePipeline"
    assert type(load_task_pipeline("stylize", flux_dir, device="cpu")).__name__ == "FluxStyleTransferPipeline"
