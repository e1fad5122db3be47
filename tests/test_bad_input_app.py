"""The bad-input matrix through the app's handlers (called directly, no server): messages, never tracebacks.

Each endpoint turns a user mistake into a ``gr.Error`` with one specific line that names the
input by its label (never the server's temporary path); awkward images work; out-of-memory
becomes advice; downloads are pruned and the handlers' own temporary folder is removed.
"""

from __future__ import annotations

import gc
import json

import bad_inputs as bad
import pytest
import torch
from PIL import Image

gr = pytest.importorskip("gradio")

from editkit.app.handlers import KEPT_OUTPUTS, Handlers  # noqa: E402
from editkit.app.models import ModelManager  # noqa: E402


@pytest.fixture(scope="module")
def handlers(sd15_dir, tmp_path_factory):
    uploads = [tmp_path_factory.getbasetemp()]  # the tests' files stand in for gradio's upload folder
    return Handlers(ModelManager(sd15_dir, device="cpu"), tmp_path_factory.mktemp("app-out"), upload_folders=uploads)


def _stylize(handlers, content, style, **overrides):
    args = {"gamma": 0.75, "tau": 1.5, "use_adain": True, "adain_strength": 0.6, "steps": 1, "mask": None, "seed": 0}
    args.update(overrides)
    return handlers.stylize(content, style, *args.values())


def _edit(handlers, image, **overrides):
    args = {"source": "a cat", "target": "a dog", "contrast": "dual", "steps": 1, "guidance": 7.5, "mask": None}
    args.update(overrides)
    return handlers.edit(image, *args.values(), 0)


def _message(call) -> str:
    with pytest.raises(gr.Error) as caught:
        call()
    message = str(caught.value.message)
    assert "Traceback" not in message and "\n" not in message
    return message


@pytest.mark.parametrize("case", list(bad.BAD_IMAGES))
def test_bad_uploads_are_messages_naming_the_input(handlers, tmp_path, case):
    build, fragment = bad.BAD_IMAGES[case]
    path = build(tmp_path)
    good = {"path": str(bad.good_image(tmp_path))}
    for call, label in [
        (lambda: _stylize(handlers, {"path": str(path)}, good), "content image"),
        (lambda: _stylize(handlers, good, {"path": str(path)}), "style image"),
        (lambda: _edit(handlers, {"path": str(path)}), "input image"),
    ]:
        message = _message(call)
        assert fragment in message and label in message and str(tmp_path) not in message


