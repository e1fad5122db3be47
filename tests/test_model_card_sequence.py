"""A model card's ``max_sequence_length`` (T5 tokens the model was trained with) reaches every MM-DiT task.

``assets/models/shapes-sd3`` has no T5 and was trained with none; without the card's 0 diffusers'
pipelines append 256 zero "T5" tokens to its 16 CLIP tokens, a condition it never saw.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from editkit.model_card import card_sequence_length
from editkit.tasks import load_task_pipeline


def _card(folder, value) -> None:
    (folder / "README.md").write_text(f"---\nlibrary_name: diffusers\nmax_sequence_length: {value}\n---\n\n# tiny\n")


@pytest.fixture(scope="module")
def carded(sd3_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("carded") / "sd3"
    shutil.copytree(sd3_dir, folder)
    _card(folder, 3)
    return folder


def _text_lengths(pipe) -> list[int]:
    lengths = []
    pipe.transformer.register_forward_hook(
        lambda module, args, kwargs, out: lengths.append(kwargs["encoder_hidden_states"].shape[1]), with_kwargs=True
    )
    return lengths


def _image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8))


def test_stylize_and_edit_tasks_take_the_cards_t5_length(carded, sd3_dir):
    from editkit.tasks import EditInputs, EditOptions, StylizeInputs, StylizeOptions, edit, stylize

    for folder, t5 in ((carded, 3), (sd3_dir, 256)):  # no card: diffusers' default
        pipe = load_task_pipeline("stylize", folder, device="cpu")
        lengths = _text_lengths(pipe)
        result = stylize.run(pipe, StylizeInputs(_image(0), [_image(1)]), StylizeOptions(num_inference_steps=1))
        clip = pipe.tokenizer.model_max_length
        assert set(lengths) == {clip + t5}
        assert result.records[0]["used"].get("max_sequence_length") == (3 if folder == carded else None)
    pipe = load_task_pipeline("edit", carded, device="cpu")
    lengths = _text_lengths(pipe)
    result = edit.run(pipe, EditInputs(_image(0), "a cat", "a dog"), EditOptions(num_inference_steps=2, n_max=1))
    assert set(lengths) == {pipe.tokenizer.model_max_length + 3}
    assert result.records[0]["used"]["max_sequence_length"] == 3


@pytest.mark.parametrize("value", ["-1", "two", "1.5", "true"])
def test_a_malformed_card_value_is_ignored_with_a_warning(tmp_path, value, caplog):
    _card(tmp_path, value)

    class Pipe:
        name_or_path = str(tmp_path)

    assert card_sequence_length(Pipe()) is None
    assert "ignoring max_sequence_length" in caplog.text


def test_the_shipped_shapes_sd3_card_says_no_t5():
    from pathlib import Path

    class Pipe:
        name_or_path = str(Path(__file__).parents[1] / "assets" / "models" / "shapes-sd3")

    assert card_sequence_length(Pipe()) == 0
