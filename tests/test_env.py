"""``editkit env``: every field, fast (a subprocess, wall time bounded), the HF cache read offline."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from editkit.commands.common import DEFAULT_SD_MODEL
from editkit.commands.env import hub_report

ROOT = Path(__file__).resolve().parents[1]
FIELDS = (
    "editkit",
    "torch",
    "diffusers",
    "accelerate",
    "safetensors",
    "xformers",
    "cuda",
    "mps",
    "model families",
    "hf cache",
    "offline mode",
    "default model",
)
#: The target is 3 s on an idle machine, and torch's import (needed for CUDA/MPS) is most of it; so the
#: test bounds what editkit adds on top of a bare ``import torch`` timed alongside (robust on a loaded box).
OVER_TORCH_LIMIT_S = 5.0


def _fake_cache(cache: Path, repo_id: str) -> None:
    """A Hugging Face cache holding ``repo_id``'s model_index.json, laid out as huggingface_hub writes it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text("{}")


def test_env_lists_every_field_quickly_and_sees_the_cached_default_model(tmp_path):
    cache = tmp_path / "hub"
    _fake_cache(cache, DEFAULT_SD_MODEL)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "editkit.cli", "env"], capture_output=True, text=True, env=env, timeout=120
    )
    wall = time.perf_counter() - start
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True, env=env, timeout=120)
    floor = time.perf_counter() - start
    print(f"editkit env: {wall:.2f} s wall; import torch: {floor:.2f} s")
    assert result.returncode == 0, result.stderr
    lines = dict(line.strip().split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    assert set(FIELDS) <= set(lines), set(FIELDS) - set(lines)
    assert lines["hf cache"] == str(cache)
    assert lines["offline mode"].startswith("on")
    assert lines["default model"] == f"{DEFAULT_SD_MODEL}: cached"
    assert wall < floor + OVER_TORCH_LIMIT_S
    assert result.stderr == ""  # no warnings, no progress bars


def test_hub_report_says_not_cached_for_a_model_outside_the_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    report = hub_report("editkit-tests/not-downloaded")
    assert report["hf cache"] == str(tmp_path)
    assert report["default model"].startswith("editkit-tests/not-downloaded: not cached")
