"""SoftREPA training runs that stop and resume: exact resumes, locks, full disks, diverging tokens."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import bad_inputs as bad
import pytest
import torch
from test_softrepa_train import _config, _make_data

from editkit.cli import main
from editkit.errors import InputError, NumericalError
from editkit.softrepa import train as train_module
from editkit.softrepa import train_soft_tokens
from editkit.softrepa.runfiles import training_lock

ROOT = Path(__file__).resolve().parents[1]
# Evaluations every 2 steps, a checkpoint every step, patience that counts but never stops.
RUN = dict(max_steps=6, checkpoint_every=1, validate_every=2, patience=5, val_fraction=0.5, seed=3)


class Killed(BaseException):
    """Stands for kill -9 right after a checkpoint file is complete (nothing after it runs)."""


def _files(output: Path) -> tuple[bytes, bytes]:
    return output.read_bytes(), output.with_name(f"{output.stem}.log.json").read_bytes()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, sd15_dir):
    folder = tmp_path_factory.mktemp("reference")
    data = _make_data(folder / "data")
    result = train_soft_tokens(_config(data, sd15_dir, folder / "full.safetensors", **RUN))
    assert len(result.log) == 3 and result.log[-1]["step"] == 6
    return data, _files(folder / "full.safetensors")


@pytest.mark.parametrize("kill_after", [3, 4])
def test_killed_after_checkpoints_resumes_bit_identically(tmp_path, sd15_dir, reference, monkeypatch, kill_after):
    data, expected = reference
    real_save = train_module.ckpt.save_checkpoint
    saves = []

    def save_then_die(path, *args, **kwargs):
        written = real_save(path, *args, **kwargs)
        saves.append(path)
        if len(saves) == kill_after:
            raise Killed
        return written

    monkeypatch.setattr(train_module.ckpt, "save_checkpoint", save_then_die)
    output = tmp_path / "run.safetensors"
    with pytest.raises(Killed):
        train_soft_tokens(_config(data, sd15_dir, output, **RUN))
    monkeypatch.setattr(train_module.ckpt, "save_checkpoint", real_save)
    folder = tmp_path / "run.checkpoints"
    killed = shutil.copytree(folder, tmp_path / "killed")
    train_soft_tokens(_config(data, sd15_dir, output, resume=folder, **RUN))
    assert _files(output) == expected  # token file and log, byte for byte
    # Resuming the killed run's checkpoint into a new -o writes that token file too.
    other = tmp_path / "other.safetensors"
    train_soft_tokens(_config(data, sd15_dir, other, resume=killed / f"step-{kill_after:07d}.safetensors", **RUN))
    assert _files(other) == expected


def test_kill_9_of_the_cli_after_several_checkpoints_resumes_exactly(tmp_path, sd15_dir, reference):
    data, expected = reference
    output = tmp_path / "cli.safetensors"
    argv = [
        sys.executable, "-m", "editkit.cli", "softrepa", "train", "--data", str(data), "--model", str(sd15_dir),
        "-o", str(output), "--batch-size", "2", "--resolution", "64", "--device", "cpu", "--no-progress",
        "--max-steps", "6", "--checkpoint-every", "1", "--validate-every", "2", "--patience", "5",
        "--val-fraction", "0.5", "--seed", "3",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    third = tmp_path / "cli.checkpoints" / "step-0000003.safetensors"
    deadline = time.monotonic() + 120
    while not third.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert third.exists(), process.stderr.read().decode()[-2000:]
    done = subprocess.run([*argv, "--resume", str(third.parent)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _files(output) == expected
    assert done.stdout.count("step 6: loss") == 1 and "held-out accuracy" in done.stdout


def test_a_second_training_on_the_same_output_is_refused(tmp_path, sd15_dir, capsys):
    data = _make_data(tmp_path / "data")
    output = tmp_path / "t.safetensors"
    config = _config(data, sd15_dir, output, max_steps=1)
    with training_lock(config.checkpoint_dir):  # another run holds it
        with pytest.raises(InputError, match="another training is running"):
            train_soft_tokens(config)
        argv = ["softrepa", "train", "--data", str(data), "--model", str(sd15_dir), "-o", str(output)]
        assert main([*argv, "--max-steps", "1", "--batch-size", "2", "--resolution", "64", "--device", "cpu"]) == 2
        assert "another training is running" in capsys.readouterr().err
    assert not output.exists()
    assert train_soft_tokens(config).steps == 1  # the lock is released with its holder


def test_tokens_that_diverge_stop_the_run_before_anything_is_written(tmp_path, sd15_dir):
    data = _make_data(tmp_path / "data")
    config = _config(data, sd15_dir, tmp_path / "t.safetensors", max_steps=4, learning_rate=1e6, checkpoint_every=1)
    with pytest.raises(NumericalError, match="non-finite or exploded at step 1"):
        train_soft_tokens(config)  # an AdamW step of ~1e6 takes the tokens past +-1e4
    assert not config.output.exists() and not list(config.checkpoint_dir.glob("step-*"))


def test_resuming_from_nan_tokens_is_refused(tmp_path, sd15_dir, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    data = _make_data(tmp_path / "data")
    output = tmp_path / "t.safetensors"
    good = train_soft_tokens(_config(data, sd15_dir, output, max_steps=1, checkpoint_every=1))
    with safe_open(str(good.checkpoint), framework="pt") as reader:
        tensors, metadata = {k: reader.get_tensor(k) for k in reader.keys()}, reader.metadata()  # noqa: SIM118
    tensors["soft.tokens"][0, 0] = float("nan")
    crafted = tmp_path / "nan.safetensors"
    save_file(tensors, str(crafted), metadata=metadata)
    argv = ["softrepa", "train", "--data", str(data), "--model", str(sd15_dir), "-o", str(output), "--resume"]
    argv += [str(crafted), "--max-steps", "2", "--batch-size", "2", "--resolution", "64", "--device", "cpu"]
    argv += ["--checkpoint-every", "2", "--validate-every", "2", "--val-fraction", "0.25", "--no-progress"]
    assert main(argv) == 2
    assert "'soft.tokens' holds NaN" in capsys.readouterr().err


@pytest.fixture
def full_disk(tmp_path):
    """A 256 kB tmpfs, filled up (needs root and mount; skipped elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def _fill(folder: Path) -> None:
    with open(folder / "filler", "wb", buffering=0) as handle:
        for size in (4096, 512, 1):
            try:
                while True:
                    handle.write(b"\0" * size)
            except OSError:
                pass


def test_full_disk_during_training_exits_2_and_keeps_the_last_checkpoint(tmp_path, sd15_dir, full_disk, capsys):
    data = _make_data(tmp_path / "data")
    first = train_soft_tokens(_config(data, sd15_dir, tmp_path / "t.safetensors", max_steps=2, checkpoint_every=1))
    checkpoints = full_disk / "t.checkpoints"
    shutil.copytree(first.checkpoint.parent, checkpoints)
    kept = {path.name: path.read_bytes() for path in checkpoints.glob("step-*")}
    _fill(full_disk)
    output = full_disk / "t.safetensors"
    argv = ["softrepa", "train", "--data", str(data), "--model", str(sd15_dir), "-o", str(output), "--resume"]
    argv += [str(checkpoints), "--max-steps", "4", "--batch-size", "2", "--resolution", "64", "--device", "cpu"]
    argv += ["--checkpoint-every", "1", "--validate-every", "2", "--val-fraction", "0.25", "--no-progress"]
    assert main(argv) == 2
    assert "no space left" in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in checkpoints.glob("step-*")} == kept
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler", "t.checkpoints"]  # no partial token file
    assert sorted(p.name for p in checkpoints.iterdir()) == [".lock", *sorted(kept)]