@pytest.mark.parametrize("case", list(bad.AWKWARD_IMAGES))
def test_awkward_uploads_work(handlers, tmp_path, case):
    path = {"path": str(bad.AWKWARD_IMAGES[case](tmp_path))}
    image, download, messages = _stylize(handlers, path, path)
    assert image.mode == "RGB" and download.endswith(".png")
    assert ("using the first" in messages) == (case == "animated GIF")


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda h, good: _stylize(h, good, good, gamma="nan"), "gamma"),
        (lambda h, good: _stylize(h, good, good, tau=float("inf")), "tau"),
        (lambda h, good: _stylize(h, good, good, steps=0), "steps"),
        (lambda h, good: _stylize(h, good, good, steps=2.5), "whole number"),
        (lambda h, good: _stylize(h, None, good), "upload a content image"),
        (lambda h, good: _edit(h, good, target="   "), "enter a target prompt"),
        (lambda h, good: _edit(h, good, guidance="abc"), "must be a number"),
        (lambda h, good: h.compose("", "", False, 2, 7.5, 0), "enter a prompt"),
        (lambda h, good: h.compose("a car", "[1, 2]", False, 2, 7.5, 0), "JSON object"),
        (lambda h, good: h.compose("a car", "", False, 2, float("nan"), 0), "guidance scale"),
        (lambda h, good: h.generate_with_tokens("a car", None, 1.0, 2, 7.5, 0), "soft-token file"),
        (lambda h, good: h.compose("a car", "[" * 8000 + "]" * 8000, False, 2, 7.5, 0), "nested too deeply"),
        (lambda h, good: h.compose("a car", _nested_dict(), False, 2, 7.5, 0), "nested too deeply"),
        (lambda h, good: h.compose("a car", " " + "x" * 20_000, False, 2, 7.5, 0), "at most 16384"),
        (lambda h, good: h.compose("a car", '{"entities": ["car"]}', "maybe", 2, 7.5, 0), "refine must be"),
        (lambda h, good: _stylize(h, good, good, use_adain="perhaps"), "use AdaIN must be"),
        (lambda h, good: h.compose("a car", "", True, 2, 7.5, 0, "adam", 1), "noise refiner must be one of"),
        (lambda h, good: h.compose("a car", "", True, 2, 7.5, 0, "initno", 0), "noise refinement rounds must be"),
        (lambda h, good: h.compose("a car", "", True, 2, 7.5, 0, "initno", 10**9), "between 1 and 10"),
    ],
    ids=[
        "gamma-nan", "tau-inf", "steps-0", "steps-fraction", "no-content", "empty-target", "guidance-text",
        "empty-prompt", "constraints-not-object", "guidance-nan", "no-token-file", "constraints-100k-deep",
        "constraints-dict-deep", "constraints-20k-chars", "refine-not-a-flag", "adain-not-a-flag",
        "noise-refiner-unknown", "rounds-0", "rounds-1e9",
    ],
)  # fmt: skip
def test_bad_options_are_messages(handlers, tmp_path, call, fragment):
    good = {"path": str(bad.good_image(tmp_path))}
    assert fragment in _message(lambda: call(handlers, good))


def _nested_dict(depth: int = 5000) -> dict:
    """An API payload nested ``depth`` deep (gradio hands the JSON value over as it is)."""
    value: dict = {}
    for _ in range(depth):
        value = {"entities": value}
    return value


@pytest.mark.parametrize(("refine", "refined"), [("no", False), ("false", False), ("yes", True), (0, False)])
def test_refine_flags_from_the_api_mean_what_they_say(handlers, refine, refined):
    """Issue 15.13: the string "no" used to count as true."""
    _, download, _, report = handlers.compose("a red car", "", refine, 1, 7.5, 0)
    assert refined or report["after_refinement"] is None  # no verification, no refinement
    with Image.open(download) as image:
        assert json.loads(image.text["editkit"])["refine"] is refined


def test_duplicate_constraints_in_the_app_count_once(handlers):
    """Issue 15.2: 300 copies of one entity (they held the shared model for 28 s) are one constraint."""
    constraints = json.dumps({"entities": ["car"] * 300})
    _, _, _, report = handlers.compose("a red car", constraints, False, 1, 7.5, 0)
    assert report["constraints"]["entities"] == ["car"]


@pytest.mark.parametrize(
    ("build", "fragment"),
    [
        (lambda folder: bad.corrupt_file(folder, "t.safetensors"), "not a readable safetensors"),
        (lambda folder: bad.pickle_file(folder, "t.safetensors"), "is a pickle"),
        (lambda folder: bad.foreign_safetensors(folder, "t.safetensors"), "not an editkit SoftREPA token file"),
    ],
    ids=["corrupt", "pickle", "foreign"],
)
def test_bad_token_files_are_messages(handlers, tmp_path, build, fragment):
    path = build(tmp_path)
    message = _message(lambda: handlers.generate_with_tokens("a car", {"path": str(path)}, 1.0, 1, 7.5, 0))
    assert fragment in message and str(tmp_path) not in message and "the token file" in message


