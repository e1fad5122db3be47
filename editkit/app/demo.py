"""The Gradio page: one tab per method, named API endpoints, a shared queue, no model at import.

``build_demo(model)`` only lays out the page; the model loads on the first request (see
:class:`~editkit.app.models.ModelManager`). Endpoints: ``/stylize``, ``/edit``, ``/compose``,
``/generate_with_tokens`` (``gradio_client.Client(url).predict(..., api_name="/stylize")``).
All four share one concurrency group of size 1, so runs on the shared UNet are queued, never
interleaved. :func:`launch_demo` applies the launch settings (upload limit, no tracebacks).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import gradio as gr

from editkit.app.handlers import Handlers
from editkit.app.models import ModelManager
from editkit.tasks import ComposeOptions, EditOptions, GenerateOptions, StylizeOptions
from editkit.tasks.options import knob_of

__all__ = ["CONCURRENCY_ID", "EXAMPLES_DIR", "MAX_FILE_SIZE", "build_demo", "launch_demo"]

#: Largest accepted upload (gradio rejects bigger files before they reach a handler).
MAX_FILE_SIZE = "20mb"
#: (every, older than) seconds: how often gradio's cache of uploads and results is cleaned.
CACHE_LIFETIME = (3600, 3600)
#: The concurrency group of every model endpoint: one run on the shared UNet at a time.
CONCURRENCY_ID = "editkit-model"
#: Example inputs shipped with a source checkout (absent from an installed wheel: no examples then).
EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "assets" / "examples"
TITLE = "editkit: diffusion image editing and style transfer"
INTRO = (
    "Training-free style transfer (AttenST/StyleID), contrastive editing (DDS/CDS), compositional "
    "generation with noise refinement and SoftREPA soft tokens, on one shared model. "
    "Each result comes with a PNG holding its parameters."
)


def _result_column(tab: str, report: bool = False) -> list[gr.components.Component]:
    """The outputs every tab shares: image, PNG download with parameters, messages (+ report)."""
    outputs = [
        gr.Image(
            label="Result",
            type="pil",
            format="png",
            interactive=False,
            buttons=["download", "fullscreen"],
            elem_id=f"{tab}-result",
        ),
        gr.File(label="PNG with parameters", interactive=False, elem_id=f"{tab}-download"),
        gr.Textbox(label="Messages", interactive=False, lines=2, elem_id=f"{tab}-messages"),
    ]
    if report:
        outputs.append(gr.JSON(label="Constraint report", elem_id=f"{tab}-report"))
    return outputs


def _examples(rows: list[list[str]], inputs: list[gr.components.Component]) -> None:
    """Example rows of files under :data:`EXAMPLES_DIR` (skipped when the files are not there)."""
    resolved = [[str(EXAMPLES_DIR / name) if name else None for name in row] for row in rows]
    if all(path is None or os.path.isfile(path) for row in resolved for path in row):
        gr.Examples(examples=resolved, inputs=inputs)


def _wire(button: gr.Button, fn: Any, inputs: list, outputs: list, api_name: str) -> None:
    button.click(
        fn,
        inputs=inputs,
        outputs=outputs,
        api_name=api_name,
        preprocess=False,  # handlers read uploads with editkit.image (its checks, its messages)
        concurrency_limit=1,
        concurrency_id=CONCURRENCY_ID,
        show_progress="full",
    )


def _seed(options: type) -> gr.Number:
    return gr.Number(label="Seed", value=options.seed, precision=0, minimum=knob_of(options, "seed").low)


def _slider(options: type, name: str, **kwargs: Any) -> gr.Slider:
    """A slider for an option: its default, label and suggested range from the options dataclass
    (``editkit.tasks``); the handler checks the option's full range, the API may go beyond the slider."""
    spec = knob_of(options, name)
    low, high, step = spec.slider
    return gr.Slider(low, high, value=getattr(options, name), step=step, label=spec.label, **kwargs)


def _stylize_tab(handlers: Handlers) -> None:
    with gr.Tab("Stylize"):
        with gr.Row():
            with gr.Column():
                with gr.Row():
                    content = gr.Image(label="Content", type="filepath", elem_id="stylize-content")
                    style = gr.Image(label="Style", type="filepath", elem_id="stylize-style")
                gamma = _slider(StylizeOptions, "gamma")
                tau = _slider(StylizeOptions, "tau")
                use_adain = gr.Checkbox(value=True, label="Content-aware AdaIN of the start latent")
                adain = _slider(StylizeOptions, "adain_strength")
                steps = _slider(StylizeOptions, "num_inference_steps", elem_id="stylize-steps")
                mask = gr.Image(label="Mask (optional: stylize only the white part)", type="filepath")
                seed = _seed(StylizeOptions)
                run = gr.Button("Stylize", variant="primary", elem_id="stylize-run")
            with gr.Column():
                outputs = _result_column("stylize")
        _wire(
            run, handlers.stylize, [content, style, gamma, tau, use_adain, adain, steps, mask, seed], outputs, "stylize"
        )
        _examples([["content.png", "style.png"]], [content, style])


