"""The compose report: scores, thresholds, who judged, unknown words; cheap checks before model work."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from editkit.cli import main
from editkit.model_card import card_metadata, is_shapes_model, vocabulary_warnings
from editkit.testing import tiny_tokenizer

SHAPES_MODEL = Path(__file__).resolve().parents[1] / "assets" / "models" / "shapes-sd"
needs_shapes = pytest.mark.skipif(not (SHAPES_MODEL / "model_index.json").is_file(), reason="no shapes-sd")


def _compose(model, tmp_path, prompt, *extra, output="out.png"):
    argv = ["compose", prompt, "-o", str(tmp_path / output), "--model", str(model), "--device", "cpu"]
    return main([*argv, "--steps", "10", *extra])


def _rows(report: str) -> dict[str, str]:
    """``"kind description" -> stage-1 verdict`` of the report's constraint lines."""
    rows = {}
    for line in report.splitlines():
        match = re.match(r"  (entity|attribute|relation)\s+(.+?)\s+stage 1: (ok|FAIL)\s+(-?[\d.]+) \(threshold", line)
        if match:
            rows[f"{match[1]} {match[2]}"] = match[3]
    return rows


@needs_shapes
def test_shapes_model_reports_unknown_objects_and_words(tmp_path, capsys):
    assert _compose(SHAPES_MODEL, tmp_path, "a purple dog on the moon") == 0
    out = capsys.readouterr().out
    assert "judged by the shapes verifier" in out
    rows = _rows(out)
    assert rows["entity dog"] == "FAIL" and rows["entity moon"] == "FAIL"  # the model never saw a dog
    assert "not a shapes-world object" in out
    assert "warning: 'dog' is outside the model's training vocabulary" in out
    assert "'moon' is outside" in out and "'purple' is outside" not in out


@needs_shapes
def test_shapes_model_report_agrees_with_the_detector_on_the_written_image(tmp_path, capsys):
    from editkit.shapes.detect import detect

    assert _compose(SHAPES_MODEL, tmp_path, "a red circle to the left of a blue square", "--seed", "0") == 0
    rows = _rows(capsys.readouterr().out)
    assert set(rows) == {
        "entity circle",
        "entity square",
        "attribute red circle",
        "attribute blue square",
        "relation circle left square",
    }
    found = detect(np.asarray(Image.open(tmp_path / "out.png").convert("RGB")))
    meta = json.loads(Image.open(tmp_path / "out.png").text["editkit"])
    if meta["chosen"] == "stage1":  # the written image is the one the stage-1 column judged
        red_circle = any(d.color == "red" and d.shape == "circle" for d in found)
        blue_square = any(d.color == "blue" and d.shape == "square" for d in found)
        assert (rows["attribute red circle"] == "ok") == red_circle
        assert (rows["attribute blue square"] == "ok") == blue_square
    assert meta["verifier"] == "auto" and meta["losses"] == "attend-excite"


def test_attention_verifier_is_named_a_heuristic_and_subwords_warn(sd15_dir, tmp_path, capsys):
    argv = ["--steps", "2", "--size", "64", "--losses", "paper"]
    assert _compose(sd15_dir, tmp_path, "a red car on the left of a blue bird", *argv) == 0
    out = capsys.readouterr().out
    assert "judged by the attention verifier (a heuristic on the model's own attention maps" in out
    assert re.search(r"entity\s+car\s+stage 1: (ok|FAIL)\s+[\d.]+ \(threshold 0\.50\)", out)
    # the tiny tokenizer has no word merges: "bird" is 4 characters, 4 sub-word tokens
    assert "'bird' is split into 4 sub-word tokens" in out and "'of' is split" not in out
    assert json.loads(Image.open(tmp_path / "out.png").text["editkit"])["losses"] == "paper"


def test_output_extension_is_checked_before_any_model_work(tmp_path, capsys):
    assert _compose(tmp_path / "no-such-model", tmp_path, "a red car", output="out.gif") == 2
    err = capsys.readouterr().err
    assert "cannot write" in err and ".png" in err and "no-such-model" not in err
    assert _compose(tmp_path / "no-such-model", tmp_path, "a red car", "--verifier", "vqa") == 2
    assert "needs weights" in capsys.readouterr().err


def test_model_card_helpers(tmp_path):
    assert is_shapes_model(SHAPES_MODEL) == (SHAPES_MODEL / "README.md").is_file()
    assert not is_shapes_model(tmp_path) and card_metadata("some/hub-id") == {}
    (tmp_path / "README.md").write_text('---\ntags: [shapes-world]\nvocabulary: ["a", "on", "red"]\n---\n# card\n')
    assert is_shapes_model(tmp_path) and card_metadata(tmp_path)["vocabulary"] == ["a", "on", "red"]
    tokenizer = tiny_tokenizer(["red", "car"])
    assert vocabulary_warnings("a red car on a red mat", tokenizer, {"a", "on", "red"}) == [
        "'car' is outside the model's training vocabulary (its model card lists it)",
        "'mat' is outside the model's training vocabulary (its model card lists it)",
    ]
    assert vocabulary_warnings("a red car on a mat", tokenizer) == [
        "'mat' is split into 3 sub-word tokens: the text encoder may not know it"
    ]
