"""The app in a real browser: Debian's chromium driven by Playwright's Python package.

``.ci/run`` installs both (``apt-get install chromium``, ``pip install playwright``; Playwright's
own browser download is not used). Skipped, with the reason, where either is missing.

One run per tab at a 1280x900 window: the Run button is visible without scrolling, examples fill
the fields they need, the result is displayed at least 256 px wide while the downloaded PNG keeps
the true size, and errors (a missing input, a rejected upload) are said in the Messages box.
A screenshot of each tab is saved under ``$EDITKIT_SCREENSHOT_DIR`` (default: pytest's temp folder).
"""

from __future__ import annotations

import io
import itertools
import os
import re
import shutil
import socket
import threading
from pathlib import Path

import pytest
from PIL import Image

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
#: Every other wait (a click, a field's value, an element appearing): generous, as on a busy CI core
#: (Playwright's defaults, 5 s for expectations and 30 s for actions, failed there).
WAIT_MS = 60_000
VIEWPORT = {"width": 1280, "height": 900}
#: The smallest displayed width of a result image, in CSS pixels.
MIN_DISPLAY_WIDTH = 256

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).is_file(), reason="chromium is not installed (apt-get install chromium)"
)


@pytest.fixture(scope="module")
def served(sd15_dir, tmp_path_factory):
    from editkit.app import build_demo, launch_demo

    model = SHAPES_MODEL if (SHAPES_MODEL / "model_index.json").is_file() else sd15_dir
    demo = build_demo(model, device="cpu", output_dir=tmp_path_factory.mktemp("browser-out"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launch_demo(demo, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
    yield demo, f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def url(served):
    return served[1]


@pytest.fixture(scope="module")
def native_side(served) -> int:
    manager = served[0].editkit_manager
    return manager.resolution(manager.pipeline("stylize"))[0]


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("EDITKIT_SCREENSHOT_DIR") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        playwright_api.expect.set_options(timeout=WAIT_MS)
        try:
            yield browser
        finally:
            playwright_api.expect.set_options(timeout=5_000)  # Playwright's default
            browser.close()


@pytest.fixture
def page(browser, url):
    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(WAIT_MS)
    try:
        page = context.new_page()
        page.goto(url, wait_until="domcontentloaded")
        playwright_api.expect(page.get_by_role("tab", name="Stylize")).to_be_visible(timeout=TIMEOUT_MS)
        yield page
    finally:
        context.close()


def _open_tab(page, name: str, tab: str) -> None:
    page.get_by_role("tab", name=name).click()
    run = page.locator(f"#{tab}-run")
    playwright_api.expect(run).to_be_visible()
    box = run.bounding_box()
    assert box is not None and box["y"] + box["height"] <= VIEWPORT["height"], f"{tab}: Run needs scrolling: {box}"
    playwright_api.expect(page.locator(f"#{tab}-cancel")).to_be_visible()


def _set_steps(page, tab: str, steps: int) -> None:
    field = page.locator(f"#{tab}-steps input[type=number]")
    field.fill(str(steps))
    field.press("Enter")


def _run_and_check_result(page, tab: str, native_side: int, screenshots: Path) -> None:
    """Run the tab; the result is displayed >= MIN_DISPLAY_WIDTH px wide, the download is the true size."""
    expect = playwright_api.expect
    page.locator(f"#{tab}-run").click()
    result = page.locator(f"#{tab}-result img")
    expect(result).to_be_visible(timeout=TIMEOUT_MS)
    expect(page.locator(f"#{tab}-download")).to_contain_text("editkit-", timeout=TIMEOUT_MS)
    assert result.evaluate("img => img.complete && img.naturalWidth > 0")  # the picture really loaded
    box = result.bounding_box()
    assert box is not None and box["width"] >= MIN_DISPLAY_WIDTH, box
    href = page.locator(f"#{tab}-download a[href]").first.get_attribute("href")
    png = page.request.get(href if href.startswith("http") else page.url.rstrip("/") + href)
    assert png.ok
    assert Image.open(io.BytesIO(png.body())).size == (native_side, native_side)  # the true output, not enlarged
    messages = page.locator(f"#{tab}-messages textarea").input_value()
    assert "Error" not in messages and "/tmp" not in messages and "gradio" not in messages
    assert "Traceback" not in page.content()
    path = screenshots / f"{tab}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")


def test_stylize_tab(page, native_side, screenshots):
    expect = playwright_api.expect
    _open_tab(page, "Stylize", "stylize")
    page.locator("#stylize-content input[type=file]").set_input_files(str(EXAMPLES / "content.png"))
    expect(page.locator("#stylize-messages textarea")).to_have_value("Content image uploaded (128x128 px).")
    page.locator("#stylize-style input[type=file]").set_input_files(str(EXAMPLES / "style.png"))
    expect(page.locator("#stylize-content img")).to_be_visible(timeout=TIMEOUT_MS)
    expect(page.locator("#stylize-style img")).to_be_visible(timeout=TIMEOUT_MS)
    _set_steps(page, "stylize", 2)
    expect(page.locator("#stylize-result img")).to_have_count(0)
    _run_and_check_result(page, "stylize", native_side, screenshots)
    expect(page.locator("#stylize-messages textarea")).to_have_value("Done.")


def test_edit_tab_example_fills_image_mask_and_prompts(page, native_side, screenshots):
    expect = playwright_api.expect
    _open_tab(page, "Edit", "edit")
    page.locator("#edit-examples").get_by_text("a green triangle and a yellow square").first.click()
    expect(page.locator("#edit-source textarea")).to_have_value("a green triangle and a yellow square")
    expect(page.locator("#edit-target textarea")).to_have_value("a blue triangle and a yellow square")
    expect(page.locator("#edit-image img")).to_be_visible(timeout=TIMEOUT_MS)
    expect(page.locator("#edit-mask img")).to_be_visible(timeout=TIMEOUT_MS)
    _set_steps(page, "edit", 2)
    _run_and_check_result(page, "edit", native_side, screenshots)


def test_compose_tab_shows_the_report_as_a_table(page, native_side, screenshots):
    expect = playwright_api.expect
    _open_tab(page, "Compose", "compose")
    page.locator("#compose-examples").get_by_text("a red circle to the left of a blue square").first.click()
    expect(page.locator("#compose-prompt textarea")).to_have_value("a red circle to the left of a blue square")
    _set_steps(page, "compose", 2)
    _run_and_check_result(page, "compose", native_side, screenshots)
    table = page.locator("#compose-report")
    for header in ("constraint", "stage 1", "refined"):
        expect(table).to_contain_text(header)
    expect(table).to_contain_text("circle", timeout=TIMEOUT_MS)  # a row per constraint
    expect(table).to_contain_text("threshold")


def test_soft_tokens_tab_with_the_shipped_token_file(page, native_side, screenshots):
    expect = playwright_api.expect
    _open_tab(page, "Soft tokens", "tokens")
    page.locator("#tokens-examples").get_by_text("a red circle").first.click()
    expect(page.locator("#tokens-prompt textarea")).to_have_value("a red circle")
    expect(page.locator("#tokens-file")).to_contain_text("shapes-softrepa", timeout=TIMEOUT_MS)
    _set_steps(page, "tokens", 2)
    _run_and_check_result(page, "tokens", native_side, screenshots)


def test_errors_and_rejected_uploads_go_to_the_messages_box(page, tmp_path, screenshots):
    expect = playwright_api.expect
    _open_tab(page, "Stylize", "stylize")
    messages = page.locator("#stylize-messages textarea")
    page.locator("#stylize-run").click()  # nothing uploaded
    expect(messages).to_have_value("Error: upload a content image", timeout=TIMEOUT_MS)
    expect(page.locator("#stylize-result")).not_to_contain_text("Error")  # no error badge on the outputs
    expect(page.locator("#stylize-download")).not_to_contain_text("Error")

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not a png at all")
    page.locator("#stylize-content input[type=file]").set_input_files(str(broken))
    expect(messages).to_have_value(re.compile("^Rejected the content image"), timeout=TIMEOUT_MS)
    text = messages.input_value()
    assert "not an image" in text and str(tmp_path) not in text and "/tmp/" not in text
    expect(page.locator("#stylize-content img")).to_have_count(0)  # the rejected upload is cleared
    path = screenshots / "stylize-error.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")


def test_progress_names_the_phase_and_cancel_stops_the_run(page, served, monkeypatch):
    """The run's progress bar names its phase; Cancel drops the run. The run is held inside its third UNet call
    until Cancel has been clicked, so that a fast machine cannot finish it first."""
    expect = playwright_api.expect
    release, calls = threading.Event(), itertools.count()
    unet = served[0].editkit_manager.pipeline("stylize").unet  # shared by the app's pipelines
    forward = unet.forward

    def held_forward(*args, **kwargs):
        if next(calls) == 2:
            release.wait(TIMEOUT_MS / 1000)
        return forward(*args, **kwargs)

    monkeypatch.setattr(unet, "forward", held_forward)
    _open_tab(page, "Stylize", "stylize")
    page.locator("#stylize-content input[type=file]").set_input_files(str(EXAMPLES / "content.png"))
    page.locator("#stylize-style input[type=file]").set_input_files(str(EXAMPLES / "style.png"))
    expect(page.locator("#stylize-style img")).to_be_visible(timeout=TIMEOUT_MS)
    _set_steps(page, "stylize", 100)
    page.locator("#stylize-run").click()
    progress = page.locator("#stylize-result")  # the run's one progress bar sits on the result box
    phase = re.compile(r"(inverting content|inverting style|generating) - \d")
    try:
        expect(progress).to_contain_text(phase, timeout=TIMEOUT_MS)
        page.locator("#stylize-cancel").click()
        expect(page.locator("#stylize-messages textarea")).to_have_value("Cancelled.", timeout=TIMEOUT_MS)
    finally:
        release.set()  # the held call returns; the pipeline then sees the interrupt after its step
    expect(progress).not_to_contain_text(re.compile(r"\d+/100"), timeout=TIMEOUT_MS)
    expect(page.locator("#stylize-result img")).to_have_count(0)
    with served[0].editkit_manager.session():  # the worker thread has let go of the model: nothing left running
        pass
