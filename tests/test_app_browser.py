"""The app in a real browser: Debian's chromium driven by Playwright's Python package.

``.ci/run`` installs both (``apt-get install chromium``, ``pip install playwright``; Playwright's
own browser download is not used). Skipped, with the reason, where either is missing.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest

pytest.importorskip("gradio")
playwright_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "assets" / "examples"
SHAPES_MODEL = ROOT / "assets" / "models" / "shapes-sd"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 180_000

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).is_file(), reason="chromium is not installed (apt-get install chromium)"
)


@pytest.fixture(scope="module")
def url(sd15_dir, tmp_path_factory):
    from editkit.app import build_demo, launch_demo

    model = SHAPES_MODEL if (SHAPES_MODEL / "model_index.json").is_file() else sd15_dir
    demo = build_demo(model, device="cpu", output_dir=tmp_path_factory.mktemp("browser-out"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launch_demo(demo, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture
def page():
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page()
        finally:
            browser.close()


def test_stylize_tab_in_a_browser(url, page):
    expect = playwright_api.expect
    page.goto(url, wait_until="domcontentloaded")
    expect(page.get_by_role("tab", name="Stylize")).to_be_visible(timeout=TIMEOUT_MS)
    expect(page.get_by_role("tab", name="Soft tokens")).to_be_visible()

    page.locator("#stylize-content input[type=file]").set_input_files(str(EXAMPLES / "content.png"))
    page.locator("#stylize-style input[type=file]").set_input_files(str(EXAMPLES / "style.png"))
    expect(page.locator("#stylize-content img")).to_be_visible(timeout=TIMEOUT_MS)
    expect(page.locator("#stylize-style img")).to_be_visible(timeout=TIMEOUT_MS)
    steps = page.locator("#stylize-steps input[type=number]")
    steps.fill("2")
    steps.press("Enter")
    expect(page.locator("#stylize-result img")).to_have_count(0)

    page.locator("#stylize-run").click()
    result = page.locator("#stylize-result img")
    expect(result).to_be_visible(timeout=TIMEOUT_MS)
    assert result.evaluate("img => img.complete && img.naturalWidth > 0")  # the picture really loaded
    expect(page.locator("#stylize-download")).to_contain_text("editkit-stylize", timeout=TIMEOUT_MS)
    expect(page.locator("#stylize-messages textarea")).to_have_value("Done.")
    assert "Traceback" not in page.content()
