"""The Gradio app end to end: a local server on a small saved model, driven by gradio_client."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "assets" / "examples"
SHAPES_MODEL = ROOT / "assets" / "models" / "shapes-sd"
ENDPOINTS = {"stylize", "edit", "compose", "generate_with_tokens"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _model_dir(sd15_dir: Path) -> Path:
    """The shipped shapes model when it is there (real images), else the tiny random SD 1.5 folder."""
    return SHAPES_MODEL if (SHAPES_MODEL / "model_index.json").is_file() else sd15_dir


@pytest.fixture(scope="module")
def server(sd15_dir, tmp_path_factory):
    from editkit.app import build_demo, launch_demo

    demo = build_demo(_model_dir(sd15_dir), device="cpu", output_dir=tmp_path_factory.mktemp("app-out"))
    assert not demo.editkit_manager.loaded  # building the page loads nothing
    port = _free_port()
    launch_demo(demo, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
    yield demo, f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def client(server, tmp_path_factory):
    return gradio_client.Client(
        server[1], verbose=False, analytics_enabled=False, download_files=str(tmp_path_factory.mktemp("dl"))
    )


@pytest.fixture(scope="module")
def token_file(server, tmp_path_factory) -> Path:
    """Random soft tokens (large, so they visibly change the output) for the served model's UNet."""
    import torch

    from editkit.softrepa import SoftTokens, default_sites, save_soft_tokens

    pipe = server[0].editkit_manager.pipeline("compose")
    width = pipe.unet.config.cross_attention_dim
    tokens = SoftTokens(torch.randn(2, width, generator=torch.Generator().manual_seed(0)), default_sites(pipe.unet))
    return save_soft_tokens(tokens, tmp_path_factory.mktemp("tokens") / "tokens.safetensors")


def _stylize(client, content: Path, style: Path, **overrides):
    args = {"gamma": 0.75, "tau": 1.5, "use_adain": True, "adain_strength": 0.6, "steps": 2, "mask": None, "seed": 0,
            "feature_timing": "inversion_step"}  # fmt: skip
    args.update(overrides)
    file = gradio_client.handle_file
    mask = file(str(args["mask"])) if args["mask"] else None
    return (
        file(str(content)),
        file(str(style)),
        args["gamma"],
        args["tau"],
        args["use_adain"],
        args["adain_strength"],
        args["steps"],
        mask,
        args["seed"],
        args["feature_timing"],
    )


def _edit(image: Path, seed: int = 0, mask: Path | None = None):
    file = gradio_client.handle_file
    masked = file(str(mask)) if mask else None
    return (file(str(image)), "a green triangle", "a blue triangle", "dual", 2, 7.5, masked, seed)


