"""The Gradio page: one tab per method, named API endpoints, a shared queue, no model at import.

``build_demo(model)`` only lays out the page; the model loads on the first request (see
:class:`~editkit.app.models.ModelManager`). Endpoints: ``/stylize``, ``/edit``, ``/compose``,
``/generate_with_tokens`` (``gradio_client.Client(url).predict(..., api_name="/stylize")``).
All four share one concurrency group of size 1, so runs on the shared UNet are queued, never
interleaved. :func:`launch_demo` applies the launch settings (upload limit, no tracebacks).

Each tab's Run and Cancel buttons sit right under its main inputs (visible without scrolling on
a 1280x900 window); the page's own events show results for people (``editkit.app.render``:
enlarged small results, errors in the Messages box, the compose report as a table), while the
named API endpoints keep the handlers' values as they are. Each upload is checked at once and
its acceptance or rejection is said in the Messages box.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import gradio as gr

from editkit.app.handlers import Handlers
from editkit.app.models import ModelManager
from editkit.app.render import REPORT_HEADERS, page_event, upload_message
from editkit.quiet import quiet_library_noise
from editkit.tasks import ComposeOptions, EditOptions, GenerateOptions, StylizeOptions
from editkit.tasks.edit import FAMILY_DEFAULTS as EDIT_FAMILY_DEFAULTS
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
#: The demo soft-token file for the shipped shapes model (``examples/make_demo_tokens.py`` makes it).
DEMO_TOKENS = Path(__file__).resolve().parents[2] / "assets" / "demo" / "shapes-softrepa.safetensors"
#: Heights in pixels of the result boxes (a minimum: results are shown enlarged to fill them) and input images.
RESULT_HEIGHT = 448
INPUT_HEIGHT = 220
TITLE = "editkit: diffusion image editing and style transfer"
INTRO = (
    "Training-free style transfer (AttenST/StyleID), contrastive editing (DDS/CDS), compositional "
    "generation with noise refinement and SoftREPA soft tokens, on one shared model. "
    "Each result comes with a PNG holding its parameters."
)


def _result_column(tab: str, report: bool = False) -> list[gr.components.Component]:
    """The outputs every tab shares: image (shown enlarged), PNG download, messages; (+ JSON report, table)."""
    outputs = [
        gr.Image(
            label="Result (small outputs shown enlarged; the PNG below is the true output)",
            type="pil",
            format="png",
            interactive=False,
            height=RESULT_HEIGHT,
            buttons=["fullscreen"],  # the download is the PNG file below, at its true size
            elem_id=f"{tab}-result",
        ),
        gr.File(label="PNG with parameters", interactive=False, elem_id=f"{tab}-download"),
        gr.Textbox(label="Messages", interactive=False, lines=3, elem_id=f"{tab}-messages"),
    ]
    if report:  # the API's JSON (hidden) and the page's table
        outputs.append(gr.JSON(label="Constraint report (JSON)", visible=False, elem_id=f"{tab}-report-json"))
        outputs.append(
            gr.Dataframe(
                headers=REPORT_HEADERS, label="Constraint report", interactive=False, wrap=True, elem_id=f"{tab}-report"
            )
        )
    return outputs


def _example_file(name: str | None) -> str | None:
    """An example file: a name under :data:`EXAMPLES_DIR` or an absolute path; None when it is not there."""
    path = Path(name) if name and os.path.isabs(name) else EXAMPLES_DIR / (name or "")
    return str(path) if name and path.is_file() else None


def _examples(tab: str, rows: list[list[str]], inputs: list[gr.components.Component], files: int = 0) -> None:
    """Example rows filling every field they name; the first ``files`` values are files (rows skipped if absent)."""
    resolved = [[_example_file(v) if i < files else v for i, v in enumerate(row)] for row in rows]
    if all(value is not None for row in resolved for value in row):
        gr.Examples(examples=resolved, inputs=inputs, elem_id=f"{tab}-examples")


def _buttons(label: str, tab: str) -> tuple[gr.Button, gr.Button]:
    """The tab's Run and Cancel buttons, side by side."""
    with gr.Row():
        run = gr.Button(label, variant="primary", elem_id=f"{tab}-run", scale=2)
        cancel = gr.Button("Cancel", variant="secondary", elem_id=f"{tab}-cancel", scale=1)
    return run, cancel


