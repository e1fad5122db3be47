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


class _Stop(Exception):  # noqa: N818 - control flow, as the guided pass's early exit
    pass


def guided_pass_flops(size: int = 512, stop_after: str = "up_blocks.1.attentions.2.transformer_blocks.0.attn2") -> dict:
    """FLOPs of one guided pass of compose on the full-size SD 1.5 UNet (meta device: instant, load-free).

    Eager editkit stops the forward after the last 16x16 map layer (``stop_after``) and backpropagates
    from there; under torch.compile the forward runs whole (one graph for every step), its backward
    still from the maps with eager autograd, but whole with an aot-autograd backend (inductor: zero
    gradients flow back from the unused output). The backward is taken from the stop layer's output,
    as ``benchmarks.opcount``'s floor does. Reference: one no-grad CFG forward (batch 2).
    """
    from torch.utils.flop_counter import FlopCounterMode

    from editkit.testing import full_size_sd15_unet

    unet = full_size_sd15_unet(device="meta")
    latent, context = size // 8, torch.randn(1, 77, 768, device="meta")

    def flops(stop: bool, backward_from_output: bool, batch: int = 1, grad: bool = True) -> int:
        kept = {}
        hook = unet.get_submodule(stop_after).register_forward_hook(
            lambda module, args, output: (kept.__setitem__("maps", output), _raise(_Stop) if stop else None)[0]
        )
        sample = torch.randn(batch, 4, latent, latent, device="meta", requires_grad=grad)
        counter = FlopCounterMode(display=False)
        try:
            with counter, torch.set_grad_enabled(grad):
                try:
                    output = unet(sample, torch.tensor(500), encoder_hidden_states=context.expand(batch, -1, -1)).sample
                except _Stop:
                    output = None
                if grad:
                    (output if backward_from_output else kept["maps"]).sum().backward()  # FlopCounterMode: not .grad()
        finally:
            hook.remove()
        return counter.get_total_flops()

    early = flops(stop=True, backward_from_output=False)
    whole_eager_backward = flops(stop=False, backward_from_output=False)
    whole = flops(stop=False, backward_from_output=True)
    cfg = flops(stop=False, backward_from_output=False, batch=2, grad=False)
    return {
        "size": size, "stop_after": stop_after, "gflops": {
            "guided_early_exit": early / 1e9, "guided_whole_forward_eager_backward": whole_eager_backward / 1e9,
            "guided_whole_forward_whole_backward": whole / 1e9, "cfg_forward_batch2": cfg / 1e9,
        },
        "whole_forward_vs_early_exit": whole_eager_backward / early,
        "whole_forward_and_backward_vs_early_exit": whole / early,
        "guided_step_with_cfg_whole_vs_early": (whole + cfg) / (early + cfg),
    }  # fmt: skip


def _raise(error: type[Exception]) -> None:
    raise error


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="*", default=["stylize", "edit", "soft_tokens", "compose_stage1"])
    parser.add_argument("--steps", type=int, default=12, help="denoising / inversion steps")
    parser.add_argument("--iterations", type=int, default=3, help="edit optimisation iterations")
    parser.add_argument("--guided-cost", action="store_true", help="only the FLOPs of compose's guided pass")
    args = parser.parse_args(argv)
    if args.guided_cost:
        print_json({"environment": environment(), "guided_pass": guided_pass_flops()})
        return
    torch._dynamo.config.recompile_limit = 64  # count every recompile instead of falling back to eager
    results = {name: count_graphs(name, args.steps, args.iterations) for name in args.methods}
    print_json({"environment": environment(), "steps": args.steps, "iterations": args.iterations, "methods": results})


if __name__ == "__main__":
    main()
