"""Dispatched ATen operations of each method against its floor: a launch count that ignores machine load.

On a GPU every non-view ATen operation is (at least) one kernel launch, and at 512 px an SD 1.5
UNet forward is launch-bound on the host. Time ratios move with machine load; these counts do not.
Each method runs once on the tiny SD 1.5-topology pipeline (``editkit.testing``: the real block
and attention-layer structure, so the real per-layer operation counts; widths do not change the
count) under a ``TorchDispatchMode`` counter. Operations inside the text encoder and the VAE are
not counted (both sides do the same encode/decode).

The floor is the same UNet evaluations with diffusers' stock processors: every UNet call the
method made is recorded (batch, latent size, context length, grad mode, and for guided passes that
stop early the attention layer they stopped after), then replayed with ``AttnProcessor2_0``. A
call made with grad enabled is replayed as a forward plus a backward to the latent input (from the
sum of the output, or of the last finished attention layer's output for an early exit; a pass that
stops inside a layer's processor is replayed up to the layer before, so that floor is slightly
low and the ratio errs high): what any method that differentiates through the UNet must pay.
The ratio ``method / floor`` is then the method's own operations (controllers, losses, PatchNCE,
scheduler arithmetic) on top of the UNet work; ``plain_generation`` shows what diffusers' own
sampling loop adds on the same scale.

    python -m benchmarks.opcount --size 256 --steps 4
"""

from __future__ import annotations

import argparse
import contextlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.timing import environment, print_json

PROMPT = "a red circle on the left of a blue square"


class OpCounter(TorchDispatchMode):
    """Counts dispatched non-view ATen operations while active (``paused`` > 0 stops counting)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.by_op: Counter[str] = Counter()
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused and not func.is_view:
            self.count += 1
            self.by_op[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def paused_inside(counter: OpCounter, modules: list[torch.nn.Module]):
    """Stop counting while any of ``modules`` runs (text encoders, VAE)."""

    def pause(*_):
        counter.paused += 1

    def resume(*_):
        counter.paused -= 1

    handles = []
    for module in modules:
        handles.append(module.register_forward_pre_hook(pause))
        handles.append(module.register_forward_hook(resume, always_call=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass(frozen=True)
class UNetCall:
    """What the floor must replay of one UNet evaluation."""

    sample_shape: tuple[int, ...]
    context_shape: tuple[int, ...]
    grad: bool
    stopped_after: str | None  # an attention module name when the call ended early (an exception)


@contextlib.contextmanager
def recorded_calls(unet: torch.nn.Module, calls: list[UNetCall]):
    """Record every UNet call's shapes and grad mode, and where a call that raised had got to."""
    state: dict = {}
    names = {module: name for name, module in unet.named_modules() if hasattr(module, "processor")}

    def before(module, args, kwargs):
        sample = args[0]
        context = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        state.update(shape=tuple(sample.shape), context=tuple(context.shape), grad=torch.is_grad_enabled())
        state["last"] = None

    def after(module, args, kwargs, output):
        calls.append(UNetCall(state["shape"], state["context"], state["grad"], None))

    def layer_done(module, args, output):
        state["last"] = names[module]

    handles = [
        unet.register_forward_pre_hook(before, with_kwargs=True),
        unet.register_forward_hook(after, with_kwargs=True),
    ]
    handles += [module.register_forward_hook(layer_done) for module in names]

    def wrapped_forward(original):
        def forward(*args, **kwargs):
            try:
                return original(*args, **kwargs)
            except Exception:  # ended early (a guided pass's early exit): the post hook never runs
                calls.append(UNetCall(state["shape"], state["context"], state["grad"], state["last"]))
                raise

        return forward

    original = unet.forward
    unet.forward = wrapped_forward(original)
    try:
        yield
    finally:
        unet.forward = original
        for handle in handles:
            handle.remove()


class _StopError(Exception):
    def __init__(self, output: torch.Tensor) -> None:
        self.output = output


def stock_call_ops(unet: torch.nn.Module, call: UNetCall) -> Counter[str]:
    """Operations (by ATen op) of ``call`` replayed with the UNet's current (stock) processors."""
    sample = torch.randn(call.sample_shape).requires_grad_(call.grad)
    context = torch.randn(call.context_shape)
    timestep = torch.tensor(500)
    handle = None
    if call.stopped_after is not None:

        def stop(module, args, output):
            raise _StopError(output)

        handle = unet.get_submodule(call.stopped_after).register_forward_hook(stop)
    counter = OpCounter()
    try:
        with counter, torch.set_grad_enabled(call.grad):
            try:
                output = unet(sample, timestep, encoder_hidden_states=context).sample
            except _StopError as stopped:
                output = stopped.output
            if call.grad:
                torch.autograd.grad(output.float().sum(), sample)
    finally:
        if handle is not None:
            handle.remove()
    return counter.by_op


