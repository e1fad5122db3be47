"""The app under load: 20 concurrent requests on a loopback server equal the sequential results.

The cheapest endpoint (compose, 2 steps, no refinement, on the tiny random model) keeps the test
bounded; every request's result must equal the sequential run of the same inputs bit for bit, no
response may carry a traceback, the output folder keeps only finished files, and the server
serves its own outputs but no other file (no path traversal).
"""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")
httpx = pytest.importorskip("httpx")

REQUESTS = 20
SEEDS = 5  # distinct inputs; each is sent 4 times among the 20 concurrent requests


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(sd15_dir, tmp_path_factory):
    from editkit.app import build_demo, launch_demo

    output_dir = tmp_path_factory.mktemp("app-load-out")
    demo = build_demo(sd15_dir, device="cpu", output_dir=output_dir)
    port = _free_port()
    launch_demo(demo, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{port}/"
    client = gradio_client.Client(
        url, verbose=False, analytics_enabled=False, download_files=str(tmp_path_factory.mktemp("dl"))
    )
    yield url, client, output_dir
    demo.close()


def _compose(client, seed: int):
    return client.submit(f"a red car and a blue bird {seed}", "", False, 2, 7.5, seed, api_name="/compose")


def _pixels(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_concurrent_requests_equal_sequential_runs(served):
    _, client, output_dir = served
    sequential = {seed: _pixels(_compose(client, seed).result(timeout=120)[0]) for seed in range(SEEDS)}
    seeds = [i % SEEDS for i in range(REQUESTS)]
    with ThreadPoolExecutor(max_workers=REQUESTS) as pool:  # 20 requests in flight at once
        jobs = list(pool.map(lambda seed: (seed, _compose(client, seed)), seeds))
        results = [(seed, job.result(timeout=240)) for seed, job in jobs]
    assert len(results) == REQUESTS
    for seed, (image, download, messages, report) in results:
        assert np.array_equal(_pixels(image), sequential[seed])
        assert "Traceback" not in messages and "Traceback" not in str(report)
        assert _pixels(download).shape == sequential[seed].shape
    kept = list(output_dir.iterdir())
    assert len(kept) == SEEDS + REQUESTS and all(p.suffix == ".png" and ".tmp" not in p.name for p in kept)


def test_errors_under_load_are_messages(served):
    _, client, _ = served
    jobs = [client.submit("", "", False, 2, 7.5, 0, api_name="/compose") for _ in range(5)]
    for job in jobs:
        with pytest.raises(Exception) as caught:
            job.result(timeout=60)
        assert "enter a prompt" in str(caught.value) and "Traceback" not in str(caught.value)


def test_served_files_are_only_the_apps_outputs(served, tmp_path):
    url, client, output_dir = served
    download = _compose(client, 0).result(timeout=120)[1]
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the web")
    outside = [
        "/etc/passwd",
        str(secret),
        f"{output_dir}/../{secret.parent.name}/secret.txt",
        str(output_dir / ".." / ".." / "etc" / "passwd"),
        "../../../../etc/passwd",
    ]
    for path in outside:
        for route in ("gradio_api/file=", "file="):
            response = httpx.get(f"{url}{route}{quote(path)}", timeout=30)
            assert response.status_code in (403, 404), (route, path, response.status_code)
            assert "not for the web" not in response.text and "root:" not in response.text
    assert _pixels(download).size  # the app's own (cached) result was served to the client
    # positive control: the same route serves a file in gradio's cache (so the 403/404s above mean something)
    uploaded = httpx.post(f"{url}gradio_api/upload", files={"files": ("a.txt", b"hello", "text/plain")}, timeout=30)
    server_path = uploaded.json()[0]
    response = httpx.get(f"{url}gradio_api/file={quote(server_path)}", timeout=30)
    assert response.status_code == 200 and response.text == "hello"
