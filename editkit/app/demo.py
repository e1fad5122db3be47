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


def _seed() -> gr.Number:
    return gr.Number(label="Seed", value=0, precision=0, minimum=0)


def _stylize_tab(handlers: Handlers) -> None:
    with gr.Tab("Stylize"):
        with gr.Row():
            with gr.Column():
                with gr.Row():
                    content = gr.Image(label="Content", type="filepath", elem_id="stylize-content")
                    style = gr.Image(label="Style", type="filepath", elem_id="stylize-style")
                gamma = gr.Slider(0, 1, value=0.75, step=0.05, label="gamma: query preservation (1 keeps the content)")
                tau = gr.Slider(0.5, 3, value=1.5, step=0.1, label="tau: attention temperature (sharpens the style)")
                use_adain = gr.Checkbox(value=True, label="Content-aware AdaIN of the start latent")
                adain = gr.Slider(
                    0, 1, value=0.6, step=0.05, label="AdaIN style strength (0 keeps the content's colours)"
                )
                steps = gr.Slider(1, 100, value=50, step=1, label="Steps", elem_id="stylize-steps")
                mask = gr.Image(label="Mask (optional: stylize only the white part)", type="filepath")
                seed = _seed()
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
                contrast = gr.Radio(
                    ["dual", "source", "target", "none"],
                    value="dual",
                    label="Contrast: dual (both anchors), source (CDS), target (CUT) or none (plain DDS)",
                )
                steps = gr.Slider(1, 400, value=200, step=1, label="Optimisation steps")
                guidance = gr.Slider(1, 20, value=7.5, step=0.5, label="Guidance scale")
                mask = gr.Image(label="Mask (optional: edit only the white part)", type="filepath")
                seed = _seed()
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
                refine = gr.Checkbox(value=True, label="Verify and refine the initial noise")
                steps = gr.Slider(1, 100, value=50, step=1, label="Steps")
                guidance = gr.Slider(1, 20, value=7.5, step=0.5, label="Guidance scale")
                seed = _seed()
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
            strength = gr.Slider(0, 2, value=1.0, step=0.05, label="Token strength (0: the model without tokens)")
            steps = gr.Slider(1, 100, value=50, step=1, label="Steps")
            guidance = gr.Slider(1, 20, value=7.5, step=0.5, label="Guidance scale")
            seed = _seed()
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
            from editkit.commands.common import DEFAULT_SD_MODEL

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
