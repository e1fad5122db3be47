"""``editkit app``: launch the Gradio demo (``pip install 'editkit[app]'``).

The one module of ``editkit.commands`` that may import ``editkit.app`` (lazily, in :func:`run`):
the import rule (ruff TID251, ``editkit/commands/.ruff.toml``) names it as the exception.
"""

from __future__ import annotations

import argparse

from editkit.errors import InputError
from editkit.models import DEFAULT_SD_MODEL

EXAMPLE = "example: editkit app --model assets/models/shapes-sd --port 7860"


def _add_options(parser: argparse.ArgumentParser, default_model: str | None) -> None:
    parser.add_argument(
        "--model",
        default=default_model,
        help=f"Hub id, diffusers folder or .safetensors file, loaded on first use (default: {DEFAULT_SD_MODEL})",
    )
    parser.add_argument("--device", default=None, help="cuda, cuda:1, mps or cpu (default: the best available)")
    parser.add_argument("--dtype", default=None, help="fp16, bf16 or fp32 (default: fp16 on CUDA, fp32 elsewhere)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 for every interface")
    parser.add_argument("--port", type=int, default=None, help="port (default: 7860 or the next free one)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")


def build_launcher_parser() -> argparse.ArgumentParser:
    """The options of ``python app.py`` (the same as ``editkit app``)."""
    parser = argparse.ArgumentParser(prog="app.py", description="Launch editkit's Gradio demo.", epilog=EXAMPLE)
    _add_options(parser, default_model=None)
    return parser


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "app",
        help="launch the Gradio demo in the browser",
        description="Launch the Gradio demo: one tab per method on one shared model, loaded on the first request.",
        epilog=EXAMPLE,
    )
    _add_options(parser, default_model=DEFAULT_SD_MODEL)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        from editkit.app import build_demo, launch_demo
    except ImportError as error:
        raise InputError(f"the app needs gradio: pip install 'editkit[app]' ({error})") from None
    demo = build_demo(args.model, device=args.device, dtype=args.dtype)
    launch_demo(demo, host=args.host, port=args.port, share=args.share)
    return 0
