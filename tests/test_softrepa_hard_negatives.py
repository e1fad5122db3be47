"""SoftREPA hard negatives (colour swap, relation flip), their training columns, keep-best on them, token init.

Expected captions are written by hand or built from the shapes world's own scene objects (the
colours of the two objects swapped, the opposite relation, re-captioned by the world's template),
not from editkit's text rules.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from types import SimpleNamespace

import pytest
import torch
from test_softrepa_train import _config, _make_data

import editkit.softrepa.train as train_module
from editkit.cli import build_parser
from editkit.errors import InputError
from editkit.softrepa import TrainConfig, initial_tokens, train_soft_tokens
from editkit.softrepa.config import check_config
from editkit.softrepa.hard_negatives import hard_negatives

OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@pytest.mark.parametrize(
    "caption",
    ["a red circle", "a striped blue square on a gray background", "a photo of a cat", "a red circle near a dog"],
)
def test_one_colour_and_no_relation_gives_none(caption):
    assert hard_negatives(caption) == []


def test_two_colours_are_swapped_with_their_articles():
    assert hard_negatives("a red circle and a blue square") == ["a blue circle and a red square"]
    assert hard_negatives("a red circle and an orange square on a black background") == [
        "an orange circle and a red square on a black background"
    ]
    assert hard_negatives("A red cube and a blue ball") == ["A blue cube and a red ball"]


@pytest.mark.parametrize(
    ("caption", "flipped"),
    [
        ("a cat to the left of a dog", "a cat to the right of a dog"),
        ("a cat right of a dog", "a cat left of a dog"),
        ("a cat above a dog", "a cat below a dog"),
        ("a cat below a dog", "a cat above a dog"),
        ("a cat on top of a box", "a cat on bottom of a box"),
        ("a lamp under a table", "a lamp over a table"),
    ],
)
def test_relations_flip(caption, flipped):
    assert hard_negatives(caption) == [flipped]


def test_colour_swap_and_relation_flip_together_and_the_limit():
    caption = "a red circle to the left of a blue square"
    both = ["a blue circle to the left of a red square", "a red circle to the right of a blue square"]
    assert hard_negatives(caption) == both
    assert hard_negatives(caption, limit=1) == both[:1] and hard_negatives(caption, limit=0) == []


@pytest.mark.parametrize("caption", ["a red circle and a red square", "a cup on a table", "a red cat on a rug"])
def test_never_the_caption_itself(caption):
    assert hard_negatives(caption) == []  # same colours: the swap would be the caption; "on" is never flipped


def _world_negatives(scene) -> list[str]:
    """The world's own perturbation: the two objects' colours swapped, the opposite relation."""
    first, second = scene.objects
    swapped = (dataclasses.replace(first, color=second.color), dataclasses.replace(second, color=first.color))
    out = [dataclasses.replace(scene, objects=swapped).caption]
    if scene.relation is not None:
        out.append(dataclasses.replace(scene, relation=OPPOSITE[scene.relation]).caption)
    return out


def test_world_captions_give_the_scene_level_perturbations():
    from benchmarks.shapes.world import sample_batch

    _, captions, scenes = sample_batch(seed=2, n=200, training=True)
    pairs = 0
    for caption, scene in zip(captions, scenes, strict=True):
        expected = _world_negatives(scene) if len(scene.objects) == 2 else []
        pairs += len(scene.objects) == 2
        assert hard_negatives(caption) == expected, caption
        assert caption not in hard_negatives(caption)
    assert pairs > 50


def _coloured_data(folder):
    data = _make_data(folder)
    pairs = [("red", "blue"), ("red", "green"), ("red", "yellow"), ("blue", "green"), ("blue", "yellow")]
    pairs += [("green", "yellow"), ("red", "orange"), ("blue", "orange")]  # no caption is another's swap
    rows = [
        {"file_name": f"{i}.png", "text": f"a {first} circle to the left of a {second} square"}
        for i, (first, second) in enumerate(pairs)
    ]
    (data / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    return data


def test_hard_negatives_are_extra_columns_and_keep_best_uses_them(tmp_path, sd15_dir, monkeypatch):
    widths = []
    original = train_module.pair_errors

    def spy(predict, noisy, target, prompt_embeds, rows, added=None):
        widths.append((noisy.shape[0], prompt_embeds.shape[0]))
        return original(predict, noisy, target, prompt_embeds, rows, added)

    monkeypatch.setattr(train_module, "pair_errors", spy)
    config = _config(
        _coloured_data(tmp_path / "data"), sd15_dir, tmp_path / "t.safetensors", max_steps=1, validate_every=1,
        hard_negatives=2, keep_best="hard-negatives",
    )  # fmt: skip
    result = train_soft_tokens(config)
    assert widths[0] == (2, 2 + 2 * 2)  # 2 images x (2 captions + 2 hard negatives each)
    entry = result.log[0]
    assert entry["keep_best"] == "hard-negatives" and entry["val_accuracy"] == entry["val_hard_negatives"][0]
    assert entry["val_group"] is not None and result.best_metric == entry["val_hard_negatives"]
    assert json.loads(config.log_path.read_text())[0]["val_hard_negatives"] == entry["val_hard_negatives"]


def test_keep_best_on_hard_negatives_falls_back_to_group_with_a_warning(tmp_path, sd15_dir, caplog):
    config = _config(_make_data(tmp_path / "data"), sd15_dir, tmp_path / "t.safetensors", keep_best="hard-negatives")
    with caplog.at_level(logging.WARNING, logger="editkit.softrepa.train"):
        result = train_soft_tokens(config)
    entry = result.log[-1]
    assert entry["val_hard_negatives"] is None and entry["val_accuracy"] == entry["val_group"][0]
    assert "no validation caption has hard negatives" in caplog.text


def test_normal_token_init_has_the_reference_std_and_text_stays_the_default(sd15_pipe):
    from editkit.conditioning import encode_text

    wide = SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(cross_attention_dim=2048)))
    tokens = initial_tokens(wide, 4, generator=torch.Generator().manual_seed(0), init="normal")
    assert tokens.shape == (4, 2048) and abs(tokens.std().item() - 0.02) < 0.2 * 0.02
    start = encode_text(sd15_pipe, [""]).prompt_embeds[0, 0].float()
    for init in ({}, {"init": "text"}):
        torch.testing.assert_close(initial_tokens(sd15_pipe, 3, **init), start.expand(3, -1))
    normal = initial_tokens(sd15_pipe, 3, generator=torch.Generator().manual_seed(0), init="normal")
    assert normal.shape == (3, start.shape[0]) and not torch.allclose(normal, start.expand(3, -1))
    with pytest.raises(ValueError, match="token init"):
        initial_tokens(sd15_pipe, 3, init="zeros")


def test_cli_flags_show_their_defaults_and_reach_the_config(capsys):
    args = build_parser().parse_args(["softrepa", "train", "--data", ".", "-o", "t.safetensors"])
    config = TrainConfig(data=".", model=".", output="t.safetensors")
    for name in ("hard_negatives", "keep_best", "token_init"):
        assert getattr(args, name) == getattr(config, name), name
    with pytest.raises(SystemExit):
        build_parser().parse_args(["softrepa", "train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(0: none) (default: 0)" in text and "(default: group)" in text and "(default: text)" in text


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"keep_best": "val"}, "keep-best metric"),
        ({"token_init": "zeros"}, "token init"),
        ({"hard_negatives": -1}, "0 or more"),
    ],
)
def test_bad_settings_are_refused(override, message):
    with pytest.raises(InputError, match=message):
        check_config(TrainConfig(data=".", model=".", output="t.safetensors", **override), 1)


def test_new_settings_enter_the_fingerprint_only_away_from_their_defaults():
    plain = TrainConfig(data=".", model=".", output="t.safetensors").fingerprint(1)
    assert not {"hard_negatives", "keep_best", "token_init"} & set(plain)  # checkpoints of earlier runs resume
    changed = TrainConfig(data=".", model=".", output="t.safetensors", hard_negatives=2).fingerprint(1)
    assert changed["hard_negatives"] == 2