def measure(pipe, run: Callable[[], object]) -> dict:
    """The method's operation count, its floor's, and their ratio."""
    calls: list[UNetCall] = []
    counter = OpCounter()
    # the VAE is reached through vae.encode/decode (methods, not forward): pause in its children
    vae = getattr(pipe, "vae", None)
    skipped = [m for m in (getattr(pipe, "text_encoder", None), *(vae.children() if vae else ())) if m is not None]
    with recorded_calls(pipe.unet, calls), paused_inside(counter, skipped), counter:
        run()
    cache: dict[UNetCall, Counter[str]] = {}
    floor: Counter[str] = Counter()
    for call in calls:
        if call not in cache:
            cache[call] = stock_call_ops(pipe.unet, call)
        floor.update(cache[call])
    floor_ops = sum(floor.values())
    extra = Counter(counter.by_op)
    extra.subtract(floor)
    return {
        "ops": counter.count,
        "floor_ops": floor_ops,
        "ratio": counter.count / floor_ops if floor_ops else None,
        "unet_calls": len(calls),
        "grad_calls": sum(c.grad for c in calls),
        "ops_per_unet_call": counter.count / max(len(calls), 1),
        "extra_ops_by_aten_op": dict(extra.most_common(8)),  # the method's own operations, largest first
    }


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def methods(size: int, steps: int, iterations: int) -> dict[str, Callable[[object], Callable[[], object]]]:
    """Per method: a function of the pipeline components that returns the run to count."""
    from PIL import Image

    from editkit.attention import AttentionController, attach
    from pipelines.compose import ComposePipeline
    from pipelines.contrastive_edit import ContrastiveEditPipeline
    from pipelines.style_transfer import StyleTransferPipeline

    content = Image.new("RGB", (size, size), (200, 40, 40))
    style = Image.new("RGB", (size, size), (40, 40, 200))
    common = {"output_type": "pt"}

    def passthrough(pipe):
        like = {"device": pipe.unet.device, "dtype": pipe.unet.dtype}
        sample = torch.randn(2, 4, size // 8, size // 8, **like)
        context = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, **like)

        def run():
            with torch.no_grad(), attach(pipe.unet, AttentionController()):
                pipe.unet(sample, torch.tensor(500, device=like["device"]), encoder_hidden_states=context)

        return run

    def stylize(pipe):
        styled = StyleTransferPipeline.from_pipe(pipe)
        return lambda: styled(content, style, num_inference_steps=steps, height=size, width=size, **common)

    def edit(contrast):
        def make(pipe):
            editor = ContrastiveEditPipeline.from_pipe(pipe)
            return lambda: editor(
                content, "a red circle", "a blue circle", num_inference_steps=iterations, contrast=contrast,
                generator=_seeded(0), **common,
            )  # fmt: skip

        return make

    def compose(refine):
        def make(pipe):
            composer = ComposePipeline.from_pipe(pipe)
            return lambda: composer(
                PROMPT, height=size, width=size, num_inference_steps=steps, max_iter_to_alter=steps // 2,
                refine=refine, generator=_seeded(0), **common,
            )  # fmt: skip

        return make

    def plain(pipe):
        return lambda: pipe(PROMPT, height=size, width=size, num_inference_steps=steps, generator=_seeded(0), **common)

    return {
        "pass_through": passthrough,
        "plain_generation": plain,
        "stylize": stylize,
        "edit_dds": edit(None),
        "edit_cds": edit("source"),
        "edit_dual": edit("dual"),
        "compose_stage1": compose(False),
        "soft_token_generation": soft_token_generation(size, steps),
    }


def soft_token_generation(size: int, steps: int):
    """Plain generation with SoftREPA tokens attached (``use_soft_tokens``)."""

    def make(pipe):
        from editkit.softrepa import SoftTokenController, SoftTokens, use_soft_tokens
        from editkit.softrepa.tokens import default_sites

        sites = default_sites(pipe.unet)
        width = pipe.unet.config.cross_attention_dim
        tokens = SoftTokens((torch.randn(4, width, generator=_seeded(0)) * 0.02).to(pipe.unet.device), sites)

        def run():
            with use_soft_tokens(pipe.unet, SoftTokenController(tokens)):
                pipe(PROMPT, height=size, width=size, num_inference_steps=steps, generator=_seeded(0), output_type="pt")

        return run

    return make


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (latent = size / 8)")
    parser.add_argument("--steps", type=int, default=4, help="denoising / inversion steps")
    parser.add_argument("--iterations", type=int, default=2, help="edit optimisation iterations")
    parser.add_argument("--only", nargs="*", help="methods to count (default: all)")
    args = parser.parse_args(argv)
    from editkit.testing import tiny_sd15_pipeline

    torch.set_grad_enabled(False)
    pipe = tiny_sd15_pipeline(seed=0, words=PROMPT.split())
    result: dict = {"environment": environment(), "size": args.size, "steps": args.steps,
                    "iterations": args.iterations, "methods": {}}  # fmt: skip
    for name, make in methods(args.size, args.steps, args.iterations).items():
        if args.only and name not in args.only:
            continue
        result["methods"][name] = measure(pipe, make(pipe))
    print_json(result)


if __name__ == "__main__":
    main()
