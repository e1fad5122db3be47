"""Training checkpoints in safetensors: tokens, best tokens, optimizer, scheduler, RNG state, step, log.

accelerate's ``save_state`` pickles the optimizer, scheduler and RNG states, and loading them
means unpickling; these checkpoints keep every tensor in safetensors and every other value as
JSON in its metadata, so resuming never loads a pickle. :func:`load_checkpoint` validates the
whole file against the live run (the one place that does) before it restores anything, so a
refused checkpoint leaves the run untouched.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from editkit.errors import InputError, ModelLoadError
from editkit.softrepa.files import (
    MAX_TOKEN_ABS,
    check_tensor,
    parse_int,
    parse_json,
    read_safetensors,
    refuse_unexpected,
    write_safetensors,
)
from editkit.softrepa.tokens import SoftTokens

__all__ = ["latest_checkpoint", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_FORMAT = "editkit-softrepa-checkpoint"
ADAM_STATE = ("exp_avg", "exp_avg_sq")


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


def save_checkpoint(
    path: str | os.PathLike,
    soft_tokens: SoftTokens,
    optimizer,
    scheduler,
    *,
    step: int,
    fingerprint: dict,
    extra: dict,
    best: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a resumable checkpoint atomically (a full disk: :class:`InputError`, nothing partial).

    ``best``: the tensors of the best tokens so far (what the token file holds), so a run
    resumed into another output writes the same token file.
    """
    tensors = {f"soft.{k}": v for k, v in soft_tokens.tensors().items()}
    tensors.update({f"best.{k}": v for k, v in (best or {}).items()})
    optimizer_tensors, optimizer_rest = _optimizer_tensors(optimizer)
    tensors.update(optimizer_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    metadata = {
        **soft_tokens.metadata(),
        "format": CHECKPOINT_FORMAT,
        "step": str(step),
        "fingerprint": json.dumps(fingerprint, sort_keys=True),
        "optimizer": json.dumps(optimizer_rest),
        "scheduler": json.dumps(scheduler.state_dict()),
        "extra": json.dumps(extra),
    }
    return write_safetensors(path, tensors, metadata, overwrite=True)


def _check_fingerprint(metadata: dict[str, str], path: Path, fingerprint: dict) -> None:
    saved = parse_json(metadata, "fingerprint", path, dict)
    differing = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
    if differing:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {fingerprint.get(k)!r}" for k in differing[:4])
        raise InputError(f"{path} was written by a run with a different configuration ({details})")


def _check_optimizer(tensors, metadata, path: Path, optimizer, step: int) -> dict:
    """The optimizer state dict of the file, checked against the live AdamW (shapes, groups, counts)."""
    rest = parse_json(metadata, "optimizer", path, dict)
    groups, scalars = rest.get("param_groups"), rest.get("scalars")
    live = optimizer.state_dict()["param_groups"]
    if not isinstance(groups, list) or not isinstance(scalars, dict) or len(groups) != len(live):
        raise ModelLoadError(f"{path}: the optimizer state does not match this run's optimizer")
    for saved, current in zip(groups, live, strict=True):
        if not isinstance(saved, dict) or set(saved) != set(current) or saved["params"] != current["params"]:
            raise ModelLoadError(f"{path}: the optimizer's parameter groups do not match this run")
        for key, value in saved.items():
            if key != "params" and isinstance(current[key], float) and not isinstance(value, (int, float)):
                raise ModelLoadError(f"{path}: optimizer setting {key!r} is not a number")
    if scalars:
        raise ModelLoadError(f"{path}: unexpected optimizer values {sorted(scalars)[:3]}")
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for index, parameter in enumerate(parameters):
        if step == 0:
            continue  # no optimizer step yet: no state
        entry = {name: check_tensor(tensors, f"optimizer.{index}.{name}", path, parameter.shape) for name in ADAM_STATE}
        entry["step"] = check_tensor(tensors, f"optimizer.{index}.step", path, ())
        if entry["step"].item() != step:
            raise ModelLoadError(f"{path}: the optimizer made {entry['step'].item():g} steps, the checkpoint {step}")
        state[index] = entry
    return {"state": state, "param_groups": groups}


def _check_scheduler(metadata, path: Path, scheduler) -> dict:
    saved = parse_json(metadata, "scheduler", path, dict)
    live = scheduler.state_dict()
    if set(saved) != set(live):
        raise ModelLoadError(f"{path}: the learning-rate scheduler state does not match this run's scheduler")
    for key, value in live.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = saved[key]
            if not isinstance(number, (int, float)) or isinstance(number, bool) or not math.isfinite(number):
                raise ModelLoadError(f"{path}: scheduler value {key!r} is not a finite number")
    return saved


def _check_extra(metadata, path: Path, step: int) -> dict:
    extra = parse_json(metadata, "extra", path, dict)
    best, stale, losses, log = extra.get("best"), extra.get("stale"), extra.get("losses"), extra.get("log")
    accuracies = extra.get("accuracies")

    def numbers(value) -> bool:
        return isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)

    if best is not None and not (numbers(best) and len(best) == 2):
        raise ModelLoadError(f"{path}: the best validation metric must be a pair of numbers")
    if not isinstance(stale, int) or isinstance(stale, bool) or stale < 0:
        raise ModelLoadError(f"{path}: the patience count must be a whole number >= 0")
    if not numbers(losses) or len(losses) != step or not numbers(accuracies) or len(accuracies) != step:
        raise ModelLoadError(f"{path}: the loss and accuracy histories must hold {step} numbers each")
    if not isinstance(log, list) or not all(isinstance(entry, dict) for entry in log):
        raise ModelLoadError(f"{path}: the training log must be a list of objects")
    return {"best": best, "stale": stale, "losses": losses, "accuracies": accuracies, "log": log}