def _wire(handlers: Handlers, buttons: tuple, fn: Any, inputs: list, outputs: list, api_name: str) -> None:
    """The page's Run and Cancel events, and the named API endpoint (on a hidden trigger).

    The page's event shows results for people (:func:`~editkit.app.render.page_event`); the API
    endpoint returns the handler's values as they are (true-size image, JSON report, raised errors).
    Cancel drops the queued or running event and asks the pipeline to stop after its current step.
    """
    run, cancel = buttons
    report = len(outputs) > 3
    common = {
        "preprocess": False,  # handlers read uploads with editkit.image (its checks, its messages)
        "concurrency_limit": 1,
        "concurrency_id": CONCURRENCY_ID,
    }
    event = run.click(
        page_event(fn, report=report),
        inputs=inputs,
        outputs=[*outputs[:3], *outputs[4:]],
        api_name=f"{api_name}_page",  # its own name: the endpoint's name stays the API's
        api_visibility="private",
        show_progress="full",
        show_progress_on=[outputs[0]],  # one progress bar per run, named after the running phase
        **common,
    )

    def cancel_run() -> str:
        handlers.manager.interrupt()
        return "Cancelled."

    cancel.click(cancel_run, outputs=[outputs[2]], cancels=[event], queue=False, api_visibility="private")
    api_trigger = gr.Button(visible=False, elem_id=f"{api_name}-api")
    api_trigger.click(fn, inputs=inputs, outputs=outputs[:4], api_name=api_name, **common)


def _report_uploads(handlers: Handlers, fields: list[tuple[gr.components.Component, str]], messages) -> None:
    """Check each upload at once and say in the Messages box whether it was accepted, or why not;
    a rejected upload is also cleared from its field.

    ``fields``: (component, label); the Soft tokens tab's file is a token file, every other one an image.
    """
    for component, label in fields:

        def check(value: Any, label: str = label, kind: str = "tokens" if label == "soft-token" else "image"):
            size, error = handlers.check_upload(value, label, kind)
            return upload_message(label, size, error), gr.skip() if error is None else None

        component.upload(
            check,
            inputs=[component],
            outputs=[messages, component],
            preprocess=False,
            api_visibility="private",
            queue=False,
        )


def _seed(options: type) -> gr.Number:
    return gr.Number(label="Seed", value=options.seed, precision=0, minimum=knob_of(options, "seed").low)


def _slider(options: type, name: str, **kwargs: Any) -> gr.Slider:
    """A slider for an option: its default, label and suggested range from the options dataclass
    (``editkit.tasks``); the handler checks the option's full range, the API may go beyond the slider."""
    spec = knob_of(options, name)
    low, high, step = spec.slider
    value = kwargs.pop("value", None)  # a default that depends on the model (the option's is None)
    value = getattr(options, name) if value is None else value
    return gr.Slider(low, high, value=value, step=step, label=spec.label, **kwargs)


def _image(label: str, elem_id: str) -> gr.Image:
    return gr.Image(label=label, type="filepath", height=INPUT_HEIGHT, elem_id=elem_id)


