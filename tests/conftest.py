"""Shared fixtures: tiny offline pipelines (built once per session) and an offline Hub."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Tiny models gain nothing from intra-op threads, and on a shared 2-core machine they lose a lot.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ and pipelines/ importable from a source checkout
    sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def sd15_pipe():
    from editkit.testing import tiny_sd15_pipeline

    return tiny_sd15_pipeline(seed=0)


@pytest.fixture(scope="session")
def sdxl_pipe():
    from editkit.testing import tiny_sdxl_pipeline

    return tiny_sdxl_pipeline(seed=0)


@pytest.fixture(scope="session")
def sd15_dir(tmp_path_factory):
    from editkit.testing import tiny_sd15_pipeline

    path = tmp_path_factory.mktemp("tiny-sd15")
    tiny_sd15_pipeline(seed=0, path=path)
    return path


@pytest.fixture(scope="session")
def sdxl_dir(tmp_path_factory):
    from editkit.testing import tiny_sdxl_pipeline

    path = tmp_path_factory.mktemp("tiny-sdxl")
    tiny_sdxl_pipeline(seed=0, path=path)
    return path


@pytest.fixture(scope="session")
def sd3_pipe():
    from editkit.testing import tiny_sd3_pipeline

    return tiny_sd3_pipeline(seed=0)


@pytest.fixture(scope="session")
def sd35_pipe():
    from editkit.testing import tiny_sd3_pipeline

    return tiny_sd3_pipeline(seed=0, sd35=True)


@pytest.fixture(scope="session")
def flux_pipe():
    from editkit.testing import tiny_flux_pipeline

    return tiny_flux_pipeline(seed=0)


@pytest.fixture(scope="session")
def sd3_dir(tmp_path_factory):
    from editkit.testing import tiny_sd3_pipeline

    path = tmp_path_factory.mktemp("tiny-sd3")
    tiny_sd3_pipeline(seed=0, path=path)
    return path


@pytest.fixture(scope="session")
def sd35_dir(tmp_path_factory):
    from editkit.testing import tiny_sd3_pipeline

    path = tmp_path_factory.mktemp("tiny-sd35")
    tiny_sd3_pipeline(seed=0, path=path, sd35=True)
    return path


@pytest.fixture(scope="session")
def flux_dir(tmp_path_factory):
    from editkit.testing import tiny_flux_pipeline

    path = tmp_path_factory.mktemp("tiny-flux")
    tiny_flux_pipeline(seed=0, path=path)
    return path


@pytest.fixture
def saves(monkeypatch):
    """Record every image save; ``saves.interrupt_at = n`` makes the n-th save (1-based) a Ctrl-C mid-write."""
    import editkit.image

    real = editkit.image.save_image

    class Saves(list):
        interrupt_at = None

    recorded = Saves()

    def save(image, path, **kwargs):
        recorded.append(Path(path).name)
        if len(recorded) == recorded.interrupt_at:

            def partial(tmp):
                tmp.write_bytes(b"\x89PNG partial")
                raise KeyboardInterrupt

            return editkit.image.atomic_write(path, partial, overwrite=kwargs.get("overwrite", False))
        return real(image, path, **kwargs)

    monkeypatch.setattr(editkit.image, "save_image", save)
    return recorded
