"""The bad-input matrix through the ``editkit`` CLI: every user mistake is exit code 2 and one line.

Each case checks the exit code, a specific message on one ``editkit: error:`` line (or argparse's
usage error), no traceback, and that no output (and no temporary file) was written. Awkward but
valid inputs (16-bit, CMYK, palette, alpha, animated GIF, full masks, non-ASCII prompts) must work.
"""

from __future__ import annotations

import errno
import json
from dataclasses import dataclass
from pathlib import Path

import bad_inputs as bad
import pytest
import torch
from PIL import Image

from editkit.cli import main

FAST = {
    "stylize": ["--steps", "1", "--size", "32", "--device", "cpu"],
    "edit": ["--steps", "1", "--device", "cpu"],
    "compose": ["--steps", "1", "--size", "32", "--no-refine", "--device", "cpu"],
    "generate": ["--steps", "1", "--size", "32", "--device", "cpu"],
}


@dataclass
class Context:
    folder: Path
    model: Path
    content: Path
    style: Path
    tokens: Path
    out: Path

    def argv(self, command: str, *, image: Path | None = None, model: Path | None = None, extra=(), out=None):
        """A complete, valid command line; ``image`` replaces its (first) input image."""
        model = ["--model", str(model or self.model)]
        output = ["-o", str(out or self.out)]
        if command == "stylize":
            head = ["stylize", str(image or self.content), str(self.style)]
        elif command == "edit":
            head = ["edit", str(image or self.content), "--source-prompt", "a cat", "--target-prompt", "a dog"]
        elif command == "compose":
            head = ["compose", "a red car and a blue bird"]
        else:
            head = ["softrepa", "generate", "a red car", "--soft-tokens", str(self.tokens)]
        return [*head, *output, *model, *FAST[command], *map(str, extra)]


@pytest.fixture(scope="module")
def token_file(sd15_pipe, tmp_path_factory) -> Path:
    from editkit.softrepa import SoftTokens, default_sites, save_soft_tokens

    width = sd15_pipe.unet.config.cross_attention_dim
    tokens = SoftTokens(torch.randn(2, width), default_sites(sd15_pipe.unet))
    return save_soft_tokens(tokens, tmp_path_factory.mktemp("tokens") / "tokens.safetensors")


@pytest.fixture
def ctx(tmp_path, sd15_dir, token_file) -> Context:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    content = bad.good_image(inputs, "content.png", (80, 64))
    style = bad.good_image(inputs, "style.png", (32, 32), seed=1)
    return Context(inputs, sd15_dir, content, style, token_file, tmp_path / "out" / "result.png")


def run_cli(capsys, argv) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse usage errors
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_user_error(result, fragment: str, out: Path) -> str:
    """Exit 2, one specific error line, no traceback, no output or temporary file left."""
    code, _, err = result
    assert code == 2, err[-2000:]
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("editkit: error:")]
    assert len(lines) == 1 or "usage:" in err, err[-2000:]
    assert fragment.lower() in err.lower(), err[-2000:]
    assert not out.exists()
    leftovers = [p for p in out.parent.glob(".*tmp*")] if out.parent.exists() else []
    assert leftovers == []
    return err


def assert_success(result, out: Path) -> str:
    code, _, err = result
    assert code == 0, err[-3000:]
    assert "Traceback" not in err
    with Image.open(out) as image:
        assert image.mode == "RGB" and min(image.size) >= 8
    return err


# -- images ---------------------------------------------------------------------------------------
IMAGE_COMMANDS = ["stylize", "edit"]


@pytest.mark.parametrize("command", IMAGE_COMMANDS)
@pytest.mark.parametrize("case", list(bad.BAD_IMAGES))
def test_bad_images_exit_2(capsys, ctx, command, case):
    build, fragment = bad.BAD_IMAGES[case]
    if command == "stylize" and case == "directory as file":
        fragment = "contains no images"  # stylize takes folders of images
    result = run_cli(capsys, ctx.argv(command, image=build(ctx.folder)))
    assert_user_error(result, fragment, ctx.out)


