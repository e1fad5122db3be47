"""Shapes world: determinism, detector exactness, the shipped model and a tiny training run."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.shapes import detect, world  # noqa: E402

MODEL_DIR = ROOT / "assets" / "models" / "shapes-sd"


def test_same_seed_same_images_and_captions():
    images_a, captions_a, _ = world.sample_batch(seed=7, n=50)
    images_b, captions_b, _ = world.sample_batch(seed=7, n=50)
    images_c, _, _ = world.sample_batch(seed=8, n=50)
    assert np.array_equal(images_a, images_b)
    assert captions_a == captions_b
    assert not np.array_equal(images_a, images_c)
    assert images_a.shape == (50, world.IMAGE_SIZE, world.IMAGE_SIZE, 3)
    assert images_a.dtype == np.uint8


def test_captions_follow_templates_and_parse_back():
    rng = np.random.default_rng(0)
    for _ in range(300):
        scene = world.sample_scene(rng, pattern_prob=0.5, background_prob=0.5)
        prompt = world.parse_caption(scene.caption)
        assert prompt.category == scene.category
        assert prompt.objects == tuple((o.color, o.shape) for o in scene.objects)
        assert prompt.relation == scene.relation
        assert prompt.background == scene.background
    examples = {
        "single": "a red circle",
        "pair": "a red circle and a blue square",
        "relation": "a yellow triangle above a green circle",
    }
    for category, caption in examples.items():
        assert caption in world.all_captions(category)


def test_training_scenes_avoid_held_out_captions():
    _, captions, _ = world.sample_batch(seed=1, n=500, training=True)
    assert not any(world.is_held_out(c) for c in captions)
    for category in world.CATEGORIES:
        prompts = world.held_out_prompts(category, 20)
        assert all(world.is_held_out(p.caption) and p.category == category for p in prompts)


def test_detector_is_exact_on_clean_renders():
    images, _, scenes = world.sample_batch(seed=123, n=2000, training=False, pattern_prob=0.6, background_prob=0.6)
    detections = detect.detect_batch(images)
    backgrounds = detect.detect_background(images, detect.build_palette())
    assert backgrounds == [s.background for s in scenes]
    expected = [sorted((o.color, o.shape, o.pattern) for o in s.objects) for s in scenes]
    assert [sorted((d.color, d.shape, d.pattern) for d in found) for found in detections] == expected
    for image_scene, found in zip(scenes[:300], detections[:300]):  # geometry on a subset
        for obj in image_scene.objects:
            mask = world.shape_mask(obj, image_scene.size)
            ys, xs = np.nonzero(mask)
            match = next(d for d in found if d.color == obj.color)
            assert match.bbox == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert match.area == mask.sum()
            assert np.allclose(match.centroid, (xs.mean() + 0.5, ys.mean() + 0.5))


def test_detector_ignores_tiny_blobs_and_tolerates_noise():
    rng = np.random.default_rng(0)
    obj = world.ShapeObject("square", "red", "solid", 16, 16, 6)
    image = world.render(world.Scene("white", (obj,), "single")).astype(np.float32)
    image[2:4, 2:4] = world.COLORS["blue"]  # a 4-pixel blob
    noisy = np.clip(image + rng.normal(0, 20, image.shape), 0, 255)
    found = detect.detect(noisy)
    assert [(d.color, d.shape) for d in found] == [("red", "square")]


def test_tokenizer_has_every_world_word_as_one_token():
    from benchmarks.shapes.train import build_tokenizer

    tokenizer = build_tokenizer()
    for word in world.vocabulary():
        assert len(tokenizer.tokenize(word)) == 1, word


def _generate_one(model_dir: Path) -> np.ndarray:
    from benchmarks.shapes.evaluate import generate, load_pipeline

    pipe = load_pipeline(str(model_dir))
    assert pipe.safety_checker is None
    return generate(pipe, ["a red circle"], [0], steps=2, guidance_scale=3.0)


@pytest.mark.skipif(
    not (MODEL_DIR / "model_index.json").exists(),
    reason="assets/models/shapes-sd not trained yet (python -m benchmarks.shapes.train)",
)
def test_shipped_model_loads_offline_and_generates():
    files = [p for p in MODEL_DIR.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt")]
    assert weights and all(p.suffix == ".safetensors" for p in weights)
    assert sum(p.stat().st_size for p in files) <= 25 * 1024 * 1024
    images = _generate_one(MODEL_DIR)
    assert images.shape == (1, world.IMAGE_SIZE, world.IMAGE_SIZE, 3)


def test_tiny_training_run_writes_a_loadable_pipeline(tmp_path):
    import dataclasses

    from benchmarks.shapes.train import CONFIGS, train

    config = dataclasses.replace(CONFIGS["tiny"], num_images=16)
    summary = train(config, tmp_path / "model", device="cpu")
    assert summary["scaling_factor"] > 0
    images = _generate_one(tmp_path / "model")
    assert images.shape == (1, config.image_size, config.image_size, 3)

    # --continue-from: 2 more UNet + text-encoder steps on the saved pipeline, VAE untouched
    import torch
    from safetensors.torch import load_file

    from benchmarks.shapes.train import main

    source, output = tmp_path / "model", tmp_path / "continued"
    main(["--config", "tiny", "--num-images", "16", "--device", "cpu", "--unet-steps", "2",
          "--continue-from", str(source), "--output", str(output)])  # fmt: skip

    def weights(folder, part):
        return load_file(next((folder / part).glob("*.safetensors")))

    assert all(torch.equal(v, weights(output, "vae")[k]) for k, v in weights(source, "vae").items())
    assert not all(torch.equal(v, weights(output, "unet")[k]) for k, v in weights(source, "unet").items())
    continued = json.loads((output / "training_summary.json").read_text())
    assert continued["continued_from"] == str(source)
    assert continued["scaling_factor"] == summary["scaling_factor"]
    images = _generate_one(output)
    assert images.shape == (1, config.image_size, config.image_size, 3)


def test_single_scores_break_shape_accuracy_down_by_shape():
    from benchmarks.shapes.evaluate import score_single

    def found(color, shape):
        return [detect.Detection(color, shape, "solid", (0, 0, 4, 4), (2.0, 2.0), 16, 1.0)]

    prompts = [
        world.Prompt(f"a red {s}", "single", (("red", s),), None, "white") for s in ("circle", "circle", "square")
    ]
    scores = score_single(prompts, [found("red", "circle"), found("red", "triangle"), []])
    assert scores["single_shape_accuracy"] == pytest.approx(1 / 3)
    assert scores["single_shape_accuracy_by_shape"] == {
        "circle": {"prompts": 2, "accuracy": 0.5}, "square": {"prompts": 1, "accuracy": 0.0},
    }  # fmt: skip
    assert scores["single_shape_confusions"] == {"circle -> triangle": 1, "square -> nothing": 1}