def _stylize_tab(handlers: Handlers) -> None:
    with gr.Tab("Stylize"):
        with gr.Row():
            with gr.Column():
                with gr.Row():
                    content = _image("Content", "stylize-content")
                    style = _image("Style", "stylize-style")
                buttons = _buttons("Stylize", "stylize")
                gamma = _slider(StylizeOptions, "gamma")
                tau = _slider(StylizeOptions, "tau")
                use_adain = gr.Checkbox(value=True, label="Content-aware AdaIN of the start latent")
                adain = _slider(StylizeOptions, "adain_strength")
                steps = _slider(StylizeOptions, "num_inference_steps", elem_id="stylize-steps",
                                value=_stylize_steps(handlers))  # fmt: skip
                mask = _image("Mask (optional: stylize only the white part)", "stylize-mask")
                seed = _seed(StylizeOptions)
                timing = gr.Radio(
                    list(knob_of(StylizeOptions, "feature_timing").choices), value=StylizeOptions.feature_timing,
                    label="Style features of step t from UNet(z_t-1, t) (inversion_step) or UNet(z_t, t) (StyleID's)",
                    elem_id="stylize-feature-timing",
                )  # fmt: skip
                with gr.Accordion("Text (optional)", open=False):
                    prompt = gr.Textbox(value="", label="Prompt", elem_id="stylize-prompt")
                    negative = gr.Textbox(
                        value="", label="Negative prompt (not FLUX.1)", elem_id="stylize-negative-prompt"
                    )
                    guidance = _slider(StylizeOptions, "guidance_scale", elem_id="stylize-guidance")
            with gr.Column():
                outputs = _result_column("stylize")
        inputs = [content, style, gamma, tau, use_adain, adain, steps, mask, seed, timing, prompt, negative, guidance]
        _wire(handlers, buttons, handlers.stylize, inputs, outputs, "stylize")
        uploads = [(content, "content image"), (style, "style image"), (mask, "mask image")]
        _report_uploads(handlers, uploads, outputs[2])
        _examples("stylize", [["content.png", "style.png"]], [content, style], files=2)


def _edit_tab(handlers: Handlers) -> None:
    with gr.Tab("Edit"):
        with gr.Row():
            with gr.Column():
                image = _image("Image", "edit-image")
                source = gr.Textbox(label="Source prompt (what the image shows)", elem_id="edit-source")
                target = gr.Textbox(label="Target prompt (what it should show)", elem_id="edit-target")
                buttons = _buttons("Edit", "edit")
                spec = knob_of(EditOptions, "contrast")
                contrast = gr.Radio(list(spec.choices), value=EditOptions.contrast, label=spec.label)
                # the options' None is the model's: the sliders start at the family's (UNet DDS, SD3 / FLUX FlowEdit)
                family = _family_or_none(handlers) or "sd"
                defaults = EDIT_FAMILY_DEFAULTS.get(family, EDIT_FAMILY_DEFAULTS["sd"])
                steps = _slider(
                    EditOptions, "num_inference_steps", elem_id="edit-steps", value=defaults.num_inference_steps
                )
                guidance = _slider(EditOptions, "guidance_scale", value=defaults.guidance_scale)
                mask = _image("Mask (optional: edit only the white part)", "edit-mask")
                seed = _seed(EditOptions)
            with gr.Column():
                outputs = _result_column("edit")
        inputs = [image, source, target, contrast, steps, guidance, mask, seed]
        _wire(handlers, buttons, handlers.edit, inputs, outputs, "edit")
        _report_uploads(handlers, [(image, "input image"), (mask, "mask image")], outputs[2])
        prompts = ["a green triangle and a yellow square", "a blue triangle and a yellow square"]
        _examples("edit", [["edit.png", "mask.png", *prompts]], [image, mask, source, target], files=2)


def _stylize_steps(handlers: Handlers) -> int:
    """The stylize steps slider's start: StyleID's 50 on SD/SDXL, the family's text-to-image steps on MM-DiT."""
    from editkit.backbones import MMDIT_FAMILIES
    from editkit.tasks.stylize import UNET_STEPS

    family = _family_or_none(handlers)
    return _compose_defaults(handlers)[0] if family in MMDIT_FAMILIES else UNET_STEPS


