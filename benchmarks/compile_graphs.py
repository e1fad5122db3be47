"""Graphs dynamo compiles for one method run on a compiled UNet (tiny SD 1.5 topology, tracing only).

A graph count that grows with the number of steps means per-step recompiles: past dynamo's
recompile limit (8) the rest of the run is eager. Backend: a counting pass-through (no inductor),
so this measures tracing only and runs on the CPU.

    python -m benchmarks.compile_graphs --methods stylize edit soft_tokens compose
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.timing import environment, print_json

PROMPT = "a red circle on the left of a blue square"


def _run_method(name: str, base, steps: int, iterations: int) -> None:
    from PIL import Image

    image = Image.new("RGB", (64, 64), (200, 40, 40))
    if name == "stylize":
        from pipelines.style_transfer import StyleTransferPipeline

        StyleTransferPipeline.from_pipe(base)(image, image, num_inference_steps=steps, output_type="pt")
    elif name == "compose_stage1":
        from pipelines.compose import ComposePipeline

        ComposePipeline.from_pipe(base)(
            PROMPT, height=64, width=64, num_inference_steps=steps, refine=False, output_type="pt"
        )
    elif name == "edit":
        from pipelines.contrastive_edit import ContrastiveEditPipeline

        editor = ContrastiveEditPipeline.from_pipe(base)
        editor(image, "a red circle", "a blue circle", num_inference_steps=iterations, output_type="pt")
    elif name == "soft_tokens":
        from editkit.softrepa import SoftTokenController, SoftTokens, use_soft_tokens
        from editkit.softrepa.tokens import default_sites

        width = base.unet.config.cross_attention_dim
        tokens = SoftTokens(torch.randn(4, width) * 0.02, default_sites(base.unet), time_buckets=100)
        with use_soft_tokens(base.unet, SoftTokenController(tokens)):
            base(PROMPT, height=64, width=64, num_inference_steps=steps, output_type="pt")
    else:
        raise ValueError(f"unknown method {name}")


def count_graphs(name: str, steps: int, iterations: int) -> dict:
    from torch._dynamo.utils import counters

    from editkit.testing import tiny_sd15_pipeline

    base = tiny_sd15_pipeline(seed=0, words=PROMPT.split())
    torch._dynamo.reset()
    counters.clear()
    graphs: list = []
    base.unet.compile(backend=lambda gm, inputs: graphs.append(gm) or gm.forward)
    start = time.perf_counter()
    _run_method(name, base, steps, iterations)
    result = {
        "graphs": len(graphs),
        "graph_breaks": sum(counters["graph_break"].values()),
        "seconds": time.perf_counter() - start,
    }
    torch._dynamo.reset()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="*", default=["stylize", "edit", "soft_tokens", "compose_stage1"])
    parser.add_argument("--steps", type=int, default=12, help="denoising / inversion steps")
    parser.add_argument("--iterations", type=int, default=3, help="edit optimisation iterations")
    args = parser.parse_args(argv)
    torch._dynamo.config.recompile_limit = 64  # count every recompile instead of falling back to eager
    results = {name: count_graphs(name, args.steps, args.iterations) for name in args.methods}
    print_json({"environment": environment(), "steps": args.steps, "iterations": args.iterations, "methods": results})


if __name__ == "__main__":
    main()