@pytest.mark.parametrize("case", list(bad.BAD_IMAGES))
def test_bad_style_images_exit_2(capsys, ctx, case):
    build, fragment = bad.BAD_IMAGES[case]
    fragment = "contains no images" if case == "directory as file" else fragment
    argv = ["stylize", ctx.content, build(ctx.folder), "-o", ctx.out, "--model", ctx.model, *FAST["stylize"]]
    assert_user_error(run_cli(capsys, argv), fragment, ctx.out)


@pytest.mark.parametrize("command", IMAGE_COMMANDS)
@pytest.mark.parametrize("case", list(bad.AWKWARD_IMAGES))
def test_awkward_images_work(capsys, ctx, command, case):
    err = assert_success(run_cli(capsys, ctx.argv(command, image=bad.AWKWARD_IMAGES[case](ctx.folder))), ctx.out)
    if case == "animated GIF":
        assert "using the first" in err


# -- masks ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("command", "kind", "fragment"),
    [
        ("stylize", "empty", "is empty"),
        ("edit", "empty", "is empty"),
        ("edit", "other aspect", "but the image is 80x64"),
        ("stylize", "other aspect", "but the image is 80x64"),
    ],
)
def test_bad_masks_exit_2(capsys, ctx, command, kind, fragment):
    mask = bad.mask(ctx.folder, kind, (80, 64))
    assert_user_error(run_cli(capsys, ctx.argv(command, extra=["--mask", mask])), fragment, ctx.out)


@pytest.mark.parametrize(
    ("command", "kind"), [("stylize", "full"), ("stylize", "other size"), ("edit", "full"), ("edit", "other size")]
)
def test_full_and_resized_masks_work(capsys, caplog, ctx, command, kind):
    mask = bad.mask(ctx.folder, kind, (80, 64))
    err = assert_success(run_cli(capsys, ctx.argv(command, extra=["--mask", mask])), ctx.out)
    if kind == "other size":  # a warning line (stylize logs it; pytest's log capture holds it here)
        assert "resized" in err + caplog.text


@pytest.mark.parametrize("command", IMAGE_COMMANDS)
@pytest.mark.parametrize("case", ["missing file", "text file named .png", "decompression bomb"])
def test_bad_mask_files_exit_2(capsys, ctx, command, case):
    build, fragment = bad.BAD_IMAGES[case]
    assert_user_error(run_cli(capsys, ctx.argv(command, extra=["--mask", build(ctx.folder)])), fragment, ctx.out)


# -- prompts --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["compose", "   "], "prompt is empty"),
        (["edit", "IMAGE", "--source-prompt", "", "--target-prompt", "a dog"], "--source-prompt is empty"),
        (["edit", "IMAGE", "--source-prompt", "a cat", "--target-prompt", " \t"], "--target-prompt is empty"),
        (["compose", "a car " * 3000], "over the limit"),
    ],
    ids=["compose-empty", "edit-empty-source", "edit-empty-target", "compose-absurdly-long"],
)
def test_bad_prompts_exit_2(capsys, ctx, argv, fragment):
    argv = [ctx.content if a == "IMAGE" else a for a in argv]
    command = argv[0]
    result = run_cli(capsys, [*argv, "-o", ctx.out, "--model", ctx.model, *FAST[command]])
    assert_user_error(result, fragment, ctx.out)


@pytest.mark.parametrize(
    ("prompt", "note"),
    [
        ("a red car and " + "a small tree, " * 10 + "a blue bird", "truncated"),
        ("ein rotes Auto und ein blauer Vogel, 赤い車 🚗", None),
        ("a red car\x00 and a\x1b[31m blue bird\x07", "control characters"),
    ],
    ids=["very-long", "non-ascii", "control-characters"],
)
def test_long_non_ascii_and_control_prompts_work(capsys, ctx, prompt, note):
    result = run_cli(capsys, ["compose", prompt, "-o", ctx.out, "--model", ctx.model, *FAST["compose"]])
    assert_success(result, ctx.out)
    if note:
        assert note in result[1] + result[2]


