"""SoftREPA benchmark: training-step efficiency, inference overhead of tokens, memory, shapes-world alignment.

- ``step_efficiency``: the floor (one forward + backward of the UNet on the B^2 pairs as one
  batch, gradient into the text context, no tokens) divided by a SoftREPA step (tokens inserted
  by the attention controller, B x B error matrix, contrastive loss, backward, AdamW step);
  measured interleaved in the same run, on the full-size SD 1.5 UNet architecture (random weights).
- ``inference_overhead``: a short generation (``--inference-calls`` CFG UNet calls under one
  attach, as a pipeline's loop runs them) with tokens over the same calls with stock processors;
  ``inference_tokens_vs_processors`` separates the tokens' own cost from the layer's pass-through.
- memory: peak CUDA bytes where there is a GPU; everywhere, the bytes autograd saves for backward
  (the activation memory), with and without row chunking and gradient checkpointing.
- shapes world: held-out alignment of the project's shapes model before and after training
  tokens on the world's captions (runs only when ``assets/models/shapes-sd`` exists).

Usage: ``python -m benchmarks.softrepa [--resolution 128] [--batch-size 2] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import tempfile
from pathlib import Path

import torch

from benchmarks.timing import environment, interleaved_medians, peak_memory, print_json
from editkit.attention import AttentionController, attach
from editkit.softrepa import ContrastiveLossConfig, SoftTokenController, SoftTokens, default_sites
from editkit.softrepa.loss import contrastive_loss, pair_errors, row_chunks
from editkit.testing import full_size_sd15_unet

SHAPES_MODEL = Path("assets/models/shapes-sd")
logger = logging.getLogger(__name__)


def _inputs(unet, batch: int, resolution: int, device):
    generator = torch.Generator().manual_seed(0)
    latent = resolution // 8
    latents = torch.randn(batch, 4, latent, latent, generator=generator).to(device)
    embeds = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=generator).to(device)
    noise = torch.randn(1, 4, latent, latent, generator=generator).to(device)
    return latents, embeds, noise


def _step_fn(unet, soft, optimizer, latents, embeds, noise, row_chunk=None):
    config, batch, timestep = ContrastiveLossConfig(), latents.shape[0], 500
    noisy = 0.5**0.5 * latents + 0.5**0.5 * noise
    target = noise.expand_as(latents)  # epsilon target, the one noise shared by every pair

    def predict(sample, context, added):
        return unet(sample, timestep, encoder_hidden_states=context).sample

    def step():
        optimizer.zero_grad(set_to_none=True)
        for rows in row_chunks(batch, row_chunk):
            contrastive_loss(pair_errors(predict, noisy, target, embeds, rows), config, rows, batch).backward()
        optimizer.step()

    return step


def _floor_fn(unet, latents, embeds, noise):
    """B^2 forward + backward passes as one batch, gradient into the context (no tokens, no loss logic)."""
    batch = latents.shape[0]
    sample = latents.repeat_interleave(batch, dim=0)
    context = embeds.repeat(batch, 1, 1).clone().requires_grad_(True)

    def floor():
        context.grad = None
        prediction = unet(sample, 500, encoder_hidden_states=context).sample
        ((prediction - noise) ** 2).mean().backward()

    return floor


def saved_bytes(run, model: torch.nn.Module) -> int:
    """Peak activation bytes autograd keeps for backward during ``run`` (model weights and repeats not counted).

    Per chunk: each backward frees its graph. Tensors saved inside checkpointed regions are not
    seen (they are recomputed), which is the point of checkpointing.
    """
    weights = {p.data_ptr() for p in model.parameters()}
    state = {"now": 0, "peak": 0, "seen": set()}

    def pack(tensor):
        pointer = tensor.data_ptr()
        if pointer in weights or pointer in state["seen"]:
            return tensor
        state["seen"].add(pointer)
        state["now"] += tensor.numel() * tensor.element_size()
        state["peak"] = max(state["peak"], state["now"])
        return tensor

    def unpack(tensor):
        return tensor

    original = torch.Tensor.backward

    def backward(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        state["now"] = 0
        state["seen"].clear()
        return result

    torch.Tensor.backward = backward
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            run()
    finally:
        torch.Tensor.backward = original
    return state["peak"]


def memory_table(unet, soft, optimizer, latents, embeds, noise, device) -> dict:
    table = {}
    for checkpointing in (False, True):
        unet.enable_gradient_checkpointing() if checkpointing else unet.disable_gradient_checkpointing()
        for chunk in (None, 1):
            step = _step_fn(unet, soft, optimizer, latents, embeds, noise, row_chunk=chunk)
            name = f"chunk_{chunk or 'none'}_checkpointing_{'on' if checkpointing else 'off'}"
            table[name] = {
                "saved_for_backward_mb": saved_bytes(step, unet) / 2**20,
                "cuda_peak_bytes": peak_memory(step, device),
            }
    unet.disable_gradient_checkpointing()
    return table


def shapes_alignment(steps: int, prompts: int, device: str, dtype: torch.dtype = torch.float32) -> dict:
    """Held-out alignment of the shapes model without and with tokens trained on the world's captions."""
    if not (SHAPES_MODEL / "model_index.json").is_file():
        return {"skipped": f"{SHAPES_MODEL} not found (train it with python -m benchmarks.shapes.train)"}
    import json

    from PIL import Image

    from benchmarks.shapes.evaluate import evaluate, load_pipeline
    from benchmarks.shapes.world import sample_batch
    from editkit.softrepa import TrainConfig, load_soft_tokens, train_soft_tokens, use_soft_tokens

    pipe = load_pipeline(str(SHAPES_MODEL), device)
    pipe.to(dtype=dtype)
    # Baseline first, on the untouched pipeline (training freezes/configures its models in place).
    before = evaluate(pipe, num_prompts=prompts)
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "data"
        data.mkdir()
        images, captions, _ = sample_batch(seed=1, n=512, training=True)
        rows = []
        for index, (image, caption) in enumerate(zip(images, captions, strict=True)):
            Image.fromarray(image).save(data / f"{index}.png")
            rows.append(json.dumps({"file_name": f"{index}.png", "text": caption}))
        (data / "metadata.jsonl").write_text("\n".join(rows))
        output = Path(folder) / "tokens.safetensors"
        config = TrainConfig(
            data=data, model=SHAPES_MODEL, output=output, max_steps=steps, batch_size=4, device=device, resolution=32,
            validate_every=max(1, steps // 4), val_fraction=0.1, progress=False, checkpoint_every=0,
        )  # fmt: skip
        trained = train_soft_tokens(config, pipe=pipe)
        with use_soft_tokens(pipe.unet, load_soft_tokens(output, unet=pipe.unet)):
            after = evaluate(pipe, num_prompts=prompts)
    return {
        "steps": steps,
        "batch_size": 4,
        "train_captions": 512,
        "steps_done": trained.steps,
        "first_loss": trained.losses[0] if trained.losses else None,
        "last_loss": trained.losses[-1] if trained.losses else None,
        "best_val_metric": trained.best_metric,
        "before": before,
        "after": after,
        "after_minus_before": {
            k: after[k] - before[k]
            for k in before
            if k.endswith(("accuracy", "colors", "shapes")) and isinstance(before[k], float)
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--inference-calls", type=int, default=4, help="UNet calls per timed generation (one attach around them)"
    )
    parser.add_argument("--shapes-steps", type=int, default=200)
    parser.add_argument("--shapes-prompts", type=int, default=100)
    parser.add_argument("--dtype", default="float32", help="torch dtype of the UNet and shapes model (float16: CUDA)")
    parser.add_argument("--shapes-only", action="store_true", help="skip the full-size speed/memory part")
    parser.add_argument("--skip-shapes", action="store_true", help="skip the shapes-world part")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    result = {"environment": environment(), "dtype": args.dtype}
    if args.shapes_only:
        result["shapes_world"] = shapes_alignment(args.shapes_steps, args.shapes_prompts, str(device), dtype)
        print_json(result)
        return
    unet = full_size_sd15_unet(dtype=dtype, device=device)
    soft = SoftTokens(torch.randn(4, 768) * 0.02, default_sites(unet)).to(device, dtype)
    optimizer = torch.optim.AdamW(soft.parameters(), lr=1e-3, weight_decay=1e-4)
    latents, embeds, noise = (t.to(dtype) for t in _inputs(unet, args.batch_size, args.resolution, device))
    cfg_sample, cfg_context = latents[:1].repeat(2, 1, 1, 1), embeds[:1].repeat(2, 1, 1)  # (uncond, cond)
    result |= {"resolution": args.resolution, "batch_size": args.batch_size}
    result["pairs_per_step"] = args.batch_size**2
    controller = SoftTokenController(soft)
    with attach(unet, controller):
        step = _step_fn(unet, soft, optimizer, latents, embeds, noise)
        timing = interleaved_medians(
            {"floor": _floor_fn(unet, latents, embeds, noise), "softrepa_step": step}, args.repeats, 1, str(device)
        )
    result["training"] = timing
    logger.info("training: %s", timing)
    for clock in ("median_s", "cpu_median_s"):
        result[f"step_efficiency_{clock.removesuffix('_s')}"] = timing["floor"][clock] / timing["softrepa_step"][clock]

    def generation(*controllers, calls: int = args.inference_calls):
        """``calls`` CFG UNet calls under one attach, as a pipeline runs its denoising loop."""

        def run():
            with torch.no_grad(), attach(unet, list(controllers)) if controllers else contextlib.nullcontext():
                for _ in range(calls):
                    unet(cfg_sample, 500, encoder_hidden_states=cfg_context)

        return run

    runs = {"plain": generation(), "processors": generation(AttentionController()), "tokens": generation(controller)}
    inference = interleaved_medians(runs, args.repeats * 2, 1, str(device))
    result["inference"] = inference | {"unet_calls_per_run": args.inference_calls}
    logger.info("inference: %s", inference)
    for clock in ("median_s", "cpu_median_s", "min_s"):
        suffix = clock.removesuffix("_s")
        result[f"inference_overhead_{suffix}"] = inference["tokens"][clock] / inference["plain"][clock] - 1
        result[f"inference_tokens_vs_processors_{suffix}"] = (
            inference["tokens"][clock] / inference["processors"][clock] - 1
        )
    with attach(unet, controller):
        result["memory"] = memory_table(unet, soft, optimizer, latents, embeds, noise, str(device))
    if args.skip_shapes or args.shapes_steps <= 0 or args.shapes_prompts <= 0:
        result["shapes_world"] = {"skipped": "--skip-shapes, --shapes-steps 0 or --shapes-prompts 0"}
    else:
        result["shapes_world"] = shapes_alignment(args.shapes_steps, args.shapes_prompts, str(device), dtype)
    print_json(result)


if __name__ == "__main__":
    main()
