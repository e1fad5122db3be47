"""Property-based tests: the image loader, the prompt/constraint parser and the option types.

For any input they either succeed with a result that has the promised properties or raise the
one documented error (InputError, argparse.ArgumentTypeError); never any other exception.
"""

from __future__ import annotations

import argparse
import io
import math
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from editkit.commands.common import finite_float, non_negative_int, positive_float, positive_int, ranged_float
from editkit.constraints import align, constraints_from_dict, parse_prompt
from editkit.errors import InputError
from editkit.image import fit_size, load_image, load_mask

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I", "I;16", "F", "YCbCr", "HSV"]
FORMATS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "GIF": ".gif", "TIFF": ".tif", "BMP": ".bmp"}


def _image(mode: str, width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode in ("I", "F"):
        data = rng.normal(0, 1000, (height, width)).astype(np.int32 if mode == "I" else np.float32)
        return Image.fromarray(data, mode)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    return rgb.convert(mode) if mode not in ("LA", "RGBA") else rgb.convert("RGBA").convert(mode)


images = st.builds(
    _image,
    st.sampled_from(MODES),
    st.integers(1, 96),
    st.integers(1, 96),
    st.integers(0, 2**16),
)


@FAST
@given(image=images)
def test_loader_on_pil_images_gives_rgb_of_the_same_size_or_input_error(image):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = load_image(image)
    except InputError as error:
        assert "\n" not in str(error)
        return
    assert loaded.mode == "RGB" and loaded.size == image.size


@FAST
@given(image=images, image_format=st.sampled_from(sorted(FORMATS)), cut=st.floats(0.0, 1.0))
def test_loader_on_files_gives_rgb_or_input_error(tmp_path_factory, image, image_format, cut):
    """Files in every format, whole or cut short anywhere: RGB of the file's size, or InputError."""
    buffer = io.BytesIO()
    try:
        image.save(buffer, format=image_format)
    except (OSError, ValueError, KeyError):
        return  # PIL cannot write this mode in this format: nothing to load
    data = buffer.getvalue()
    data = data if cut > 0.8 else data[: int(len(data) * cut / 0.8)]
    path = tmp_path_factory.mktemp("prop") / f"image{FORMATS[image_format]}"
    path.write_bytes(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = load_image(path)
    except InputError as error:
        assert "\n" not in str(error)
        return
    assert loaded.mode == "RGB" and loaded.size == image.size


@FAST
@given(image=images, width=st.integers(1, 64), height=st.integers(1, 64), threshold=st.floats(-1, 2))
def test_mask_loader_gives_a_binary_mask_of_the_size_or_input_error(image, width, height, threshold):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mask = load_mask(image, (width, height), threshold=threshold)
    except InputError:
        return
    assert mask.shape == (1, 1, height, width)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}


@FAST
@given(
    width=st.integers(-5, 5000),
    height=st.integers(-5, 5000),
    multiple=st.sampled_from([1, 8, 16, 64]),
    target=st.one_of(st.none(), st.integers(8, 2048)),
)
def test_fit_size_gives_multiples_or_input_error(width, height, multiple, target):
    try:
        fitted = fit_size(width, height, multiple=multiple, target=target)
    except InputError:
        assert width < 1 or height < 1
        return
    assert all(side % multiple == 0 and side >= multiple for side in fitted)


# -- prompts and constraints ----------------------------------------------------------------------
WORDS = ["a", "red", "blue", "car", "bird", "on", "the", "left", "of", "above", "and", "small", "dog", "with"]
prompts = st.one_of(
    st.text(max_size=200),
    st.lists(st.sampled_from(WORDS), max_size=60).map(" ".join),
    st.lists(st.one_of(st.sampled_from(WORDS), st.text(max_size=5)), max_size=30).map(" ".join),
)


@FAST
@given(prompt=prompts)
def test_parser_gives_constraints_with_token_indices_in_range(sd15_pipe, prompt):
    tokenizer = sd15_pipe.tokenizer
    try:
        constraints = parse_prompt(prompt, "rules")
        aligned = align(constraints, tokenizer)
    except InputError as error:
        assert "\n" not in str(error)
        return
    assert constraints.prompt == prompt
    window = tokenizer.model_max_length - 2
    assert 0 <= aligned.last_token <= window
    for indices in [*aligned.entities, *(tokens for tokens, _, _ in aligned.bindings)]:
        assert indices and all(1 <= i <= window for i in indices)  # index 0 is start-of-text
    for subject, _, obj in aligned.relations:
        assert 0 <= subject < len(aligned.entities) and 0 <= obj < len(aligned.entities)


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10)),
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(st.text(max_size=10), children, max_size=3)
    ),
    max_leaves=10,
)