# -- crafted checkpoints (issue 15, item 9): every field and tensor checked against the run ---------
def _train_argv(data, model, output) -> list[str]:
    argv = ["softrepa", "train", "--data", str(data), "--model", str(model), "-o", str(output), "--no-progress"]
    return [*argv, "--batch-size", "2", "--resolution", "64", "--device", "cpu", "--checkpoint-every", "1"]


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory, sd15_dir):
    folder = tmp_path_factory.mktemp("good-checkpoint")
    data = _make_data(folder / "data")
    assert main([*_train_argv(data, sd15_dir, folder / "t.safetensors"), "--max-steps", "2"]) == 0
    return data, folder / "t.checkpoints" / "step-0000002.safetensors"


def _crafted(metadata=None, drop=(), tensors=None):
    return lambda folder, source: bad.rewritten_safetensors(
        source, folder, "crafted.safetensors", metadata=metadata, drop=drop, tensors=tensors
    )


def _json_edit(key: str, change):
    """A builder that rewrites the JSON metadata field ``key`` with ``change(value)``."""

    def build(folder, source):
        from safetensors import safe_open

        with safe_open(str(source), framework="pt") as reader:
            value = json.loads(reader.metadata()[key])
        return _crafted({key: json.dumps(change(value))})(folder, source)

    return build


