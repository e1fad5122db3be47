"""The shapes MM-DiT training script: checkpoints resume bit for bit, safetensors only, the exported pipeline."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open

from benchmarks.shapes import train_mmdit as T

pytestmark = pytest.mark.skipif(not (T.SHAPES_SD / "vae").is_dir(), reason="needs assets/models/shapes-sd")

CONFIG = dataclasses.replace(T.CONFIGS["tiny"], steps=4)


def _weights(state: T.TrainState) -> dict[str, torch.Tensor]:
    out = {}
    for prefix, group in (("model", state.models), ("ema", state.ema)):
        for name, module in group.items():
            out |= {f"{prefix}.{name}.{k}": v for k, v in module.state_dict().items()}
    return out


@pytest.fixture(scope="module")
def data():
    return T.load_data(CONFIG, T.SHAPES_SD)


def test_resume_continues_exactly(tmp_path, data):
    straight = T.run(T.new_state(CONFIG, T.SHAPES_SD), data, None, 0.0)
    checkpoint = tmp_path / "ckpt.safetensors"
    half = T.new_state(dataclasses.replace(CONFIG, steps=2), T.SHAPES_SD)
    T.run(half, data, checkpoint, checkpoint_every=1e9)
    resumed = T.load_state(checkpoint, T.SHAPES_SD, steps=4)
    assert resumed.step == 2 and resumed.config.steps == 4
    torch.testing.assert_close(resumed.generator.get_state(), half.generator.get_state(), rtol=0, atol=0)
    T.run(resumed, data, checkpoint, checkpoint_every=1e9)
    assert resumed.step == straight.step == 4
    expected, got = _weights(straight), _weights(resumed)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)
    assert not torch.equal(expected["ema.transformer.proj_out.weight"], expected["model.transformer.proj_out.weight"])
    with safe_open(str(checkpoint), framework="pt") as file:  # a safetensors file: tensors + JSON metadata
        metadata = file.metadata()
        assert json.loads(metadata["config"])["steps"] == 4 and metadata["step"] == "4"
        assert any(key.startswith("optimizer.") and key.endswith(".exp_avg_sq") for key in file.keys())  # noqa: SIM118
    assert list(tmp_path.iterdir()) == [checkpoint]  # nothing half-written beside it


def test_decay_added_on_resume_cools_the_learning_rate_to_zero(tmp_path, data):
    """Warm-up-stable-decay: a constant-phase checkpoint resumed with ``decay_steps`` decays linearly to 0."""
    checkpoint = tmp_path / "ckpt.safetensors"
    T.run(T.new_state(dataclasses.replace(CONFIG, steps=2, warmup_steps=1), T.SHAPES_SD), data, checkpoint, 1e9)
    resumed = T.load_state(checkpoint, T.SHAPES_SD, steps=6, decay_steps=4)
    lrs = []
    for _ in range(4):
        lrs.append(resumed.optimizer.param_groups[0]["lr"])
        T.train_step(resumed, data)
    peak = resumed.config.lr
    torch.testing.assert_close(torch.tensor(lrs), torch.tensor([1.0, 0.75, 0.5, 0.25]) * peak)
    assert resumed.optimizer.param_groups[0]["lr"] == 0.0  # after the last step


@pytest.mark.parametrize(
    ("overrides", "frozen_names"),
    [
        ({"train_text_towers": False}, ("text_encoder", "text_encoder_2")),
        ({"frozen_text_towers": ("text_encoder",)}, ("text_encoder",)),
    ],
)
def test_frozen_text_towers_stay_put_and_resume_exactly(tmp_path, data, overrides, frozen_names):
    """Frozen towers (both with ``train_text_towers=False``, or those named in ``frozen_text_towers``) keep
    the shapes-sd weights; the other tower, the projections and the transformer train; a resumed run still
    equals the straight one."""
    frozen = dataclasses.replace(CONFIG, **overrides)
    start = _weights(T.new_state(frozen, T.SHAPES_SD))
    straight = T.run(T.new_state(frozen, T.SHAPES_SD), data, None, 0.0)
    after = _weights(straight)
    for name in ("text_encoder", "text_encoder_2"):
        tower = [k for k in after if k.startswith(f"model.{name}.text_model.")]
        moved = [k for k in tower if not torch.equal(after[k], start[k])]
        assert tower and (moved == [] if name in frozen_names else len(moved) > len(tower) // 2), name
    for key in ("model.text_encoder.text_projection.weight", "model.transformer.proj_out.weight"):
        assert not torch.equal(after[key], start[key]), key
    checkpoint = tmp_path / "ckpt.safetensors"
    T.run(T.new_state(dataclasses.replace(frozen, steps=2), T.SHAPES_SD), data, checkpoint, checkpoint_every=1e9)
    resumed = T.run(T.load_state(checkpoint, T.SHAPES_SD, steps=4), data, None, 0.0)
    assert T.frozen_towers(resumed.config) == frozen_names
    again = _weights(resumed)
    for key, value in after.items():
        torch.testing.assert_close(again[key], value, rtol=0, atol=0, msg=key)


def test_text_tower_learning_rate_scale_holds_through_decay_and_resume(tmp_path, data):
    """``text_tower_lr_scale``: the towers' group runs at that fraction of the other group's rate at every
    step of a warm-up-stable-decay schedule, the fresh projections at the full rate, and a resumed run
    (decay added on resume) equals the straight one bit for bit."""
    scaled = dataclasses.replace(CONFIG, text_tower_lr_scale=0.1, warmup_steps=1, steps=6, decay_steps=4)
    state = T.new_state(scaled, T.SHAPES_SD)
    full, towers = state.optimizer.param_groups
    text_models = [state.models[name].text_model for name in ("text_encoder", "text_encoder_2")]
    tower_ids = {id(p) for model in text_models for p in model.parameters()}
    assert {id(p) for p in towers["params"]} == tower_ids
    projection = state.models["text_encoder"].text_projection.weight
    assert any(p is projection for p in full["params"])
    straight_lrs = []
    for _ in range(6):
        straight_lrs.append([group["lr"] for group in state.optimizer.param_groups])
        T.train_step(state, data)
    peak = scaled.lr
    expected = torch.tensor([1.0, 1.0, 1.0, 0.75, 0.5, 0.25]) * peak
    torch.testing.assert_close(torch.tensor(straight_lrs), torch.stack([expected, expected * 0.1], dim=1))

    checkpoint = tmp_path / "ckpt.safetensors"
    first = dataclasses.replace(scaled, steps=2, decay_steps=0)
    T.run(T.new_state(first, T.SHAPES_SD), data, checkpoint, checkpoint_every=1e9)
    resumed = T.load_state(checkpoint, T.SHAPES_SD, steps=6, decay_steps=4)
    assert [g["lr"] for g in resumed.optimizer.param_groups] == pytest.approx([peak, peak * 0.1])
    T.run(resumed, data, None, 0.0)
    expected_weights, got = _weights(state), _weights(resumed)
    for key, value in expected_weights.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)


def test_unknown_frozen_tower_is_refused():
    with pytest.raises(ValueError, match="unknown tower"):
        T.new_state(dataclasses.replace(CONFIG, frozen_text_towers=("text_encoder_3",)), T.SHAPES_SD)


def test_ema_update_is_the_exponential_moving_average():
    ema, model = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    expected = [0.9 * e + 0.1 * p for e, p in zip(ema.parameters(), model.parameters())]
    T.ema_update(ema, model, 0.9)
    for got, want in zip(ema.parameters(), expected):
        torch.testing.assert_close(got.detach(), want.detach())


def test_fused_optimizer_trains_as_the_default_one(data):
    """``fused_optimizer``: the same AdamW steps (equal to float rounding), a speed option only."""
    plain = _weights(T.run(T.new_state(CONFIG, T.SHAPES_SD), data, None, 0.0))
    fused_state = T.new_state(dataclasses.replace(CONFIG, fused_optimizer=True), T.SHAPES_SD)
    assert fused_state.optimizer.defaults["fused"] is True
    fused = _weights(T.run(fused_state, data, None, 0.0))
    start = _weights(T.new_state(CONFIG, T.SHAPES_SD))
    key = "model.transformer.proj_out.weight"
    assert not torch.equal(plain[key], start[key])
    # A key bias has zero gradient in exact arithmetic (softmax ignores a constant added to every key's
    # score), so Adam's normalised step on its rounding noise differs between the two kernels: left out.
    compared = [name for name in plain if not name.endswith("k_proj.bias")]
    assert len(compared) > 0.9 * len(plain)
    for name in compared:
        torch.testing.assert_close(fused[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_not_a_checkpoint_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={"format": "something else"})
    with pytest.raises(ValueError, match="not a shapes MM-DiT checkpoint"):
        T.load_state(path, T.SHAPES_SD)


def test_exported_pipeline_encodes_prompts_as_training_did(tmp_path, data):
    from diffusers import StableDiffusion3Pipeline

    state = T.run(T.new_state(dataclasses.replace(CONFIG, steps=1), T.SHAPES_SD), data, None, 0.0)
    T.export_pipeline(state, T.SHAPES_SD, tmp_path / "sd3")
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "sd3", text_encoder_3=None, tokenizer_3=None)
    assert pipe.vae.config.shift_factor == 0.0 and pipe.tokenizer.model_max_length == CONFIG.tokenizer_max_length
    prompt = "a red circle above a blue square"
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt, prompt, prompt, do_classifier_free_guidance=False, max_sequence_length=CONFIG.t5_tokens
    )
    ids = T.tokenize(pipe.tokenizer, [prompt])
    expected_embeds, expected_pooled = T.encode_prompts(state.ema, ids, CONFIG.t5_tokens)
    torch.testing.assert_close(embeds, expected_embeds)
    torch.testing.assert_close(pooled, expected_pooled)
    assert (tmp_path / "sd3" / "training_summary.json").is_file() and not (tmp_path / ".sd3.tmp").exists()
    from benchmarks.shapes.evaluate import call_kwargs, load_pipeline

    assert call_kwargs(tmp_path / "sd3") == {"max_sequence_length": CONFIG.t5_tokens}
    assert load_pipeline(str(tmp_path / "sd3")).text_encoder_3 is None


SHIPPED = T.SHAPES_SD.parent / "shapes-sd3"


@pytest.mark.skipif(not (SHIPPED / "model_index.json").is_file(), reason="assets/models/shapes-sd3 not there")
def test_shipped_sd3_model_is_small_safetensors_and_generates():
    from benchmarks.shapes.evaluate import call_kwargs, generate, load_pipeline
    from editkit.model_card import is_shapes_model

    files = [p for p in SHIPPED.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt")]
    assert weights and all(p.suffix == ".safetensors" for p in weights)
    assert sum(p.stat().st_size for p in files) <= 25 * 1024 * 1024
    assert is_shapes_model(SHIPPED)
    pipe = load_pipeline(str(SHIPPED))
    images = generate(pipe, ["a red circle"], [0], steps=2, guidance_scale=3.0, **call_kwargs(SHIPPED))
    assert images.shape == (1, 32, 32, 3) and images.std() > 0


def test_editkit_loader_reads_the_folder_without_t5():
    """The model was trained without T5 (null in model_index.json): editkit's loader passes it as None,
    which diffusers requires for a null component it does not count as optional."""
    from diffusers import StableDiffusion3Pipeline

    from editkit.models import load_pipeline

    pipe = load_pipeline(None, SHIPPED, device="cpu")
    assert isinstance(pipe, StableDiffusion3Pipeline)
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None and pipe.transformer is not None