@FAST
@given(
    data=st.dictionaries(st.sampled_from(["entities", "attributes", "relations", "other"]), json_values, max_size=3),
    prompt=prompts,
)
def test_user_constraints_are_accepted_or_refused_cleanly(data, prompt):
    try:
        constraints = constraints_from_dict(data, prompt)
    except InputError as error:
        assert "\n" not in str(error)
        return
    for entity in constraints.entities:
        assert entity.text.lower() in prompt.lower()


@FAST
@given(prompt=st.text(max_size=300))
def test_clean_prompt_keeps_no_control_characters(prompt):
    import unicodedata

    from editkit.conditioning import clean_prompt

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cleaned = clean_prompt(prompt)
    assert not any(unicodedata.category(c) == "Cc" for c in cleaned)
    assert len(cleaned) <= len(unicodedata.normalize("NFC", prompt))


# -- option types ---------------------------------------------------------------------------------
numbers_as_text = st.one_of(
    st.text(max_size=12),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-(10**6), 10**6).map(str),
    st.sampled_from(["nan", "NaN", "inf", "-inf", "1e309", "0x10", "1_000", " 3 ", "", "½"]),
)


def _parse(option, text):
    try:
        return option(text)
    except argparse.ArgumentTypeError as error:
        assert str(error)
        return None


@FAST
@given(text=numbers_as_text)
def test_float_options_are_finite_and_in_range(text):
    for option, check in [
        (finite_float, math.isfinite),
        (positive_float, lambda v: math.isfinite(v) and v > 0),
        (ranged_float(0, 1), lambda v: 0 <= v <= 1),
        (ranged_float(-2.5, 50), lambda v: -2.5 <= v <= 50),
    ]:
        value = _parse(option, text)
        assert value is None or (isinstance(value, float) and check(value))


@FAST
@given(text=numbers_as_text)
def test_integer_options_are_in_range(text):
    for option, low in [(positive_int, 1), (non_negative_int, 0)]:
        value = _parse(option, text)
        assert value is None or (isinstance(value, int) and value >= low)


@pytest.mark.parametrize("command", ["stylize", "edit", "compose"])
@FAST
@given(value=numbers_as_text)
def test_commands_parse_numbers_or_exit_2(command, value):
    """Any text for a numeric option: parsed to a valid value, or argparse's usage error (exit 2)."""
    from editkit.cli import build_parser

    option = {"stylize": "--gamma", "edit": "--guidance-scale", "compose": "--guidance-scale"}[command]
    head = {"stylize": ["c.png", "s.png"], "edit": ["i.png", "--source-prompt", "a", "--target-prompt", "b"]}
    argv = [command, *head.get(command, ["a prompt"]), "-o", "out.png", f"{option}={value}"]
    parser = build_parser()
    try:
        with warnings.catch_warnings(), pytest.MonkeyPatch.context() as patch:
            patch.setattr(argparse.ArgumentParser, "_print_message", lambda *a, **k: None)
            args = parser.parse_args(argv)
    except SystemExit as exit_:
        assert exit_.code == 2
        return
    assert math.isfinite(args.gamma if command == "stylize" else args.guidance_scale)