def _check_soft(tensors, path: Path, soft_tokens: SoftTokens, prefix: str) -> dict[str, torch.Tensor]:
    return {
        name: check_tensor(tensors, f"{prefix}.{name}", path, tuple(value.shape), bound=MAX_TOKEN_ABS)
        for name, value in soft_tokens.tensors().items()
    }


def read_checkpoint(path: Path, soft_tokens: SoftTokens, optimizer, scheduler, *, fingerprint: dict) -> dict:
    """Validate a checkpoint against the live run (every field and tensor); returns what to restore."""
    tensors, metadata = read_safetensors(path, "checkpoint")
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path} is not an editkit SoftREPA training checkpoint")
    _check_fingerprint(metadata, path, fingerprint)
    step = parse_int(metadata, "step", path)
    extra = _check_extra(metadata, path, step)
    soft = _check_soft(tensors, path, soft_tokens, "soft")
    best = _check_soft(tensors, path, soft_tokens, "best") if any(k.startswith("best.") for k in tensors) else None
    if (best is None) != (extra["best"] is None):
        raise ModelLoadError(f"{path}: the best tokens and the best metric must be saved together")
    rng = tensors.get("rng.torch")
    live_rng = torch.get_rng_state()
    if rng is None or rng.dtype != live_rng.dtype or rng.shape != live_rng.shape:
        raise ModelLoadError(f"{path}: the RNG state is missing or has the wrong size")
    optimizer_state = _check_optimizer(tensors, metadata, path, optimizer, step)
    expected = {f"soft.{k}" for k in soft} | {f"best.{k}" for k in best or {}} | {"rng.torch"}
    expected |= {f"optimizer.{i}.{n}" for i in optimizer_state["state"] for n in (*ADAM_STATE, "step")}
    refuse_unexpected(tensors, expected, path)
    scheduler_state = _check_scheduler(metadata, path, scheduler)
    return {
        "step": step, "extra": extra, "soft": soft, "best": best, "rng": rng,
        "optimizer": optimizer_state, "scheduler": scheduler_state,
    }  # fmt: skip


def load_checkpoint(path: str | os.PathLike, soft_tokens: SoftTokens, optimizer, scheduler, *, fingerprint: dict):
    """Restore tokens, optimizer, scheduler and RNG from ``path``; returns ``(step, extra, best_tensors)``.

    A checkpoint written with another configuration is refused, naming the settings that differ;
    a damaged or crafted one is refused naming the field, before anything is restored.
    """
    path = Path(path).expanduser()
    state = read_checkpoint(path, soft_tokens, optimizer, scheduler, fingerprint=fingerprint)
    with torch.no_grad():
        soft_tokens.tokens.copy_(state["soft"]["tokens"])
        if soft_tokens.time_embedding is not None:
            soft_tokens.time_embedding.copy_(state["soft"]["time_embedding"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    return state["step"], state["extra"], state["best"]


def latest_checkpoint(folder: str | os.PathLike) -> Path:
    """The checkpoint with the highest step in ``folder``."""
    folder = Path(folder)
    found = sorted(folder.glob("step-*.safetensors")) if folder.is_dir() else []
    if not found:
        raise InputError(f"no checkpoints (step-*.safetensors) in {folder}")
    return found[-1]