CHECKPOINT_CASES = {
    "missing fingerprint": (_crafted({"fingerprint": None}), "'fingerprint' is missing"),
    "fingerprint nested 20,000 deep": (_crafted({"fingerprint": "[" * 20000 + "]" * 20000}), "nested too deeply"),
    "non-numeric step": (_crafted({"step": "two"}), "'step' is not a whole number"),
    "step that disagrees with the history": (_crafted({"step": "5"}), "must hold 5 numbers"),
    "empty optimizer state": (_crafted(drop=("optimizer.",)), "'optimizer.0.exp_avg' is missing"),
    "optimizer groups of another run": (_json_edit("optimizer", lambda v: {**v, "param_groups": []}), "optimizer"),
    "extra state a list": (_crafted({"extra": "[]"}), "'extra' has the wrong type"),
    "extra state empty": (_crafted({"extra": "{}"}), "patience count"),
    "empty scheduler state": (_crafted({"scheduler": "{}"}), "scheduler state does not match"),
    "non-numeric scheduler value": (_json_edit("scheduler", lambda v: {**v, "T_cur": "x"}), "'T_cur' is not a finite"),
    "scheduler NaN constant": (_crafted({"scheduler": '{"T_cur": NaN}'}), "'scheduler' is not valid JSON"),
    "RNG state of the wrong size": (_crafted(tensors={"rng.torch": torch.zeros(7, dtype=torch.uint8)}), "RNG state"),
    "tokens of another shape": (_crafted(tensors={"soft.tokens": torch.zeros(3, 16)}), "'soft.tokens' has shape"),
    "Inf best tokens": (_crafted(tensors={"best.tokens": torch.full((4, 16), float("inf"))}), "NaN or infinite"),
    "unexpected tensor": (_crafted(tensors={"other": torch.zeros(1)}), "unexpected tensor"),
    "header is a JSON list": (lambda folder, source: bad.raw_safetensors(folder, "l.safetensors", b"[]"), "readable"),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_crafted_checkpoints_exit_2(tmp_path, sd15_dir, good_checkpoint, capsys, case):
    data, source = good_checkpoint
    build, fragment = CHECKPOINT_CASES[case]
    crafted = build(tmp_path, source)
    output = tmp_path / "resumed.safetensors"
    argv = [*_train_argv(data, sd15_dir, output), "--max-steps", "3", "--resume", str(crafted)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("editkit: error:")]
    assert len(errors) == 1 and fragment in errors[0] and "Traceback" not in err, err[-800:]
    assert not output.exists()
