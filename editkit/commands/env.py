"""``editkit env``: versions, devices, attention kernels and the model families supported here."""

from __future__ import annotations

import argparse
import platform

from editkit import __version__
from editkit.cli import echo


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "env",
        help="print versions, devices and attention kernels",
        description="Print versions, devices and attention kernels (paste it into bug reports).",
        epilog="example: editkit env",
    )
    parser.set_defaults(run=run)


def environment_report() -> dict[str, str]:
    """What editkit runs on: package versions, devices, optional kernels."""
    import diffusers
    import torch
    import transformers

    from editkit.attention import xformers_available
    from editkit.models import supported_families

    report = {
        "editkit": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else "not available",
        "mps": "available" if torch.backends.mps.is_available() else "not available",
        "cpu threads": str(torch.get_num_threads()),
        "attention kernels": ", ".join(["sdpa", *(["xformers"] if xformers_available() else [])]),
        "model families": ", ".join(supported_families()),
    }
    try:
        import gradio

        report["gradio"] = gradio.__version__
    except ImportError:
        report["gradio"] = "not installed (pip install 'editkit[app]')"
    return report


def run(args: argparse.Namespace) -> int:
    for key, value in environment_report().items():
        echo(f"{key:>18}: {value}")
    return 0