# -- numeric options ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("command", "extra", "fragment"),
    [
        ("stylize", ["--gamma", "1.5"], "between 0 and 1"),
        ("stylize", ["--gamma", "nan"], "not a finite number"),
        ("stylize", ["--tau", "-1"], "greater than 0"),
        ("stylize", ["--tau", "inf"], "not a finite number"),
        ("stylize", ["--steps", "0"], "at least 1"),
        ("stylize", ["--size", "abc"], "a number of pixels or WIDTHxHEIGHT"),
        ("stylize", ["--seed", "-3"], "at least 0"),
        ("edit", ["--guidance-scale", "nan"], "not a finite number"),
        ("edit", ["--steps", "0"], "at least 1"),
        ("edit", ["--learning-rate", "-0.1"], "--learning-rate"),
        ("edit", ["--contrast-weight", "nan"], "not a finite number"),
        ("compose", ["--guidance-scale", "NaN"], "not a finite number"),
        ("compose", ["--guidance-scale", "1e9"], "between 0 and 50"),
        ("compose", ["--size", "0x64"], "WIDTHxHEIGHT"),
        ("compose", ["--max-iter-to-alter", "5"], "exceeds the steps"),
        ("generate", ["--soft-token-strength", "nan"], "not a finite number"),
        ("generate", ["--steps", "-1"], "at least 1"),
    ],
)
def test_bad_numbers_exit_2(capsys, ctx, command, extra, fragment):
    assert_user_error(run_cli(capsys, ctx.argv(command, extra=extra)), fragment, ctx.out)


# -- models ---------------------------------------------------------------------------------------
MODEL_CASES = {
    "not a diffusers folder": (bad.not_a_diffusers_folder, "no model_index.json"),
    "unsupported family": (bad.unet_less_pipeline, "unsupported model family"),
    "missing path": (lambda folder: folder / "no-such-model", "no such model"),
    "pickle checkpoint": (lambda folder: bad.pickle_file(folder, "model.ckpt"), "only .safetensors"),
    "pickle named .safetensors": (lambda folder: bad.pickle_file(folder, "model.safetensors"), "is a pickle"),
}


@pytest.mark.parametrize("command", ["stylize", "edit", "compose", "generate"])
@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_bad_models_exit_2(capsys, ctx, command, case):
    build, fragment = MODEL_CASES[case]
    assert_user_error(run_cli(capsys, ctx.argv(command, model=build(ctx.folder))), fragment, ctx.out)


# -- token files and style caches -----------------------------------------------------------------
def _foreign_tokens(folder: Path, sd15_pipe) -> Path:
    from editkit.softrepa import SoftTokens, default_sites, save_soft_tokens

    tokens = SoftTokens(torch.randn(2, 7), default_sites(sd15_pipe.unet), base_model="another/model")
    return save_soft_tokens(tokens, folder / "foreign.safetensors")


TOKEN_CASES = {
    "corrupt": (lambda folder, ctx, pipe: bad.corrupt_file(folder, "bad.safetensors"), "not a readable safetensors"),
    "truncated": (lambda folder, ctx, pipe: bad.truncated_copy(ctx.tokens, folder), "not a readable safetensors"),
    "another model": (lambda folder, ctx, pipe: _foreign_tokens(folder, pipe), "do not fit this model"),
    "pickle": (lambda folder, ctx, pipe: bad.pickle_file(folder, "tokens.safetensors"), "is a pickle"),
    "foreign safetensors": (
        lambda folder, ctx, pipe: bad.foreign_safetensors(folder, "other.safetensors"),
        "not an editkit SoftREPA token file",
    ),
}


def _crafted_tokens(metadata=None, drop=(), tensors=None):
    """A builder of a copy of the valid token file with fields or tensors changed."""
    return lambda folder, ctx, pipe: bad.rewritten_safetensors(
        ctx.tokens, folder, "crafted.safetensors", metadata=metadata, drop=drop, tensors=tensors
    )


def _scaled_tokens(value: float):
    tokens = torch.randn(2, 16)
    tokens[0, 0] = value
    return _crafted_tokens(tensors={"tokens": tokens})


