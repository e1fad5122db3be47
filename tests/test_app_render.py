"""The page's rendering helpers: enlarged display copies, path scrubbing, the report table, page errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

gr = pytest.importorskip("gradio")

from editkit.app.render import display_image, page_event, report_rows, scrub_paths  # noqa: E402


def test_small_results_are_enlarged_by_a_whole_factor_with_crisp_pixels():
    pixels = np.random.default_rng(0).integers(0, 255, (32, 48, 3), dtype=np.uint8)
    shown = display_image(Image.fromarray(pixels), side=512)
    assert shown.size == (480, 320)  # factor 10: the longer side as close to 512 as a whole factor gets
    assert np.array_equal(np.asarray(shown)[::10, ::10], pixels)  # nearest neighbour: each pixel a 10x10 block
    large = Image.new("RGB", (768, 512))
    assert display_image(large, side=512) is large


def test_server_paths_are_cut_to_file_names():
    text = "mask /tmp/gradio/abc123/mask.png is 128x128; see /srv/data/keep.png"
    assert scrub_paths(text, ["/tmp/gradio"]) == "mask mask.png is 128x128; see /srv/data/keep.png"


def test_report_rows_pair_stage_1_and_refined_verdicts():
    row = {"kind": "entity", "constraint": "circle", "satisfied": False, "score": 0.1, "threshold": 0.5}
    row["verifier"] = "v"
    report = {"before_refinement": [row], "after_refinement": [{**row, "satisfied": True, "score": 0.9}]}
    assert report_rows(report) == [["circle", "entity", "FAIL 0.10 / 0.5", "ok 0.90 / 0.5", "v"]]
    assert report_rows({"before_refinement": [row], "after_refinement": None})[0][3] == "-"


def test_page_event_puts_the_error_in_the_messages_box():
    def endpoint(*args):
        raise gr.Error("upload a content image (/tmp/gradio/x/content.png)")

    image, download, messages = page_event(endpoint)()
    assert image is None and download is None
    assert messages == "Error: upload a content image (content.png)"