def _family_or_none(handlers: Handlers, *, schnell: bool = False) -> str | None:
    """The model's family (``schnell``: FLUX.1-schnell as ``"flux-schnell"``), None when it cannot be read yet
    (the page still builds; loading reports it)."""
    from editkit.errors import EditkitError

    manager = handlers.manager
    try:
        return manager.defaults_family() if schnell else manager.family()
    except EditkitError:
        return None


def _compose_defaults(handlers: Handlers) -> tuple[int, float]:
    """The compose sliders' start: the model family's steps and guidance (``tasks.compose.FAMILY_DEFAULTS``;
    FLUX.1-schnell's when the transformer config has no guidance embedding, read before loading)."""
    from editkit.tasks.compose import FAMILY_DEFAULTS

    return FAMILY_DEFAULTS.get(_family_or_none(handlers, schnell=True) or "sd", FAMILY_DEFAULTS["sd"])


def _compose_tab(handlers: Handlers) -> None:
    with gr.Tab("Compose"):
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(
                    label="Prompt", placeholder="a red circle to the left of a blue square", elem_id="compose-prompt"
                )
                buttons = _buttons("Compose", "compose")
                constraints = gr.Code(
                    label='Constraints (optional JSON; empty: parsed from the prompt), e.g. {"entities": ["circle"]}',
                    language="json",
                    elem_id="compose-constraints",
                )
                refine = gr.Checkbox(value=ComposeOptions.refine, label=knob_of(ComposeOptions, "refine").label)
                default_steps, default_guidance = _compose_defaults(handlers)
                steps = _slider(ComposeOptions, "num_inference_steps", elem_id="compose-steps", value=default_steps)
                guidance = _slider(ComposeOptions, "guidance_scale", value=default_guidance)
                seed = _seed(ComposeOptions)
                with gr.Accordion("Stage 2: noise refinement", open=False):
                    spec = knob_of(ComposeOptions, "noise_refiner")
                    refiner = gr.Radio(list(spec.choices), value=ComposeOptions.noise_refiner, label=spec.label,
                                       elem_id="compose-noise-refiner")  # fmt: skip
                    rounds = _slider(ComposeOptions, "noise_refinement_rounds", elem_id="compose-rounds")
            with gr.Column():
                outputs = _result_column("compose", report=True)
        inputs = [prompt, constraints, refine, steps, guidance, seed, refiner, rounds]
        _wire(handlers, buttons, handlers.compose, inputs, outputs, "compose")
        _examples("compose", [["a red circle to the left of a blue square"]], [prompt])


def _tokens_tab(handlers: Handlers) -> None:
    with gr.Tab("Soft tokens"):
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", elem_id="tokens-prompt")
                tokens = gr.File(
                    label="Soft-token file (from 'editkit softrepa train')",
                    file_types=[".safetensors"],
                    elem_id="tokens-file",
                )
                buttons = _buttons("Generate", "tokens")
                strength = _slider(GenerateOptions, "soft_token_strength")
                default_steps, default_guidance = _compose_defaults(handlers)  # the family's text-to-image ones
                steps = _slider(GenerateOptions, "num_inference_steps", elem_id="tokens-steps", value=default_steps)
                guidance = _slider(GenerateOptions, "guidance_scale", value=default_guidance)
                seed = _seed(GenerateOptions)
                _examples("tokens", [[str(DEMO_TOKENS), "a red circle"]], [tokens, prompt], files=1)
            with gr.Column():
                outputs = _result_column("tokens")
        inputs = [prompt, tokens, strength, steps, guidance, seed]
        _wire(handlers, buttons, handlers.generate_with_tokens, inputs, outputs, "generate_with_tokens")
        _report_uploads(handlers, [(tokens, "soft-token")], outputs[2])


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
        shown = Path(manager.name).name if os.path.isabs(manager.name) else manager.name  # no server folders
        gr.Markdown(f"# {TITLE}\n{INTRO}\n\nModel: `{shown}` (loaded on the first run).")
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
    quiet_library_noise()  # an edge: two harmless dependency messages (see editkit.quiet)
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
