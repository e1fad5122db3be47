"""``editkit env``: versions, devices, the Hugging Face cache and offline mode, in about a second.

Fast by design: package versions come from their installed metadata (``importlib.metadata``, no
import of diffusers, transformers or gradio); only torch is imported, for CUDA/MPS. Whether the
default model is cached is read from the local Hugging Face cache (``try_to_load_from_cache``),
never from the network.
"""

from __future__ import annotations

import argparse
import os
import platform
from importlib import metadata

from editkit import __version__
from editkit.cli import echo
from editkit.commands.common import DEFAULT_SD_MODEL
from editkit.models import supported_families

#: Distributions whose versions the report lists (name in the report -> distribution name).
PACKAGES = {
    "torch": "torch",
    "diffusers": "diffusers",
    "transformers": "transformers",
    "accelerate": "accelerate",
    "safetensors": "safetensors",
    "huggingface_hub": "huggingface_hub",
    "xformers": "xformers",
    "gradio": "gradio",
}
#: What a missing optional package's line says (how to get it).
MISSING = {
    "xformers": "not installed (optional, CUDA: pip install 'editkit[xformers]')",
    "gradio": "not installed (pip install 'editkit[app]')",
    "accelerate": "not installed (optional: low-memory loading and offload)",
}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "env",
        help="print versions, devices, the HF cache and offline mode",
        description="Print versions, devices, the Hugging Face cache and offline mode (paste it into bug reports).",
        epilog="example: editkit env",
    )
    parser.set_defaults(run=run)


def package_version(distribution: str) -> str | None:
    """The installed version of ``distribution`` from its metadata (nothing imported), or None."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def device_report() -> dict[str, str]:
    """CUDA (device name and CUDA version) and Apple MPS availability, and torch's CPU threads."""
    import torch

    cuda = "not available"
    if torch.cuda.is_available():
        cuda = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}, {torch.cuda.device_count()} device(s))"
    mps = getattr(torch.backends, "mps", None)
    return {
        "cuda": cuda,
        "mps": "available" if mps is not None and mps.is_available() else "not available",
        "cpu threads": str(torch.get_num_threads()),
    }


def hub_report(model: str = DEFAULT_SD_MODEL) -> dict[str, str]:
    """The Hugging Face cache folder, offline mode, and whether ``model`` is in the cache (no network)."""
    from huggingface_hub import constants, try_to_load_from_cache

    offline = bool(constants.HF_HUB_OFFLINE)
    found = try_to_load_from_cache(model, "model_index.json")
    cached = "cached" if isinstance(found, str) else "not cached (downloaded on first use; needs network)"
    return {
        "hf cache": str(constants.HF_HUB_CACHE),
        "offline mode": f"{'on' if offline else 'off'} (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')})",
        "default model": f"{model}: {cached}",
    }


def environment_report() -> dict[str, str]:
    """What editkit runs on: package versions, devices, attention kernels, model families, the HF cache."""
    report = {"editkit": __version__, "python": platform.python_version(), "platform": platform.platform()}
    for name, distribution in PACKAGES.items():
        report[name] = package_version(distribution) or MISSING.get(name, "not installed")
    devices = device_report()
    report.update(devices)
    xformers = package_version("xformers") is not None and devices["cuda"] != "not available"
    report["attention kernels"] = ", ".join(["sdpa", *(["xformers"] if xformers else [])])
    report["model families"] = ", ".join(supported_families())
    report.update(hub_report())
    return report


def run(args: argparse.Namespace) -> int:
    for key, value in environment_report().items():
        echo(f"{key:>18}: {value}")
    return 0
