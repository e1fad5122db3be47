"""SoftREPA on MM-DiT models (SD3 / SD3.5; FLUX.1 double-stream blocks as editkit's extension).

The faithfulness reference is the released code's design (``SD3Transformer2DModel_DC``), written
as block hooks on the stock diffusers transformer and processors (``benchmarks.flow_softrepa.
released_block_hooks``, no editkit code): each token layer's tokens go through ``context_embedder``,
get ``time[t // 10, layer]`` added, are prepended to the text stream entering the block and stripped
from the block's text output.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.flow_softrepa import released_block_hooks
from editkit.attention import attach
from editkit.cli import main
from editkit.errors import ModelLoadError
from editkit.softrepa import TrainConfig, read_soft_tokens, save_soft_tokens, train_soft_tokens
from editkit.softrepa.mmdit_tokens import MMDiTSoftTokenController, MMDiTSoftTokens, default_mmdit_sites

TRAIN = dict(
    max_steps=2, batch_size=2, resolution=32, device="cpu", progress=False, checkpoint_every=2, validate_every=2,
    val_fraction=0.25, max_sequence_length=6,
)  # fmt: skip


def _make_data(folder: Path, count: int = 6) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        pixels = np.random.RandomState(index).randint(0, 255, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index}.png")
        rows.append({"file_name": f"{index}.png", "text": f"shape number {index}"})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return _make_data(tmp_path_factory.mktemp("flow-softrepa") / "data")


def _sd3(num_layers: int, sd35: bool):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=4, patch_size=1, in_channels=4, out_channels=4, num_layers=num_layers, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64,
        pos_embed_max_size=16, dual_attention_layers=(0,) if sd35 else (), qk_norm="rms_norm" if sd35 else None,
    ).eval()  # fmt: skip


def _flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=3, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 4, 8),
    ).eval()  # fmt: skip


def _inputs(family: str, timestep: int) -> dict:
    generator = torch.Generator().manual_seed(3)
    text = torch.randn(2, 7, 32, generator=generator)
    if family != "flux":
        latents, pooled = torch.randn(2, 4, 4, 4, generator=generator), torch.randn(2, 64, generator=generator)
        times = torch.full((2,), float(timestep))
        return dict(hidden_states=latents, encoder_hidden_states=text, pooled_projections=pooled, timestep=times)
    ids = torch.stack([torch.zeros(16), torch.arange(16) // 4, torch.arange(16) % 4], dim=1).float()
    return dict(
        hidden_states=torch.randn(2, 16, 4, generator=generator), encoder_hidden_states=text,
        pooled_projections=torch.randn(2, 32, generator=generator), timestep=torch.full((2,), timestep / 1000),
        guidance=torch.full((2,), 3.5), img_ids=ids, txt_ids=torch.zeros(7, 3),
    )  # fmt: skip


@pytest.mark.parametrize("family", ["sd3", "sd35", "flux"])
def test_attention_level_tokens_equal_the_released_block_level_insertion(family):
    # 3 blocks, tokens on the first 2: the third block must see the text stream without tokens
    transformer = _flux() if family == "flux" else _sd3(3, sd35=family == "sd35")
    sites = default_mmdit_sites(transformer, layers=2)
    assert sites == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]
    generator = torch.Generator().manual_seed(1)
    soft = MMDiTSoftTokens(torch.randn(2, 3, 32, generator=generator), sites, width=32, generator=generator)
    soft.time_embedding.data.mul_(50)  # make a wrong bucket visible
    timestep = 430
    inputs = _inputs(family, timestep)
    with torch.no_grad():
        plain = transformer(**inputs).sample
        with attach(transformer, MMDiTSoftTokenController(soft)):
            ours = transformer(**inputs).sample
        handles = released_block_hooks(transformer, soft, timestep)
        try:
            reference = transformer(**inputs).sample
        finally:
            for handle in handles:
                handle.remove()
    assert (reference - plain).abs().max() > 1e-3  # the tokens change the output
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_attention_maps_keep_the_prompt_token_indices():
    from editkit.attention import AttentionController

    class MapStore(AttentionController):
        def __init__(self):
            super().__init__()
            self.shapes, self.keys = {}, {}

        def wants_probs(self, site):
            return site.kind == "joint"

        def on_probs(self, site, probs, queries):
            self.shapes[site.name] = tuple(probs.shape)
            self.keys[site.name] = site.layout.text_tokens  # text keys the kernel saw

    transformer = _sd3(2, sd35=False)
    soft = MMDiTSoftTokens(torch.randn(1, 3, 32), default_mmdit_sites(transformer, layers=1), width=32)
    store = MapStore()
    with torch.no_grad(), attach(transformer, [MMDiTSoftTokenController(soft), store]):
        transformer(**_inputs("sd3", 500))
    assert store.shapes["transformer_blocks.0.attn"][-1] == 7  # the 7 prompt tokens, soft tokens dropped
    assert store.shapes["transformer_blocks.1.attn"][-1] == 7
    assert store.keys == {"transformer_blocks.0.attn": 10, "transformer_blocks.1.attn": 7}  # inserted at block 0 only


def _soft_for(pipe, family: str) -> MMDiTSoftTokens:
    transformer = pipe.transformer
    sites = default_mmdit_sites(transformer)
    generator = torch.Generator().manual_seed(2)
    tokens = torch.randn(len(sites), 2, transformer.config.joint_attention_dim, generator=generator)
    width = transformer.context_embedder.out_features
    return MMDiTSoftTokens(tokens, sites, width=width, family=family, base_model="tiny", generator=generator)


@pytest.mark.parametrize("fixture", ["sd3_pipe", "flux_pipe"])
def test_generate_task_with_zero_strength_equals_the_stock_pipeline(tmp_path, request, fixture):
    from editkit.tasks import GenerateInputs, GenerateOptions, generate
    from editkit.tasks.common import make_generator

    pipe = request.getfixturevalue(fixture)
    family = "flux" if fixture == "flux_pipe" else "sd3"
    path = save_soft_tokens(_soft_for(pipe, family), tmp_path / "t.safetensors")
    settings = dict(num_inference_steps=2, guidance_scale=3.0, size=32, max_sequence_length=6)
    stock = pipe(
        "a red square", num_inference_steps=2, guidance_scale=3.0, width=32, height=32, max_sequence_length=6,
        generator=make_generator(0), output_type="np",
    ).images[0]  # fmt: skip
    images = {}
    for strength in (0.0, 1.0):
        options = GenerateOptions(soft_token_strength=strength, **settings)
        result = generate.run(pipe, GenerateInputs("a red square", path), options)
        images[strength] = np.asarray(result.images[0], dtype=np.float32)
    assert result.records[0]["used"]["max_sequence_length"] == 6
    np.testing.assert_array_equal(images[0.0], np.round(stock * 255).astype(np.float32))
    assert np.abs(images[1.0] - images[0.0]).max() > 0


@pytest.mark.parametrize("fixture", ["sd3_dir", "sd35_dir", "flux_dir"])
def test_training_learns_only_tokens_and_the_file_loads_back(tmp_path, data, request, fixture):
    from editkit.models import load_pipeline
    from editkit.softrepa import load_soft_tokens

    folder = request.getfixturevalue(fixture)
    pipe = load_pipeline(None, folder)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    config = TrainConfig(data=data, model=folder, output=tmp_path / "t.safetensors", **TRAIN)
    result = train_soft_tokens(config, pipe=pipe)
    assert all(torch.equal(before[k], v) for k, v in pipe.transformer.state_dict().items())  # the model is frozen
    soft = read_soft_tokens(tmp_path / "t.safetensors")
    family = "flux" if fixture == "flux_dir" else "sd3"
    assert isinstance(soft, MMDiTSoftTokens) and soft.family == family and result.steps == 2
    initial = torch.randn(len(soft.sites), 4, 32, generator=torch.Generator().manual_seed(0)) * 0.02
    assert not torch.equal(soft.tokens, initial)  # the tokens moved from their N(0, 0.02) start
    assert soft.sites == default_mmdit_sites(pipe.transformer)
    assert soft.tokens.shape == (len(soft.sites), 4, 32) and soft.time_embedding.shape == (100, len(soft.sites), 32)
    assert all(np.isfinite(result.losses))
    controller = load_soft_tokens(tmp_path / "t.safetensors", model=pipe.transformer)
    assert isinstance(controller, MMDiTSoftTokenController)


def test_resume_continues_exactly(tmp_path, data, sd3_dir):
    straight = train_soft_tokens(TrainConfig(data=data, model=sd3_dir, output=tmp_path / "a.safetensors",
                                             **{**TRAIN, "max_steps": 4}))  # fmt: skip
    first = dict(TRAIN, checkpoint_every=2)
    train_soft_tokens(TrainConfig(data=data, model=sd3_dir, output=tmp_path / "b.safetensors", **first))
    resumed = train_soft_tokens(TrainConfig(
        data=data, model=sd3_dir, output=tmp_path / "b.safetensors", resume=tmp_path / "b.checkpoints",
        **{**TRAIN, "max_steps": 4},
    ))  # fmt: skip
    assert resumed.losses == straight.losses
    for name, value in straight.tokens.tensors().items():
        assert torch.equal(value, resumed.tokens.tensors()[name])


def test_tokens_of_another_family_are_refused(tmp_path, sd3_pipe, flux_pipe, sd15_pipe, sd15_dir, sd3_dir):
    from editkit.softrepa import SoftTokens, default_sites, load_soft_tokens

    sd3_file = save_soft_tokens(_soft_for(sd3_pipe, "sd3"), tmp_path / "sd3.safetensors")
    with pytest.raises(ModelLoadError, match=r"trained on a sd3 model .* this flux model"):
        load_soft_tokens(sd3_file, model=flux_pipe.transformer)
    with pytest.raises(ModelLoadError, match="do not apply to this sd model"):
        load_soft_tokens(sd3_file, model=sd15_pipe.unet)
    unet_tokens = SoftTokens(torch.zeros(2, 16), default_sites(sd15_pipe.unet), family="sd")
    unet_file = save_soft_tokens(unet_tokens, tmp_path / "sd.safetensors")
    with pytest.raises(ModelLoadError, match=r"trained on a sd model .* this sd3 model"):
        load_soft_tokens(unet_file, model=sd3_pipe.transformer)
    out = tmp_path / "o.png"
    argv = ["softrepa", "generate", "a red square", "--soft-tokens", str(unet_file), "--model", str(sd3_dir)]
    assert main([*argv, "-o", str(out), "--size", "32", "--steps", "1"]) == 2
    assert not out.exists()
    argv = ["softrepa", "generate", "a red square", "--soft-tokens", str(sd3_file), "--model", str(sd15_dir)]
    assert main([*argv, "-o", str(out), "--max-sequence-length", "4"]) == 2  # an MM-DiT option on a UNet
    assert not out.exists()


def test_options_of_the_other_architecture_are_refused_before_loading(tmp_path, data, sd15_dir, sd3_dir, capsys):
    argv = ["softrepa", "train", "--data", str(data), "-o", str(tmp_path / "t.safetensors"), "--device", "cpu"]
    assert main([*argv, "--model", str(sd15_dir), "--max-sequence-length", "0"]) == 2
    assert "--max-sequence-length is an MM-DiT option" in capsys.readouterr().err
    assert main([*argv, "--model", str(sd15_dir), "--layers", "2"]) == 2
    assert main([*argv, "--model", str(sd3_dir), "--time-layout", "per-token"]) == 2
    assert "--time-layout per-token is a UNet option" in capsys.readouterr().err
    assert not (tmp_path / "t.safetensors").exists()


def test_cli_trains_and_generates_on_an_sd3_folder(tmp_path, data, sd3_dir, capsys):
    tokens = tmp_path / "cli.safetensors"
    argv = ["softrepa", "train", "--data", str(data), "--model", str(sd3_dir), "-o", str(tokens), "--max-steps", "1"]
    argv += ["--batch-size", "2", "--resolution", "32", "--device", "cpu", "--no-progress", "--layers", "1"]
    assert main([*argv, "--num-tokens", "2", "--max-sequence-length", "6", "--val-fraction", "0.25"]) == 0
    soft = read_soft_tokens(tokens)
    assert soft.sites == ["transformer_blocks.0.attn"] and soft.num_tokens == 2
    out = tmp_path / "out.png"
    argv = ["softrepa", "generate", "a red square", "--soft-tokens", str(tokens), "--model", str(sd3_dir)]
    assert main([*argv, "-o", str(out), "--size", "32", "--steps", "2", "--max-sequence-length", "6"]) == 0
    assert Image.open(out).size == (32, 32)


def test_soft_token_controllers_follow_the_family(tmp_path, sd3_pipe):
    from editkit.tasks.loading import soft_token_controllers

    path = save_soft_tokens(_soft_for(sd3_pipe, "sd3"), tmp_path / "t.safetensors")
    (controller,) = soft_token_controllers(sd3_pipe, path, strength=0.5)
    assert isinstance(controller, MMDiTSoftTokenController) and controller.strength == 0.5


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


@pytest.mark.parametrize("fixture", ["sd3_pipe", "flux_pipe"])
def test_generate_task_uses_the_family_pipelines_defaults_when_unset(tmp_path, request, fixture):
    """Unset steps / guidance: StableDiffusion3Pipeline's 28 / 7.0, FLUX.1-dev's 28 / 3.5 (diffusers' and the
    model cards' values, not the UNet pipeline's 50 / 7.5), recorded as used."""
    from editkit.tasks import GenerateInputs, GenerateOptions, generate

    pipe = request.getfixturevalue(fixture)
    family = "flux" if fixture == "flux_pipe" else "sd3"
    path = save_soft_tokens(_soft_for(pipe, family), tmp_path / "t.safetensors")
    result = generate.run(pipe, GenerateInputs("a red square", path), GenerateOptions(size=32))
    expected = (28, 7.0) if family == "sd3" else (28, 3.5)
    used = result.records[0]["used"]
    assert (used["num_inference_steps"], used["guidance_scale"]) == expected
    assert len(pipe.scheduler.timesteps) == 28  # the pipeline ran the family's schedule


@pytest.mark.parametrize("kind", ["unet", "mmdit"])
def test_with_tensors_is_a_copy_holding_the_given_tensors(kind):
    """``with_tensors`` (the keep-best tokens of a run): a new module with the given tokens and time embedding,
    the same sites and file metadata; the original module is left as it was."""
    from editkit.softrepa import SoftTokens

    generator = torch.Generator().manual_seed(0)
    if kind == "mmdit":
        sites = ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]
        soft = MMDiTSoftTokens(torch.randn(2, 3, 32, generator=generator), sites, width=32, generator=generator)
    else:
        soft = SoftTokens(torch.randn(3, 32, generator=generator), ["down_blocks.0.attentions.0.transformer_blocks.0"
                          ".attn2"], time_buckets=4, base_model="tiny")  # fmt: skip
    before = {k: v.clone() for k, v in soft.tensors().items()}
    best = {k: torch.randn(v.shape, generator=generator) for k, v in before.items()}
    assert set(best) == {"tokens", "time_embedding"}
    copy = soft.with_tensors(best)
    assert type(copy) is type(soft) and copy is not soft and copy.metadata() == soft.metadata()
    for name, value in copy.tensors().items():
        torch.testing.assert_close(value, best[name], rtol=0, atol=0)
        torch.testing.assert_close(soft.tensors()[name], before[name], rtol=0, atol=0)
