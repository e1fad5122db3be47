"""SoftREPA training: only tokens learn, exact resume, two processes, data handling, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from editkit.cli import main
from editkit.errors import InputError
from editkit.softrepa import TrainConfig, initial_tokens, read_soft_tokens, train_soft_tokens

ROOT = Path(__file__).resolve().parents[1]


def _make_data(folder: Path, count: int = 8, unreadable: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        pixels = np.random.RandomState(index).randint(0, 255, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index}.png")
        rows.append({"file_name": f"{index}.png", "text": f"picture number {index}"})
    for index in range(unreadable):
        (folder / f"bad{index}.png").write_bytes(b"not an image")
        rows.append({"file_name": f"bad{index}.png", "text": f"broken {index}"})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    return folder


def _config(data, model, output, **overrides) -> TrainConfig:
    values = dict(
        data=data, model=model, output=output, max_steps=2, batch_size=2, resolution=64, device="cpu",
        progress=False, checkpoint_every=2, validate_every=2, val_fraction=0.25,
    )  # fmt: skip
    values.update(overrides)
    return TrainConfig(**values)


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _load(model_dir):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_gradients_reach_only_the_tokens(tmp_path, sd15_dir):
    pipe = _load(sd15_dir)
    weights = {
        f"{name}.{key}": value.clone()
        for name in ("unet", "vae", "text_encoder")
        for key, value in getattr(pipe, name).state_dict().items()
    }
    start = initial_tokens(pipe, 4)
    result = train_soft_tokens(
        _config(_make_data(tmp_path / "data"), sd15_dir, tmp_path / "t.safetensors", max_steps=1), pipe=pipe
    )
    after = {f"{n}.{k}": v for n in ("unet", "vae", "text_encoder") for k, v in getattr(pipe, n).state_dict().items()}
    assert weights.keys() == after.keys()
    assert all(torch.equal(weights[key], after[key]) for key in weights)
    assert result.steps == 1 and not torch.equal(result.tokens.tokens, start)
    assert sum(p.numel() for p in result.tokens.parameters()) < 1_000_000
    assert all(not p.requires_grad for p in pipe.unet.parameters())


def test_resume_from_another_configuration_is_refused(tmp_path, sd15_dir):
    data = _make_data(tmp_path / "data")
    first = train_soft_tokens(_config(data, sd15_dir, tmp_path / "t.safetensors", max_steps=1, checkpoint_every=1))
    changed = _config(
        data, sd15_dir, tmp_path / "t.safetensors", max_steps=2, learning_rate=5e-4, resume=first.checkpoint
    )
    with pytest.raises(InputError, match=r"different configuration.*learning_rate"):
        train_soft_tokens(changed)


def test_two_processes_under_accelerate_launch(tmp_path, sd15_dir):
    data = _make_data(tmp_path / "data")
    output = tmp_path / "dist.safetensors"
    command = [
        # --multi_gpu picks accelerate's torchrun launcher; --device cpu makes the processes gloo CPU workers
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--main_process_port", str(_free_port()),
        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "editkit.cli", "softrepa", "train",
        "--data", str(data), "--model", str(sd15_dir), "--output", str(output), "--max-steps", "2", "--device", "cpu",
        "--batch-size", "2", "--resolution", "64", "--gather-negatives", "--no-progress", "--checkpoint-every", "1",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    tokens = read_soft_tokens(output)
    assert tokens.num_tokens == 4 and tokens.width == 16 and len(tokens.sites) == 6
    assert done.stdout.count("wrote") == 1  # only the main process reports and writes
    from safetensors import safe_open

    checkpoints = sorted((tmp_path / "dist.checkpoints").glob("step-*.safetensors"))
    with safe_open(str(checkpoints[-1]), framework="pt") as reader:
        assert json.loads(reader.metadata()["fingerprint"])["num_processes"] == 2


def test_sdxl_training_step(tmp_path, sdxl_dir):
    result = train_soft_tokens(
        _config(
            _make_data(tmp_path / "data"),
            sdxl_dir,
            tmp_path / "xl.safetensors",
            max_steps=1,
            time_buckets=10,
            negative_bank=2,
        )
    )
    saved = read_soft_tokens(tmp_path / "xl.safetensors")
    assert saved.width == 32 and saved.time_buckets == 10 and any(s.startswith("mid_block") for s in saved.sites)
    assert result.tokens.time_embedding.abs().sum() > 0  # the bucket of the step was trained


# -- data and bad input ------------------------------------------------------------------------
def test_unreadable_images_are_skipped_and_counted(tmp_path, sd15_dir):
    data = _make_data(tmp_path / "data", count=4, unreadable=2)
    result = train_soft_tokens(
        _config(data, sd15_dir, tmp_path / "t.safetensors", max_steps=3, batch_size=2, val_fraction=0, seed=1)
    )
    assert result.steps == 3 and result.unreadable_images >= 1
    assert (tmp_path / "t.safetensors").is_file()


def test_csv_data_and_a_negative_bank_allow_batch_size_one(tmp_path, sd15_dir):
    data = _make_data(tmp_path / "images")
    rows = "\n".join(f"{i}.png,picture number {i}" for i in range(8))
    (tmp_path / "images" / "captions.csv").write_text(f"file_name,text\n{rows}\n", encoding="utf-8")
    config = _config(
        data / "captions.csv", sd15_dir, tmp_path / "t.safetensors", batch_size=1, negative_bank=2, max_steps=1
    )
    assert train_soft_tokens(config).steps == 1
    with pytest.raises(InputError, match="batch size 1"):
        train_soft_tokens(_config(data, sd15_dir, tmp_path / "u.safetensors", batch_size=1))


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "data not found"),
        ("empty", "is empty"),
        ("no_captions", "no captions"),
        ("all_blank", "no usable image-caption pairs"),
    ],
)
def test_bad_data_folders(tmp_path, sd15_dir, setup, message):
    folder = tmp_path / "data"
    if setup != "missing":
        folder.mkdir()
    if setup == "no_captions":
        Image.new("RGB", (8, 8)).save(folder / "a.png")
    if setup == "all_blank":
        Image.new("RGB", (8, 8)).save(folder / "a.png")
        (folder / "metadata.jsonl").write_text(
            '{"file_name": "a.png", "text": ""}\n{"file_name": "b.png", "text": "x"}\n'
        )
    with pytest.raises(InputError, match=message):
        train_soft_tokens(_config(folder, sd15_dir, tmp_path / "t.safetensors"))


def test_cli_refuses_an_existing_output_and_trains_with_overwrite(tmp_path, sd15_dir, capsys):
    data = _make_data(tmp_path / "data")
    output = tmp_path / "t.safetensors"
    output.write_bytes(b"old")
    args = ["softrepa", "train", "--data", str(data), "--model", str(sd15_dir), "--output", str(output)]
    args += ["--max-steps", "1", "--batch-size", "2", "--resolution", "64", "--device", "cpu", "--no-progress"]
    assert main(args) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err and output.read_bytes() == b"old"
    assert main([*args, "--overwrite", "--validate-every", "0"]) == 0
    assert read_soft_tokens(output).num_tokens == 4
    image = tmp_path / "g.png"
    generate = ["softrepa", "generate", "a picture", "--model", str(sd15_dir), "--soft-tokens", str(output)]
    assert main([*generate, "-o", str(image), "--steps", "2", "--size", "64", "--device", "cpu"]) == 0
    assert Image.open(image).size == (64, 64)