def _pixels(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def _metadata(path: str) -> dict:
    with Image.open(path) as image:
        return json.loads(image.text["editkit"])


def _expected_side(server) -> int:
    return server[0].editkit_manager.resolution(server[0].editkit_manager.pipeline("stylize"))[0]


def test_named_endpoints_are_exposed(server, client):
    names = {dep.get("api_name") for dep in server[0].config["dependencies"]}
    assert names >= ENDPOINTS
    api = client.view_api(print_info=False, return_format="dict")
    assert {f"/{name}" for name in ENDPOINTS} <= set(api["named_endpoints"])


def test_stylize_endpoint_returns_image_and_parameters(server, client):
    image, download, messages = client.predict(
        *_stylize(
            client, EXAMPLES / "content.png", EXAMPLES / "style.png", gamma=0.5, feature_timing="inverted_latent"
        ),
        api_name="/stylize",
    )
    side = _expected_side(server)
    assert Image.open(image).size == (side, side)
    assert _pixels(image).std() > 0  # a real picture, not a blank placeholder
    meta = _metadata(download)
    assert meta["command"] == "stylize" and meta["gamma"] == 0.5 and meta["num_inference_steps"] == 2
    assert meta["feature_timing"] == "inverted_latent"  # the app's timing control reaches the task
    assert np.array_equal(_pixels(download), _pixels(image))
    assert isinstance(messages, str)


def test_edit_endpoint_with_mask(server, client):
    image, download, _ = client.predict(*_edit(EXAMPLES / "edit.png", mask=EXAMPLES / "mask.png"), api_name="/edit")
    side = _expected_side(server)
    assert Image.open(image).size == (side, side)
    meta = _metadata(download)
    assert meta["command"] == "edit" and meta["target_prompt"] == "a blue triangle"
    assert meta["inputs"]["mask"]["file"].endswith(".png") and len(meta["inputs"]["mask"]["sha256"]) == 64
    assert "/" not in meta["inputs"]["image"]["file"]  # the upload's name, never the server's temporary path


def test_compose_endpoint_reports_constraints(server, client):
    image, download, _, report = client.predict(
        "a red circle and a blue square", "", True, 2, 7.5, 0, api_name="/compose"
    )
    side = _expected_side(server)
    assert Image.open(image).size == (side, side)
    assert {"constraints", "before_refinement", "after_refinement", "chosen"} <= set(report)
    described = {row["constraint"] for row in report["before_refinement"]}
    assert {"circle", "square"} <= described
    verifier = "shapes" if _model_dir(Path()) == SHAPES_MODEL else "attention"  # the detector for shapes-sd
    judged = {(row["verifier"], row["threshold"] is not None) for row in report["before_refinement"]}
    assert judged == {(verifier, True)}
    assert _metadata(download)["refine"] is True

    explicit = json.dumps({"entities": ["circle"]})
    _, _, _, report = client.predict("a red circle and a blue square", explicit, False, 2, 7.5, 0, api_name="/compose")
    assert report["constraints"]["entities"] == ["circle"] and report["after_refinement"] is None


def test_compose_endpoint_takes_stage_2_options(client):
    """The refiner and the rounds reach the run (its saved parameters say so); calls without them keep the defaults."""
    prompt = "a red circle and a blue square"
    _, download, _, report = client.predict(prompt, "", True, 2, 7.5, 0, "initno", 2, api_name="/compose")
    meta = _metadata(download)
    assert (meta["noise_refiner"], meta["noise_refinement_rounds"]) == ("initno", 2)
    assert report["before_refinement"] is not None
    _, download, _, _ = client.predict(prompt, "", True, 2, 7.5, 0, api_name="/compose")
    meta = _metadata(download)
    assert (meta["noise_refiner"], meta["noise_refinement_rounds"]) == ("single-step", 1)


def test_generate_with_tokens_uses_the_token_file(server, client, token_file):
    tokens = gradio_client.handle_file(str(token_file))
    with_tokens, download, _ = client.predict("a red circle", tokens, 1.0, 2, 7.5, 0, api_name="/generate_with_tokens")
    without, _, _ = client.predict("a red circle", tokens, 0.0, 2, 7.5, 0, api_name="/generate_with_tokens")
    side = _expected_side(server)
    assert Image.open(with_tokens).size == (side, side)
    assert not np.array_equal(_pixels(with_tokens), _pixels(without))  # strength 0 is the bare model
    meta = _metadata(download)
    assert meta["soft_token_strength"] == 1.0 and meta["inputs"]["soft_tokens"]["file"] == "tokens.safetensors"


def test_concurrent_requests_equal_sequential(client):
    """Two requests in flight at once on the shared UNet give exactly what they give one by one."""
    stylize_args = _stylize(client, EXAMPLES / "style.png", EXAMPLES / "content.png", seed=1)
    edit_args = _edit(EXAMPLES / "edit.png", seed=3)
    sequential = [
        client.predict(*stylize_args, api_name="/stylize")[0],
        client.predict(*edit_args, api_name="/edit")[0],
    ]
    jobs = [client.submit(*stylize_args, api_name="/stylize"), client.submit(*edit_args, api_name="/edit")]
    concurrent = [job.result(timeout=300)[0] for job in jobs]
    for one, other in zip(sequential, concurrent):
        assert np.array_equal(_pixels(one), _pixels(other))


def _error_message(client, *args, api_name: str) -> str:
    with pytest.raises(Exception) as caught:  # gradio_client raises AppError (or a transport error for uploads)
        client.predict(*args, api_name=api_name)
    return str(caught.value)


def test_bad_image_gives_a_message_not_a_traceback(client, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not a png at all")
    message = _error_message(client, *_stylize(client, bad, EXAMPLES / "style.png"), api_name="/stylize")
    assert "content image" in message and "not an image" in message
    assert "Traceback" not in message and str(tmp_path) not in message


def test_oversized_images_are_refused(client, tmp_path):
    huge = tmp_path / "huge.png"
    Image.new("RGB", (5000, 4000), "white").save(huge)  # 20 megapixels, a small file
    message = _error_message(client, *_stylize(client, EXAMPLES / "content.png", huge), api_name="/stylize")
    assert "over the limit" in message and "Traceback" not in message

    too_big = tmp_path / "big.png"
    with open(too_big, "wb") as handle:  # over the upload limit: gradio_client refuses it before sending
        handle.truncate(21 * 1024 * 1024)
    message = _error_message(client, *_stylize(client, too_big, EXAMPLES / "style.png"), api_name="/stylize")
    assert "maximum file size" in message and "Traceback" not in message


def test_server_refuses_uploads_over_the_limit(server):
    """The limit holds for any HTTP client, not only gradio_client: the upload route answers 413."""
    import httpx

    payload = {"files": ("big.png", b"\0" * (21 * 1024 * 1024), "image/png")}
    response = httpx.post(f"{server[1]}gradio_api/upload", files=payload, timeout=60)
    assert response.status_code == 413
    assert "Traceback" not in response.text


def _raw_call(url: str, api_name: str, data: list) -> str:
    """One call of the HTTP API with a hand-made payload (no gradio_client): the event stream's text."""
    import httpx

    event = httpx.post(f"{url}gradio_api/call/{api_name}", json={"data": data}, timeout=60).json()["event_id"]
    return httpx.get(f"{url}gradio_api/call/{api_name}/{event}", timeout=300).text


def _stylize_payload(content, style, mask=None) -> list:
    return [content, style, 0.75, 1.5, True, 0.6, 1, mask, 0, "inversion_step", "", "", 1.0]


def test_server_files_outside_the_upload_folder_are_refused(server, tmp_path, token_file):
    """Issue 15.1: an API request naming a server path (no FileData meta) is never read, and the
    message is the same whether the path is an image, missing, a folder or a symlink out of the cache."""
    import uuid

    from gradio.utils import get_upload_folder

    def gradio_upload_folder() -> Path:
        return Path(get_upload_folder())

    url = server[1]
    outside = tmp_path / "private.png"
    Image.open(EXAMPLES / "content.png").save(outside)
    assert not str(outside.resolve()).startswith(str(gradio_upload_folder().resolve()))
    link_folder = gradio_upload_folder() / f"editkit-test-{uuid.uuid4().hex}"
    link_folder.mkdir(parents=True)
    (link_folder / "escape.png").symlink_to(outside)
    try:
        upload = {"path": str(EXAMPLES / "content.png"), "meta": {"_type": "gradio.FileData"}}
        real = _raw_call(url, "stylize", _stylize_payload(upload, upload))
        assert "event: error" in real  # gradio itself vets records with meta (not an upload either)
        neutral = "file is not an upload of this app; please upload it again"
        for path in [outside, tmp_path / "missing.png", tmp_path, link_folder / "escape.png", "/etc/passwd"]:
            record = {"path": str(path)}
            calls = [
                ("stylize", _stylize_payload(record, record), "content image"),
                ("stylize", _stylize_payload(_upload_record(server), record), "style image"),
                ("stylize", _stylize_payload(_upload_record(server), _upload_record(server), record), "mask image"),
                ("edit", [record, "a", "b", "dual", 1, 7.5, None, 0], "input image"),
                ("edit", [_upload_record(server), "a", "b", "dual", 1, 7.5, record, 0], "mask image"),
                ("generate_with_tokens", ["a circle", record, 1.0, 1, 7.5, 0], None),
                ("generate_with_tokens", ["a circle", {"path": str(token_file)}, 1.0, 1, 7.5, 0], None),
            ]
            for api_name, data, label in calls:
                stream = _raw_call(url, api_name, data)
                assert "event: error" in stream and "event: complete" not in stream, (api_name, path)
                # gr.File insists on FileData meta itself (a generic error); the images get editkit's line
                assert label is None or f"the {label} {neutral}" in stream, (api_name, label, path, stream)
                assert str(tmp_path) not in stream and "not found" not in stream and "directory" not in stream
    finally:
        shutil.rmtree(link_folder)


def _upload_record(server) -> dict:
    """A FileData record of a real upload through the server's upload route (inside its cache)."""
    import httpx

    with open(EXAMPLES / "content.png", "rb") as handle:
        files = {"files": ("content.png", handle, "image/png")}
        path = httpx.post(f"{server[1]}gradio_api/upload", files=files, timeout=60).json()[0]
    return {"path": path, "meta": {"_type": "gradio.FileData"}}


def test_invalid_options_give_messages(client):
    message = _error_message(
        client, *_stylize(client, EXAMPLES / "content.png", EXAMPLES / "style.png", gamma=2.0), api_name="/stylize"
    )
    assert "gamma" in message and "between 0 and 1" in message
    message = _error_message(client, "a circle", "{not json", True, 2, 7.5, 0, api_name="/compose")
    assert "not valid JSON" in message


def test_unexpected_errors_are_generic(server, client, monkeypatch):
    from editkit.app.handlers import UNEXPECTED_ERROR

    manager = server[0].editkit_manager

    def broken(method):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(manager, "pipeline", broken)
    message = _error_message(
        client, *_stylize(client, EXAMPLES / "content.png", EXAMPLES / "style.png"), api_name="/stylize"
    )
    assert UNEXPECTED_ERROR in message and "secret internal detail" not in message


def test_app_launchers_load_no_model_and_document_an_example():
    import app

    assert isinstance(app.demo, gr.Blocks) and not app.demo.editkit_manager.loaded
    for command in ([sys.executable, "-m", "editkit.cli", "app", "--help"], [sys.executable, "app.py", "--help"]):
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "--model" in result.stdout and "--port" in result.stdout and "example:" in result.stdout


def test_tabs_share_one_model(server, client):
    manager = server[0].editkit_manager
    client.predict(*_edit(EXAMPLES / "edit.png"), api_name="/edit")  # loads (or reuses) the base model
    pipes = [manager.pipeline(name) for name in ENDPOINTS]
    assert len({id(pipe.unet) for pipe in pipes}) == 1 and len({id(pipe.vae) for pipe in pipes}) == 1
    names = {type(pipe).__name__ for pipe in pipes}  # soft tokens ride on the family's plain pipeline, like the CLI
    assert names == {"StyleTransferPipeline", "ContrastiveEditPipeline", "ComposePipeline", "StableDiffusionPipeline"}
