"""SoftREPA as the reference release trains it (issue 18): time tokens, their buckets, the LR schedule.

The expected values are written from the reference's description (method note), not from
editkit's code: ``Embedding(100, dim)`` with N(0, 0.02) init, bucket ``t // 10`` on the 0-999
scale, ``CosineAnnealingWarmRestarts(T_0=10, eta_min=1e-5)`` stepped once per 500 iterations.
"""

from __future__ import annotations

import json
import math

import bad_inputs as bad
import pytest
import torch
from test_softrepa_train import _config, _make_data

from editkit.cli import main
from editkit.errors import InputError, ModelLoadError
from editkit.softrepa import (
    SoftTokenController,
    SoftTokens,
    TrainConfig,
    default_sites,
    read_soft_tokens,
    save_soft_tokens,
    train_soft_tokens,
    use_soft_tokens,
)
from editkit.softrepa.config import check_config
from editkit.softrepa.train import learning_rate_schedule

WIDTH, M = 16, 4


def _tokens(**kwargs) -> SoftTokens:
    return SoftTokens(torch.zeros(M, WIDTH), ["down_blocks.0.attentions.0.transformer_blocks.0.attn2"], **kwargs)


def test_time_tokens_are_one_embedding_row_per_bucket_initialised_n_0_002():
    soft = _tokens(time_buckets=100, generator=torch.Generator().manual_seed(0))
    assert soft.time_embedding.shape == (100, WIDTH)  # Embedding(100, dim), shared by the m tokens
    values = soft.time_embedding.detach().flatten()
    assert abs(values.std().item() - 0.02) < 0.002 and abs(values.mean().item()) < 0.002
    inserted = soft.tokens_for(None, 537)
    assert inserted.shape == (M, WIDTH)
    for row in range(M):  # every token gets the same vector of bucket 53
        torch.testing.assert_close(inserted[row], soft.time_embedding[53], rtol=0, atol=0)
    per_token = _tokens(time_buckets=100, time_layout="per-token")
    assert per_token.time_embedding.shape == (100, M, WIDTH) and not per_token.time_embedding.any()
    assert sum(p.numel() for p in soft.parameters()) == M * WIDTH + 100 * WIDTH


def _scheduler_timesteps(name: str) -> list[float]:
    import diffusers

    scheduler = getattr(diffusers, name)(num_train_timesteps=1000)
    scheduler.set_timesteps(30)
    return [float(t) for t in scheduler.timesteps]