# Crafted token files (issue 15, items 9 and 10): every field and tensor is checked on load, in
# one function shared by every command, so two commands cover them.
CRAFTED_TOKEN_CASES = {
    "non-numeric num_tokens": (_crafted_tokens({"num_tokens": "four"}), "'num_tokens' is not a whole number"),
    "missing token_width": (_crafted_tokens({"token_width": None}), "'token_width' is missing"),
    "sites not a list": (_crafted_tokens({"sites": '"down_blocks"'}), "'sites' has the wrong type"),
    "sites nested 20,000 deep": (_crafted_tokens({"sites": "[" * 20000 + "]" * 20000}), "nested too deeply"),
    "sites with 1e400": (_crafted_tokens({"sites": "[1e400]"}), "'sites' is not valid JSON"),
    "zero timesteps": (_crafted_tokens({"num_train_timesteps": "0"}), "must be at least 1"),
    "version 99": (_crafted_tokens({"format_version": "99"}), "format version 99"),
    "NaN tokens": (_scaled_tokens(float("nan")), "NaN or infinite"),
    "Inf tokens": (_scaled_tokens(float("inf")), "NaN or infinite"),
    "1e30 tokens": (_scaled_tokens(1e30), "values beyond"),
    "tokens of another count": (_crafted_tokens(tensors={"tokens": torch.zeros(3, 16)}), "has shape (3, 16)"),
    "time embedding of the wrong shape": (
        _crafted_tokens({"time_buckets": "10"}, tensors={"time_embedding": torch.zeros(10, 3)}),
        "'time_embedding' has shape (10, 3), expected (10, 16)",
    ),
    "unexpected tensor": (_crafted_tokens(tensors={"extra": torch.zeros(1)}), "unexpected tensor"),
    "header is a JSON list": (lambda f, c, p: bad.raw_safetensors(f, "l.safetensors", b"[]"), "not a readable"),
    "header nested 20,000 deep": (
        lambda f, c, p: bad.raw_safetensors(f, "d.safetensors", b"{" + b'"a":{' * 20000 + b"}" * 20001),
        "not a readable",
    ),
}


def _check_token_case(capsys, ctx, sd15_pipe, command, build, fragment):
    path = build(ctx.folder, ctx, sd15_pipe)
    argv = ctx.argv(command, extra=[] if command == "generate" else ["--soft-tokens", path])
    if command == "generate":
        argv[argv.index(str(ctx.tokens))] = str(path)
    assert_user_error(run_cli(capsys, argv), fragment, ctx.out)


@pytest.mark.parametrize("command", ["stylize", "edit", "compose", "generate"])
@pytest.mark.parametrize("case", list(TOKEN_CASES))
def test_bad_token_files_exit_2(capsys, ctx, sd15_pipe, command, case):
    _check_token_case(capsys, ctx, sd15_pipe, command, *TOKEN_CASES[case])


@pytest.mark.parametrize("command", ["stylize", "generate"])
@pytest.mark.parametrize("case", list(CRAFTED_TOKEN_CASES))
def test_crafted_token_files_exit_2(capsys, ctx, sd15_pipe, command, case):
    _check_token_case(capsys, ctx, sd15_pipe, command, *CRAFTED_TOKEN_CASES[case])


def _style_cache(folder: Path, model: str = "0" * 16) -> Path:
    from editkit.style import StyleCache

    cache = StyleCache(
        kind="style", features={}, final_latent=torch.zeros(1, 4, 4, 4), model=model, size=(32, 32),
        num_inference_steps=1, resample_steps=0, sites=(), timesteps=(), model_name="another/model",
    )  # fmt: skip
    return cache.save(folder / "cache.safetensors")


CACHE_CASES = {
    "corrupt": (lambda folder: bad.corrupt_file(folder, "cache.safetensors"), "not a readable safetensors"),
    "truncated": (lambda folder: bad.truncated_copy(_style_cache(folder), folder), "not a readable safetensors"),
    "another model": (_style_cache, "made with another model"),
    "pickle": (lambda folder: bad.pickle_file(folder, "cache.safetensors"), "is a pickle"),
    "foreign safetensors": (lambda folder: bad.foreign_safetensors(folder, "c.safetensors"), "not an editkit style"),
    "missing": (lambda folder: folder / "nothing.safetensors", "not found"),
}


@pytest.mark.parametrize("case", list(CACHE_CASES))
def test_bad_style_caches_exit_2(capsys, ctx, case):
    build, fragment = CACHE_CASES[case]
    argv = ["stylize", ctx.content, "--style-cache", build(ctx.folder), "-o", ctx.out, "--model", ctx.model]
    assert_user_error(run_cli(capsys, [*argv, *FAST["stylize"]]), fragment, ctx.out)


