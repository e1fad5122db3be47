"""Timing helpers shared by the benchmarks: interleaved medians, peak memory, JSON output.

These machines are noisy, so every figure is a ratio against a baseline measured in the same
run, with the measured configurations interleaved round by round.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device | str) -> None:
    """Wait for queued device work (CUDA) before reading a clock."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved_medians(
    runs: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1, device: str = "cpu"
) -> dict[str, dict[str, float]]:
    """Median and spread of each callable's wall and CPU time, the callables interleaved each round.

    ``cpu_median_s`` is the process CPU time (all threads): on a machine shared with other work it
    moves far less than wall time, so the CPU ratios are the contention-robust figures there.
    """
    for _ in range(warmup):
        for run in runs.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    cpu_times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            synchronize(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            run()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
    return {
        name: {
            "median_s": statistics.median(values),
            "min_s": min(values),
            "max_s": max(values),
            "cpu_median_s": statistics.median(cpu_times[name]),
        }
        for name, values in times.items()
    }


def peak_memory(run: Callable[[], object], device: str = "cpu") -> int | None:
    """Peak bytes allocated on a CUDA device during ``run`` (``None`` on CPU: not measurable)."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    run()
    return int(torch.cuda.max_memory_allocated())


def saved_activation_bytes(run: Callable[[], object], model: torch.nn.Module) -> int:
    """Activation bytes autograd saves for backward during ``run`` (unique storages, weights excluded).

    On CPU, where peak allocator statistics do not exist, this is the memory a backward pass costs.
    """
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        with contextlib.suppress(RuntimeError):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in weights:
                seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(seen.values())


def print_json(result: dict) -> None:
    """The benchmark's single JSON document on stdout."""
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")


def environment() -> dict[str, str]:
    """Versions and device, recorded with every result."""
    import diffusers

    info = {"torch": torch.__version__, "diffusers": diffusers.__version__, "threads": str(torch.get_num_threads())}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info
