"""Quiet, labelled progress: each CLI bar names its phase, and the dependencies' known noise is gone.

The runs are real subprocesses on the shipped shapes model (the CLI's stderr as a user sees it).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from editkit.quiet import NOISE, MessageFilter

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "assets" / "examples"
SHAPES = ROOT / "assets" / "models" / "shapes-sd"
#: Messages that used to appear in normal runs (torchvision fallback, fp32 cast, fp16 on CPU, event loop).
NOISE_MARKERS = ("requires torchvision", "kept in float32", "cannot run with `cpu` device", "unclosed event loop")

pytestmark = pytest.mark.skipif(not (SHAPES / "model_index.json").is_file(), reason="the shapes model is not shipped")


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "editkit.cli", *args, "--model", str(SHAPES), "--device", "cpu"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)
    assert result.returncode == 0, result.stderr
    return result


def _bar_names(stderr: str) -> set[str]:
    """The names in front of the tqdm bars ("generating:  50%|..." -> "generating")."""
    frames = stderr.replace("\r", "\n").splitlines()
    return {frame.split(":", 1)[0].strip() for frame in frames if "%|" in frame}


def _assert_quiet(stderr: str) -> None:
    for marker in NOISE_MARKERS:
        assert marker not in stderr, f"{marker!r} still on stderr"


def test_stylize_bars_name_each_inversion_and_fp16_warns_once(tmp_path):
    result = _cli(
        "stylize", str(EXAMPLES / "content.png"), str(EXAMPLES / "style.png"), str(EXAMPLES / "edit.png"),
        "--output-dir", str(tmp_path / "out"), "--steps", "2", "--dtype", "fp16", cwd=tmp_path,
    )  # fmt: skip
    names = _bar_names(result.stderr)
    assert {"inverting content", "inverting style 1/2", "inverting style 2/2", "generating"} <= names, names
    assert "" not in names  # no unnamed bar
    _assert_quiet(result.stderr)
    assert result.stderr.count("float16 on the CPU") == 1  # editkit's own warning, once


def test_compose_bars_name_stage_1_and_refinement(tmp_path):
    result = _cli("compose", "a red circle to the left of a blue square", "-o", "c.png", "--steps", "4", cwd=tmp_path)
    names = _bar_names(result.stderr)
    assert "stage 1" in names and "" not in names, names
    assert ("refinement" in names) == ("refined:" in result.stdout)  # the second bar runs only when refining
    _assert_quiet(result.stderr)


def test_message_filter_drops_only_the_listed_messages(caplog):
    logger = logging.getLogger("editkit.tests.quiet")
    logger.addFilter(MessageFilter(NOISE["diffusers.models.modeling_utils"]))
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("There are modules in AutoencoderKL that should be kept in float32: []. Casting ...")
        logger.warning("There are modules in UNet2DConditionModel that should be kept in float32: ['proj']. ...")
    assert [record.getMessage()[:60] for record in caplog.records] == [
        "There are modules in UNet2DConditionModel that should be kep"
    ]


def test_cli_sends_resource_warnings_to_the_debug_log(capsys):
    from editkit.cli import _show_warning

    _show_warning("unclosed event loop <_UnixSelectorEventLoop>", ResourceWarning, "x.py", 1)
    _show_warning("a user-facing warning", UserWarning, "x.py", 1)
    assert capsys.readouterr().err == "editkit: warning: a user-facing warning\n"