@pytest.mark.parametrize("case", list(bad.CRAFTED_CACHES))
def test_crafted_style_caches_exit_2(capsys, ctx, monkeypatch, case):
    """Issue 15.9: every header field and tensor shape is checked when the cache is read."""
    build, fragment = bad.CRAFTED_CACHES[case]
    monkeypatch.setattr("editkit.models.load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    argv = ["stylize", ctx.content, "--style-cache", build(ctx.folder), "-o", ctx.out, "--model", ctx.model]
    assert_user_error(run_cli(capsys, [*argv, *FAST["stylize"]]), fragment, ctx.out)


def _many_words(count: int) -> str:
    return " ".join("w" + "".join(chr(97 + (i // 26**k) % 26) for k in range(3)) for i in range(count))


CONSTRAINT_CASES = {
    "nested 100k deep": (lambda prompt: bad.DEEP_JSON, "nested too deeply"),
    "Infinity": (lambda prompt: '{"entities": [Infinity]}', "not a finite number"),
    "too many distinct": (
        lambda prompt: json.dumps({"entities": prompt.split()[:70]}),
        "at most 64",
    ),
    "too many entries": (lambda prompt: json.dumps({"entities": ["waaa"] * 5000}), "at most 1024"),
}


@pytest.mark.parametrize("case", list(CONSTRAINT_CASES))
def test_bad_constraint_files_exit_2(capsys, ctx, monkeypatch, case):
    """Issue 15.2: nesting, size and count are bounded before any model work."""
    write, fragment = CONSTRAINT_CASES[case]
    prompt = _many_words(80)
    path = ctx.folder / "constraints.json"
    path.write_text(write(prompt))
    argv = ["compose", prompt, "--constraints", path, "-o", ctx.out, "--model", ctx.model, *FAST["compose"]]
    assert_user_error(run_cli(capsys, argv), fragment, ctx.out)


def test_a_folder_as_constraints_is_not_called_missing(capsys, ctx):
    """Issue 15.13."""
    argv = ["compose", "a car", "--constraints", ctx.folder, "-o", ctx.out, "--model", ctx.model, *FAST["compose"]]
    err = assert_user_error(run_cli(capsys, argv), "is a folder", ctx.out)
    assert "does not exist" not in err


def test_duplicate_constraints_count_once(capsys, ctx):
    """Issue 15.2: 1,000 copies of one entity are one constraint (they made compose quadratic)."""
    path = ctx.folder / "constraints.json"
    red_car = {"attribute": "red", "entity": "car"}
    path.write_text(json.dumps({"entities": ["car"] * 1000, "attributes": [red_car] * 10}))
    argv = ["compose", "a red car", "--constraints", path, "-o", ctx.out, "--model", ctx.model, *FAST["compose"]]
    assert_success(run_cli(capsys, argv), ctx.out)
    with Image.open(ctx.out) as image:
        used = json.loads(image.text["editkit"])["constraints_used"]
    assert used["entities"] == ["car"] and used["attributes"] == [red_car]


# -- outputs --------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["stylize", "edit", "compose", "generate"])
def test_existing_output_is_not_overwritten(capsys, ctx, command):
    ctx.out.parent.mkdir()
    ctx.out.write_bytes(b"precious")
    code, _, err = run_cli(capsys, ctx.argv(command))
    assert code == 2 and "--overwrite" in err and ctx.out.read_bytes() == b"precious"


@pytest.mark.parametrize("command", ["stylize", "edit", "compose", "generate"])
def test_unwritable_output_folder_exits_2(capsys, ctx, command, monkeypatch):
    import os

    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if mode & os.W_OK else real_access(path, mode))
    assert_user_error(run_cli(capsys, ctx.argv(command)), "permission denied", ctx.out)


def _failing_save(monkeypatch, error: BaseException):
    """PIL's save writes half a file, then fails with ``error``."""

    def save(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG partial")
        raise error

    monkeypatch.setattr(Image.Image, "save", save)


@pytest.mark.parametrize("command", ["stylize", "edit", "compose", "generate"])
def test_full_disk_exits_2_without_partial_file(capsys, ctx, command, monkeypatch):
    _failing_save(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    assert_user_error(run_cli(capsys, ctx.argv(command)), "no space left", ctx.out)


@pytest.mark.parametrize("command", ["stylize", "compose"])
def test_ctrl_c_leaves_no_partial_file(capsys, ctx, command, monkeypatch):
    _failing_save(monkeypatch, KeyboardInterrupt())
    code, _, err = run_cli(capsys, ctx.argv(command))
    assert code == 130 and "interrupted" in err and "Traceback" not in err
    assert not ctx.out.exists() and list(ctx.out.parent.iterdir()) == []


@pytest.mark.parametrize("command", ["stylize", "edit", "compose", "generate"])
@pytest.mark.parametrize("case", list(bad.BAD_OUTPUTS))
def test_bad_output_paths_exit_2_before_the_model_loads(capsys, ctx, monkeypatch, command, case):
    """Issue 15.11: refused before any model work (a model load here would be exit 1), nothing created."""
    build, fragment = bad.BAD_OUTPUTS[case]

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr("editkit.models.load_pipeline", no_model)
    out = build(ctx.out.parent)
    assert_user_error(run_cli(capsys, ctx.argv(command, out=out)), fragment, out)
    assert not (ctx.out.parent / "ghost").exists()


@pytest.mark.parametrize("command", ["stylize", "edit", "compose", "generate"])
def test_a_250_byte_output_name_works(capsys, ctx, command):
    out = bad.long_valid_name(ctx.out.parent)
    assert_success(run_cli(capsys, ctx.argv(command, out=out)), out)
    assert [p.name for p in ctx.out.parent.iterdir()] == [out.name]


@pytest.mark.parametrize("command", ["stylize", "edit", "compose"])
def test_stale_temporary_files_are_removed_by_the_next_run(capsys, ctx, command):
    """Issue 15.7: what a killed run left in the output folder is cleaned; other hidden files stay."""
    stale = bad.stale_temporaries(ctx.out.parent)
    (ctx.out.parent / ".keep").write_text("mine")
    assert_success(run_cli(capsys, ctx.argv(command)), ctx.out)
    assert sorted(p.name for p in ctx.out.parent.iterdir()) == [".keep", ctx.out.name]
    assert not any(p.exists() for p in stale)


def test_overwrite_through_a_symlink_replaces_its_target(capsys, ctx):
    """Issue 15.11 (decided): --overwrite onto a symlink writes the file it points to; the link stays."""
    target = ctx.folder / "real.png"
    target.write_bytes(b"old")
    ctx.out.parent.mkdir()
    ctx.out.symlink_to(target)
    assert_success(run_cli(capsys, ctx.argv("compose", extra=["--overwrite"])), ctx.out)
    assert ctx.out.is_symlink() and target.read_bytes()[:4] == b"\x89PNG"


def test_a_full_disk_while_saving_a_style_cache_exits_2(capsys, ctx, monkeypatch):
    """Issue 15.8: safetensors reports ENOSPC in its own error type; still exit 2, nothing partial."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a cache")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    cache = ctx.out.parent / "style.safetensors"
    result = run_cli(capsys, ctx.argv("stylize", extra=["--save-style-cache", cache]))
    assert_user_error(result, "no space left", cache)


# -- numerical faults and memory ------------------------------------------------------------------
def test_out_of_memory_names_the_knobs(capsys, ctx, monkeypatch):
    from pipelines.compose import ComposePipeline

    def oom(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(ComposePipeline, "__call__", oom)
    err = assert_user_error(run_cli(capsys, ctx.argv("compose")), "out of memory", ctx.out)
    assert "--size" in err and "offload" in err and "--dtype" in err


@pytest.mark.parametrize("command", ["stylize", "compose"])
def test_nan_latents_are_a_clear_error(capsys, ctx, command, monkeypatch):
    import editkit.inversion as inversion

    real = inversion.check_finite
    monkeypatch.setattr(inversion, "check_finite", lambda t, where, **kw: real(t * float("nan"), where, **kw))
    assert_user_error(run_cli(capsys, ctx.argv(command)), "produced NaN values", ctx.out)


def test_edit_of_a_small_image_works(capsys, ctx):
    """Feature grids smaller than a contrastive patch are skipped (they used to crash avg_pool2d)."""
    small = bad.good_image(ctx.folder, "small.png", (24, 16))
    assert_success(run_cli(capsys, ctx.argv("edit", image=small, extra=["--size", "24"])), ctx.out)
