"""Compiled method runs against compiled stock diffusers, the same ``torch.compile`` mode (speed; for CUDA).

For every method of ``benchmarks.opcount`` (the same runs) and its stock baseline (diffusers' plain
generation with stock processors; a stock UNet forward for the pass-through), on the full-size
SD 1.5 UNet with random weights: seconds per run eager and compiled, medians over ``--repeats``
after one first call whose time (compilation included) is ``first_call_s``. Figures: compiled
speed-up per method, and method / stock in each mode (what a method costs on top of the same
compiled diffusers). Dynamo's caches are reset before each method, so each first call pays its own
compilation. The JSON is rewritten to ``--output`` after every method, so a time limit keeps the
finished ones.

    python -m benchmarks.compiled_speed --size 512 --steps 20 --mode reduce-overhead --output out.json
    python -m benchmarks.compiled_speed --dry-run   # tiny models on the CPU, dynamo off: checks the plumbing
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.opcount import PROMPT, methods
from benchmarks.timing import environment, interleaved_medians, print_json, synchronize

DEFAULT_METHODS = ("pass_through", "stylize", "edit_dual", "compose_stage1", "soft_token_generation")


def _stock_forward(pipe, size: int) -> Callable[[], object]:
    """The pass-through's baseline: the same UNet forward with diffusers' stock processors."""
    device, dtype = pipe.unet.device, pipe.unet.dtype
    sample = torch.randn(2, 4, size // 8, size // 8, device=device, dtype=dtype)
    context = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, device=device, dtype=dtype)

    def run():
        with torch.no_grad():
            pipe.unet(sample, torch.tensor(500, device=device), encoder_hidden_states=context)

    return run


def _time(run: Callable[[], object], repeats: int, device: str) -> dict:
    """First call (compilation included when compiled), then medians of ``repeats`` calls."""
    import time

    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    first = time.perf_counter() - start
    return {"first_call_s": first, **interleaved_medians({"run": run}, repeats, warmup=0, device=device)["run"]}


def methods_for(args) -> dict:
    """``benchmarks.opcount``'s runs at this size, plus the pass-through's baseline."""
    return {
        **methods(args.size, args.steps, args.iterations),
        "stock_forward": lambda pipe: _stock_forward(pipe, args.size),
    }


def baseline(name: str) -> str:
    return "stock_forward" if name == "pass_through" else "plain_generation"


def measure_all(pipe, names: list[str], args, compiled: bool) -> dict:
    """Seconds of each run in one mode (dynamo's caches reset before each compiled one)."""
    table, result = methods_for(args), {}
    for name in names:
        if compiled:
            torch._dynamo.reset()
        result[name] = _time(table[name](pipe), args.repeats, args.device)
    return result


def build_pipe(args):
    """The stock ``StableDiffusionPipeline`` the methods are made from (``from_pipe``)."""
    from diffusers import StableDiffusionPipeline

    if args.dry_run:
        from editkit.testing import tiny_sd15_pipeline

        return tiny_sd15_pipeline(seed=0, words=PROMPT.split())
    from editkit.testing import full_size_sd15_components

    dtype = torch.float16 if args.device == "cuda" else torch.float32
    parts = full_size_sd15_components(dtype, args.device, words=PROMPT.split())
    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=20, help="denoising / inversion steps")
    parser.add_argument("--iterations", type=int, default=10, help="edit optimisation iterations")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--mode", default="default", help="torch.compile mode for both sides (default, reduce-overhead, ...)"
    )
    parser.add_argument("--methods", nargs="*", default=list(DEFAULT_METHODS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", type=Path, help="JSON file, rewritten after every method")
    parser.add_argument("--dry-run", action="store_true", help="tiny models, 64 px, 2 steps, CPU, dynamo disabled")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.size, args.steps, args.iterations, args.repeats, args.device = 64, 2, 1, 1, "cpu"
    from editkit.acceleration import compile_unet

    unknown = set(args.methods) - set(methods_for(args))
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; use some of {sorted(methods_for(args))}")
    with torch.no_grad():  # not torch.set_grad_enabled(False): main also runs inside a test process
        pipe = build_pipe(args).to(args.device)
    settings = {k: getattr(args, k) for k in ("size", "steps", "iterations", "repeats", "mode", "device", "dry_run")}
    result: dict = {"environment": environment(), "settings": settings, "methods": {}}
    names = list(dict.fromkeys([baseline(name) for name in args.methods] + list(args.methods)))  # baselines first
    eager = measure_all(pipe, names, args, compiled=False)
    compile_unet(pipe.unet, mode=None if args.mode == "default" else args.mode, recompile_limit=64)
    compiled: dict = {}
    for name in names:
        with torch._dynamo.config.patch(disable=True) if args.dry_run else contextlib.nullcontext():
            compiled |= measure_all(pipe, [name], args, compiled=True)
        result["methods"][name] = {"eager": eager[name], "compiled": compiled[name]}
        result["methods"][name]["compiled_speedup"] = eager[name]["median_s"] / compiled[name]["median_s"]
        if name in args.methods:
            stock = baseline(name)
            result["methods"][name]["baseline"] = stock
            result["methods"][name]["eager_vs_stock"] = eager[name]["median_s"] / eager[stock]["median_s"]
            result["methods"][name]["compiled_vs_stock_compiled"] = (
                compiled[name]["median_s"] / compiled[stock]["median_s"]
            )
        if args.output is not None:
            args.output.write_text(json.dumps(result, indent=2))
    torch._dynamo.reset()
    print_json(result)
    return result


if __name__ == "__main__":
    main()
