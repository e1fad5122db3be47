"""Training checkpoints in safetensors: tokens, optimizer, scheduler, RNG states and step.

accelerate's ``save_state`` pickles the optimizer, scheduler and RNG states, and loading them
means unpickling; these checkpoints keep every tensor in safetensors and every other value as
JSON in its metadata, so resuming never loads a pickle.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from editkit.errors import InputError
from editkit.softrepa.tokens import SoftTokens, _read_safetensors

__all__ = ["latest_checkpoint", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_FORMAT = "editkit-softrepa-checkpoint"


def _optimizer_tensors(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, rng in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{index}"] = rng
    return tensors


def save_checkpoint(
    path: str | os.PathLike, soft_tokens: SoftTokens, optimizer, scheduler, *, step: int, fingerprint: dict, extra: dict
) -> Path:
    """Write a resumable checkpoint atomically."""
    from safetensors.torch import save_file

    from editkit.image import atomic_write

    tensors = {f"soft.{k}": v for k, v in soft_tokens.tensors().items()}
    optimizer_tensors, optimizer_rest = _optimizer_tensors(optimizer)
    tensors.update(optimizer_tensors)
    tensors.update(_rng_tensors())
    metadata = {
        **soft_tokens.metadata(),
        "format": CHECKPOINT_FORMAT,
        "step": str(step),
        "fingerprint": json.dumps(fingerprint, sort_keys=True),
        "optimizer": json.dumps(optimizer_rest),
        "scheduler": json.dumps(scheduler.state_dict()),
        "extra": json.dumps(extra),
    }
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), overwrite=True)


def _restore_optimizer(optimizer, tensors: dict[str, torch.Tensor], rest: dict) -> None:
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for key, value in rest["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": rest["param_groups"]})


def load_checkpoint(path: str | os.PathLike, soft_tokens: SoftTokens, optimizer, scheduler, *, fingerprint: dict):
    """Restore tokens, optimizer, scheduler and RNG from ``path``; returns ``(step, extra)``.

    A checkpoint written with another configuration is refused, naming the settings that differ.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"checkpoint not found: {path}")
    tensors, metadata = _read_safetensors(path)
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path} is not an editkit SoftREPA training checkpoint")
    saved = json.loads(metadata["fingerprint"])
    differing = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
    if differing:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {fingerprint.get(k)!r}" for k in differing[:4])
        raise InputError(f"{path} was written by a run with a different configuration ({details})")
    with torch.no_grad():
        soft_tokens.tokens.copy_(tensors["soft.tokens"])
        if soft_tokens.time_embedding is not None:
            soft_tokens.time_embedding.copy_(tensors["soft.time_embedding"])
    _restore_optimizer(optimizer, tensors, json.loads(metadata["optimizer"]))
    scheduler.load_state_dict(json.loads(metadata["scheduler"]))
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    return int(metadata["step"]), json.loads(metadata["extra"])


def latest_checkpoint(folder: str | os.PathLike) -> Path:
    """The checkpoint with the highest step in ``folder``."""
    folder = Path(folder)
    found = sorted(folder.glob("step-*.safetensors")) if folder.is_dir() else []
    if not found:
        raise InputError(f"no checkpoints (step-*.safetensors) in {folder}")
    return found[-1]