def test_token_file_of_another_family_is_refused_before_the_model_loads(sd15_dir, sd15_pipe, tmp_path):
    from editkit.softrepa import SoftTokens, default_sites, save_soft_tokens

    tokens = SoftTokens(torch.randn(2, 16), default_sites(sd15_pipe.unet), base_model="tiny-xl", family="sdxl")
    path = save_soft_tokens(tokens, tmp_path / "xl.safetensors")
    manager = ModelManager(sd15_dir, device="cpu")
    own = Handlers(manager, tmp_path / "out", upload_folders=[tmp_path])
    size, error = own.check_upload({"path": str(path)}, "soft-token", kind="tokens")
    assert size is None and "trained on a sdxl model (tiny-xl) do not apply to this sd model" in error
    assert "the soft-token file" in error and str(tmp_path) not in error
    message = _message(lambda: own.generate_with_tokens("a car", {"path": str(path)}, 1.0, 1, 7.5, 0))
    assert "do not apply to this sd model" in message and "the token file" in message
    assert not manager.loaded  # refused from the model's index


def test_masks_empty_other_size_and_unreadable(handlers, tmp_path):
    good = {"path": str(bad.good_image(tmp_path, size=(80, 64)))}
    _, _, messages = _stylize(handlers, good, good, mask={"path": str(bad.mask(tmp_path, "other size"))})
    assert "resized" in messages
    message = _message(lambda: _stylize(handlers, good, good, mask={"path": str(bad.text_named_png(tmp_path))}))
    assert "mask image" in message and "not an image" in message


def test_out_of_memory_is_advice_not_a_traceback(handlers, tmp_path, monkeypatch):
    def oom(method):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(handlers.manager, "pipeline", oom)
    message = _message(lambda: handlers.compose("a car", "", False, 2, 7.5, 0))
    # the demo's own terms, not CLI flags the user of a web page cannot pass
    assert "out of memory" in message and "smaller image" in message and "--size" not in message


def test_downloads_are_pruned_and_the_temporary_folder_removed(sd15_dir, tmp_path, monkeypatch):
    from PIL import Image

    import editkit.app.handlers as module

    monkeypatch.setattr(module, "KEPT_OUTPUTS", 3)
    own = Handlers(ModelManager(sd15_dir, device="cpu"))  # no output_dir: a temporary folder of its own
    folder = own.output_dir
    for seed in range(5):
        own._save(Image.new("RGB", (8, 8)), "compose", {"seed": seed})
    assert len(list(folder.glob("editkit-*.png"))) == 3 and KEPT_OUTPUTS >= 32
    del own
    gc.collect()
    assert not folder.exists()


def _every_file_input(handlers, record, good):
    """(call, label) for each file input of the four endpoints, given ``record`` there."""
    return [
        (lambda: _stylize(handlers, record, good), "content image"),
        (lambda: _stylize(handlers, good, record), "style image"),
        (lambda: _stylize(handlers, good, good, mask=record), "mask image"),
        (lambda: _edit(handlers, record), "input image"),
        (lambda: _edit(handlers, good, mask=record), "mask image"),
        (lambda: handlers.generate_with_tokens("a car", record, 1.0, 1, 7.5, 0), "soft-token"),
        (lambda: handlers.generate_with_tokens("a car", record["path"], 1.0, 1, 7.5, 0), "soft-token"),
    ]


def test_files_outside_the_upload_folders_get_one_neutral_message(sd15_dir, tmp_path):
    """Issue 15.1: every file input (images, masks, the token file) must lie in the upload folders;
    a server path, a missing one, a folder or a symlink out of them all read the same."""
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    own = Handlers(ModelManager(sd15_dir, device="cpu"), tmp_path / "out", upload_folders=[uploads])
    good = {"path": str(bad.good_image(uploads))}
    private = bad.good_image(tmp_path, "private.png")
    (uploads / "escape.png").symlink_to(private)
    neutral = "file is not an upload of this app; please upload it again"
    for path in [private, bad.missing(tmp_path), bad.directory(tmp_path), uploads / "escape.png", uploads]:
        for call, label in _every_file_input(own, {"path": str(path)}, good):
            assert _message(call) == f"the {label} {neutral}"
    assert not own.manager.loaded  # refused before the model loads
