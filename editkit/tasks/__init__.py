"""The task layer: one options dataclass and one ``run(pipe, inputs, options)`` per method.

The CLI (``editkit.commands``), the app (``editkit.app``) and batch mode all go through here, so
seed -> generator, the processing size, mask handling, validation and metadata are decided once
(:mod:`editkit.tasks.common`). Only this package imports ``pipelines/`` (ruff's TID251 rule, see
``pyproject.toml`` and the ``.ruff.toml`` files beside the packages).
"""

from __future__ import annotations

from editkit.tasks import compose, edit, generate, stylize
from editkit.tasks.common import make_generator, png_metadata, processing_size, size_multiple
from editkit.tasks.compose import ComposeInputs, ComposeOptions
from editkit.tasks.edit import EditInputs, EditOptions
from editkit.tasks.generate import GenerateInputs, GenerateOptions
from editkit.tasks.loading import check_soft_tokens_source, load_task_pipeline, pipeline_class, soft_token_controllers
from editkit.tasks.options import OptionError, defaults_table
from editkit.tasks.stylize import StylizeInputs, StylizeOptions

__all__ = [
    "ComposeInputs",
    "ComposeOptions",
    "EditInputs",
    "EditOptions",
    "GenerateInputs",
    "GenerateOptions",
    "OptionError",
    "StylizeInputs",
    "StylizeOptions",
    "check_soft_tokens_source",
    "compose",
    "defaults_table",
    "edit",
    "generate",
    "load_task_pipeline",
    "make_generator",
    "pipeline_class",
    "png_metadata",
    "processing_size",
    "size_multiple",
    "soft_token_controllers",
    "stylize",
]


def readme_defaults_table() -> str:
    """The README's table of defaults, generated from the options dataclasses (a test keeps them equal)."""
    steps = {"num_inference_steps": "--steps", "seed": "--seed", "size": "--size"}
    return defaults_table(
        [
            ("stylize", StylizeOptions, {**steps, "gamma": "--gamma", "tau": "--tau",
                                         "adain_strength": "--adain-strength", "guidance_scale": "--guidance-scale"}),
            ("edit", EditOptions, {**steps, "guidance_scale": "--guidance-scale", "contrast": "--contrast",
                                   "contrast_weight": "--contrast-weight", "learning_rate": "--learning-rate"}),
            ("compose", ComposeOptions, {**steps, "guidance_scale": "--guidance-scale", "verifier": "--verifier"}),
            ("softrepa generate", GenerateOptions, {**steps, "guidance_scale": "--guidance-scale",
                                                    "soft_token_strength": "--soft-token-strength"}),
        ]
    )  # fmt: skip