def _edit_tab(handlers: Handlers) -> None:
    with gr.Tab("Edit"):
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="Image", type="filepath")
                source = gr.Textbox(label="Source prompt (what the image shows)")
                target = gr.Textbox(label="Target prompt (what it should show)")
                spec = knob_of(EditOptions, "contrast")
                contrast = gr.Radio(list(spec.choices), value=EditOptions.contrast, label=spec.label)
                steps = _slider(EditOptions, "num_inference_steps")
                guidance = _slider(EditOptions, "guidance_scale")
                mask = gr.Image(label="Mask (optional: edit only the white part)", type="filepath")
                seed = _seed(EditOptions)
                run = gr.Button("Edit", variant="primary")
            with gr.Column():
                outputs = _result_column("edit")
        _wire(run, handlers.edit, [image, source, target, contrast, steps, guidance, mask, seed], outputs, "edit")
        _examples([["edit.png", "mask.png"]], [image, mask])


def _compose_tab(handlers: Handlers) -> None:
    with gr.Tab("Compose"):
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", placeholder="a red circle to the left of a blue square")
                constraints = gr.Code(
                    label='Constraints (optional JSON; empty: parsed from the prompt), e.g. {"entities": ["circle"]}',
                    language="json",
                )
                refine = gr.Checkbox(value=ComposeOptions.refine, label=knob_of(ComposeOptions, "refine").label)
                steps = _slider(ComposeOptions, "num_inference_steps")
                guidance = _slider(ComposeOptions, "guidance_scale")
                seed = _seed(ComposeOptions)
                run = gr.Button("Compose", variant="primary")
            with gr.Column():
                outputs = _result_column("compose", report=True)
        _wire(run, handlers.compose, [prompt, constraints, refine, steps, guidance, seed], outputs, "compose")
        gr.Examples(examples=[["a red circle to the left of a blue square"]], inputs=[prompt])


def _tokens_tab(handlers: Handlers) -> None:
    with gr.Tab("Soft tokens"), gr.Row():
        with gr.Column():
            prompt = gr.Textbox(label="Prompt")
            tokens = gr.File(label="Soft-token file (from 'editkit softrepa train')", file_types=[".safetensors"])
            strength = _slider(GenerateOptions, "soft_token_strength")
            steps = _slider(GenerateOptions, "num_inference_steps")
            guidance = _slider(GenerateOptions, "guidance_scale")
            seed = _seed(GenerateOptions)
            run = gr.Button("Generate", variant="primary")
        with gr.Column():
            outputs = _result_column("tokens")
    inputs = [prompt, tokens, strength, steps, guidance, seed]
    _wire(run, handlers.generate_with_tokens, inputs, outputs, "generate_with_tokens")


def build_demo(
    model: Any = None,
    *,
    device: str | None = None,
    dtype: str | None = None,
    manager: ModelManager | None = None,
    output_dir: str | os.PathLike | None = None,
) -> gr.Blocks:
    """The app's Blocks for ``model`` (Hub id, folder, .safetensors or pipeline); loads nothing yet."""
    if manager is None:
        if model is None:
            from editkit.models import DEFAULT_SD_MODEL

            model = os.environ.get("EDITKIT_MODEL", DEFAULT_SD_MODEL)
        manager = ModelManager(model, device=device, dtype=dtype)
    handlers = Handlers(manager, output_dir)
    # delete_cache: gradio removes its cached uploads/results older than an hour, every hour
    with gr.Blocks(title="editkit", analytics_enabled=False, delete_cache=CACHE_LIFETIME) as demo:
        gr.Markdown(f"# {TITLE}\n{INTRO}\n\nModel: `{manager.name}` (loaded on the first run).")
        with gr.Tabs():
            _stylize_tab(handlers)
            _edit_tab(handlers)
            _compose_tab(handlers)
            _tokens_tab(handlers)
    demo.queue(default_concurrency_limit=1, max_size=32)
    demo.editkit_manager = manager  # for tests and launchers: the shared models
    return demo


def launch_demo(demo: gr.Blocks, *, host: str = "127.0.0.1", port: int | None = None, **kwargs: Any):
    """Launch with editkit's settings: the upload limit, no tracebacks in the page, API link in the footer."""
    options: dict[str, Any] = {
        "server_name": host,
        "server_port": port,
        "max_file_size": MAX_FILE_SIZE,
        "show_error": False,
        "footer_links": ["api", "gradio"],
        "theme": gr.themes.Soft(),
        **kwargs,
    }
    return demo.launch(**options)