@pytest.mark.parametrize(
    "scheduler",
    ["DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler", "LMSDiscreteScheduler", "DPMSolverMultistepScheduler"],
)
def test_every_scheduler_timestep_maps_to_its_reference_bucket(scheduler):
    soft = _tokens(time_buckets=100)
    timesteps = _scheduler_timesteps(scheduler)
    assert timesteps and any(t >= 900 for t in timesteps)
    for t in timesteps:
        assert soft.bucket(t) == min(int(t) // 10, 99)  # t // 10 on the 0-999 scale
        assert soft.bucket(torch.tensor([t, 3.0])) == min(int(t) // 10, 99)  # a batch of equal timesteps


def test_bucket_edges_fractions_and_t_1000():
    soft = _tokens(time_buckets=100)
    cases = {0: 0, 9: 0, 9.999: 0, 10: 1, 10.5: 1, 537.2: 53, 989.9: 98, 999: 99, 999.9: 99, 1000: 99, -3: 0}
    assert {t: soft.bucket(t) for t in cases} == cases
    coarse = _tokens(time_buckets=10)
    assert [coarse.bucket(t) for t in (0, 99.9, 100, 999, 1000)] == [0, 0, 1, 9, 9]
    with pytest.raises(ValueError, match="not finite"):
        soft.bucket(float("nan"))


def _reference_lr(iteration: int, lr=1e-3, eta_min=1e-5, t_0=10, every=500) -> float:
    """CosineAnnealingWarmRestarts(T_0=10) stepped once per 500 iterations, written out."""
    epoch = (iteration // every) % t_0
    return eta_min + (lr - eta_min) * (1 + math.cos(math.pi * epoch / t_0)) / 2


def test_learning_rate_schedule_is_the_reference_one():
    config = TrainConfig(data=".", model=".", output="t.safetensors")
    assert (config.restart_every, config.lr_step_every, config.learning_rate, config.min_learning_rate) == (
        5000, 500, 1e-3, 1e-5,
    )  # fmt: skip
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=config.learning_rate)
    scheduler = learning_rate_schedule(optimizer, config)
    rates = []
    for iteration in range(12_000):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if (iteration + 1) % config.lr_step_every == 0:  # as the training loop steps it
            scheduler.step()
    for iteration in (0, 499, 500, 2500, 4999, 5000, 7499, 11_999):
        assert rates[iteration] == pytest.approx(_reference_lr(iteration), rel=1e-9), iteration
    assert rates[4999] < 4e-5 and rates[5000] == pytest.approx(1e-3)  # decays to ~1e-5, restarts at 5000
    assert len(set(rates[:500])) == 1  # constant over each 500 iterations


def test_training_defaults_follow_the_reference_and_the_cli_agrees():
    from editkit.cli import build_parser

    config = TrainConfig(data=".", model=".", output="t.safetensors")
    assert (config.time_buckets, config.time_layout, config.resolution) == (100, "shared", 512)
    args = build_parser().parse_args(["softrepa", "train", "--data", ".", "-o", "t.safetensors"])
    for name in ("time_buckets", "time_layout", "resolution", "restart_every", "lr_step_every", "learning_rate"):
        assert getattr(args, name) == getattr(config, name), name
    with pytest.raises(InputError, match="multiple of --lr-step-every"):
        check_config(TrainConfig(data=".", model=".", output="t.safetensors", restart_every=700), 1)


def test_trained_shared_time_tokens_and_their_file(tmp_path, sd15_dir):
    data = _make_data(tmp_path / "data")
    result = train_soft_tokens(_config(data, sd15_dir, tmp_path / "t.safetensors", max_steps=1, validate_every=0))
    saved = read_soft_tokens(tmp_path / "t.safetensors")
    assert saved.time_layout == "shared" and saved.time_embedding.shape == (100, WIDTH)
    assert torch.equal(saved.time_embedding, result.tokens.time_embedding)
    start = SoftTokens(
        torch.zeros(4, WIDTH), saved.sites, time_buckets=100, generator=torch.Generator().manual_seed(0)
    ).time_embedding
    changed = (saved.time_embedding - start).abs().max(dim=1).values > 1e-6  # AdamW's decay moves all rows ~1e-9
    assert changed.sum() == 1  # one timestep per step: only its bucket's row learned


def test_version_1_files_read_as_the_per_token_layout_and_bad_layouts_are_refused(tmp_path):
    per_token = _tokens(time_buckets=10, time_layout="per-token")
    with torch.no_grad():
        per_token.time_embedding.normal_()
    path = save_soft_tokens(per_token, tmp_path / "v2.safetensors")
    old = bad.rewritten_safetensors(
        path, tmp_path, "v1.safetensors", metadata={"format_version": "1", "time_layout": None}
    )
    loaded = read_soft_tokens(old)
    assert loaded.time_layout == "per-token" and torch.equal(loaded.time_embedding, per_token.time_embedding)
    shared_as_v1 = bad.rewritten_safetensors(
        old, tmp_path, "bad.safetensors", tensors={"time_embedding": torch.zeros(10, WIDTH)}
    )
    with pytest.raises(ModelLoadError, match=r"'time_embedding' has shape \(10, 16\), expected \(10, 4, 16\)"):
        read_soft_tokens(shared_as_v1)
    unknown = bad.rewritten_safetensors(path, tmp_path, "u.safetensors", metadata={"time_layout": "diagonal"})
    with pytest.raises(ModelLoadError, match="unknown time layout"):
        read_soft_tokens(unknown)


def test_tokens_reach_both_cfg_branches_of_a_pipeline_and_perturbing_them_changes_the_image(sd15_pipe):
    unet = sd15_pipe.unet
    tokens = torch.randn(M, WIDTH, generator=torch.Generator().manual_seed(1))
    soft = SoftTokens(tokens, default_sites(unet), time_buckets=100)
    controller = SoftTokenController(soft)
    seen = []
    original = controller.on_context

    def on_context(site, context):
        out = original(site, context)
        seen.append(out[:, 1 : 1 + M].detach().clone())
        return out

    controller.on_context = on_context

    def image(strength=1.0):
        controller.strength = strength
        with use_soft_tokens(unet, controller), torch.no_grad():
            return sd15_pipe(
                "a cat", num_inference_steps=2, guidance_scale=5.0, height=64, width=64, output_type="pt",
                generator=torch.Generator().manual_seed(0),
            ).images  # fmt: skip

    plain = image(0.0)
    seen.clear()
    first = image()
    assert seen and all(rows.shape[0] == 2 for rows in seen)  # uncond and cond rows in one batch
    assert all(torch.equal(rows[0], rows[1]) for rows in seen)  # the same tokens in both branches
    with torch.no_grad():
        soft.tokens.add_(2.0 * torch.randn(M, WIDTH, generator=torch.Generator().manual_seed(2)))
    second = image()
    assert (first - second).abs().max() > 1e-4 and (first - plain).abs().max() > 1e-4  # a tiny random model
    assert torch.equal(image(0.0), plain)


def test_train_prints_one_line_per_evaluation_and_writes_the_same_log(tmp_path, sd15_dir, capsys):
    data = _make_data(tmp_path / "data")
    output = tmp_path / "t.safetensors"
    argv = ["softrepa", "train", "--data", str(data), "--model", str(sd15_dir), "-o", str(output), "--no-progress"]
    argv += ["--batch-size", "2", "--resolution", "64", "--device", "cpu", "--max-steps", "4"]
    assert main([*argv, "--validate-every", "2", "--val-fraction", "0.25"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    log = json.loads((tmp_path / "t.log.json").read_text())
    assert [entry["step"] for entry in log] == [2, 4] and len(lines) == 2
    for line, entry in zip(lines, log, strict=True):
        assert line.startswith(f"step {entry['step']}: loss {entry['loss']:.4f}, train contrastive accuracy ")
        assert f"held-out accuracy {entry['val_accuracy']:.3f}" in line and f"best {entry['best_accuracy']:.3f}" in line
        assert 0 <= entry["train_accuracy"] <= 1 and entry["learning_rate"] == pytest.approx(1e-3)
    assert log[1]["best_accuracy"] == max(log[0]["val_accuracy"], log[1]["val_accuracy"])
