"""Pass-through cost of editkit's MM-DiT attention processors against diffusers' stock processors.

Full-width, reduced-depth random-weight transformers (the per-block cost of the real models):

- SD3.5-medium widths: 24 heads x 64, joint_attention_dim 4096, caption_projection_dim 1536,
  pooled 2048, patch 2, 16 latent channels; 2 blocks, the first with SD3.5's image-only ``attn2``
  (dual attention), the last ``context_pre_only`` as in the real model;
- FLUX.1-dev widths: 24 heads x 128, joint 4096, pooled 768, rotary axes (16, 56, 56), 64 packed
  channels, guidance embedding; 2 double-stream + 2 single-stream blocks.

Per model: the identity controller attached (``attach(model, AttentionController())`` around
``--calls`` forwards, as a pipeline attaches once around its loop) against the stock processors,
interleaved over ``--repeats`` rounds (median; target ratio <= 1.03), and the dispatched ATen
operations of one forward of each (``benchmarks.opcount.OpCounter``; target: equal). FLUX reads
its image-token grid from ``img_ids`` once per ids tensor (a pipeline passes one tensor at every
step): those operations are reported apart as ``first_call_extra_ops``. The processors' fixed
per-call cost on tiny inputs gives a load-independent estimate of the ratio beside the timing.

    python -m benchmarks.mmdit_overhead --latent 32 --text-tokens 64 --repeats 5
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

from benchmarks.opcount import OpCounter
from benchmarks.timing import environment, interleaved_medians, print_json
from editkit.attention import AttentionController, attach


def sd35_medium_blocks(num_layers: int = 2) -> SD3Transformer2DModel:
    """SD3.5-medium widths, ``num_layers`` joint blocks, the first with the image-only ``attn2``."""
    return SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=num_layers,
        attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
        pooled_projection_dim=2048, pos_embed_max_size=384, dual_attention_layers=(0,), qk_norm="rms_norm",
    ).eval()  # fmt: skip


def flux1_blocks(num_layers: int = 2, num_single_layers: int = 2) -> FluxTransformer2DModel:
    """FLUX.1-dev widths with ``num_layers`` double-stream and ``num_single_layers`` single-stream blocks."""
    return FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
        guidance_embeds=True, axes_dims_rope=(16, 56, 56),
    ).eval()  # fmt: skip


def sd3_inputs(latent: int, text_tokens: int, batch: int, generator: torch.Generator) -> dict:
    """SD3 inputs: a ``latent`` x ``latent`` 16-channel latent (``(latent / 2)^2`` tokens at patch 2)."""
    return {
        "hidden_states": torch.randn(batch, 16, latent, latent, generator=generator),
        "encoder_hidden_states": torch.randn(batch, text_tokens, 4096, generator=generator),
        "pooled_projections": torch.randn(batch, 2048, generator=generator),
        "timestep": torch.full((batch,), 500.0),
    }


def flux_inputs(latent: int, text_tokens: int, batch: int, generator: torch.Generator) -> dict:
    """FLUX inputs: a ``latent`` x ``latent`` latent packed 2x2 into ``(latent / 2)^2`` tokens of 64 channels."""
    side = latent // 2
    image_ids = torch.zeros(side, side, 3)
    image_ids[..., 1] = torch.arange(side)[:, None]
    image_ids[..., 2] = torch.arange(side)[None, :]
    return {
        "hidden_states": torch.randn(batch, side * side, 64, generator=generator),
        "encoder_hidden_states": torch.randn(batch, text_tokens, 4096, generator=generator),
        "pooled_projections": torch.randn(batch, 768, generator=generator),
        "timestep": torch.full((batch,), 0.5),
        "guidance": torch.full((batch,), 3.5),
        "img_ids": image_ids.reshape(-1, 3),
        "txt_ids": torch.zeros(text_tokens, 3),
    }


def op_counts(model: torch.nn.Module, inputs: dict) -> dict:
    """ATen operations of one forward: stock, and editkit pass-through (after one warm call)."""
    counters = {"stock": OpCounter(), "editkit_first": OpCounter(), "editkit": OpCounter()}
    with torch.no_grad():
        with counters["stock"]:
            model(**inputs)
        with attach(model, AttentionController()):
            with counters["editkit_first"]:
                model(**inputs)
            with counters["editkit"]:
                model(**inputs)
    stock, editkit = counters["stock"], counters["editkit"]
    return {
        "stock_ops": stock.count,
        "editkit_ops": editkit.count,
        "equal_by_op": stock.by_op == editkit.by_op,
        "first_call_extra_ops": counters["editkit_first"].count - stock.count,
    }


def per_call_overhead(model: torch.nn.Module, calls: int = 100, rounds: int = 3) -> dict:
    """Fixed cost per attention call of editkit's processor vs stock on tiny inputs (min over rounds).

    On 4 image and 4 text tokens the attention math is negligible, so the difference is the
    processor's own Python overhead; times the model's attention calls over a full forward it
    bounds the pass-through cost independently of machine noise. Measured on the first joint layer
    (full width: each call still streams the layer's weights, so keep ``calls`` small on a CPU).
    """
    attn = model.transformer_blocks[0].attn
    stock = attn.processor
    width = attn.to_q.in_features
    hidden, context = torch.randn(1, 4, width), torch.randn(1, 4, width)
    best = {"stock": float("inf"), "editkit": float("inf")}
    with torch.no_grad(), attach(model, AttentionController()):
        ours = attn.processor
        for _ in range(rounds):
            for label, processor in (("stock", stock), ("editkit", ours)):
                start = time.perf_counter()
                for _ in range(calls):
                    processor(attn, hidden, context)
                best[label] = min(best[label], (time.perf_counter() - start) / calls)
    return {
        "stock_us": best["stock"] * 1e6,
        "editkit_us": best["editkit"] * 1e6,
        "extra_us": (best["editkit"] - best["stock"]) * 1e6,
    }


def measure(model: torch.nn.Module, inputs: dict, repeats: int, calls: int) -> dict:
    """Interleaved timing of stock vs pass-through, and the op counts."""

    def forward() -> None:
        with torch.no_grad():
            for _ in range(calls):
                model(**inputs)

    def passthrough() -> None:
        with attach(model, AttentionController()):
            forward()

    times = interleaved_medians({"stock": forward, "editkit_identity": passthrough}, repeats=repeats)
    stock, ours = times["stock"], times["editkit_identity"]
    overhead = per_call_overhead(model)
    layers = len(model.attn_processors)
    return {
        "attention_layers": layers,
        "times": times,
        "ratio_identity_vs_stock": ours["median_s"] / stock["median_s"],
        "cpu_ratio_identity_vs_stock": ours["cpu_median_s"] / stock["cpu_median_s"],
        "min_ratio_identity_vs_stock": ours["min_s"] / stock["min_s"],
        "per_call": overhead,
        # fixed processor cost x attention calls per run / fastest stock run
        "estimated_ratio_identity_vs_stock": 1 + overhead["extra_us"] * 1e-6 * layers * calls / stock["min_s"],
        "op_count": op_counts(model, inputs),
    }


MODELS: dict[str, tuple[Callable[[], torch.nn.Module], Callable[..., dict]]] = {
    "sd35_medium_2_blocks": (sd35_medium_blocks, sd3_inputs),
    "flux1_dev_2_double_2_single": (flux1_blocks, flux_inputs),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, default=32, help="latent side (32 -> 256 image tokens at patch 2)")
    parser.add_argument("--text-tokens", type=int, default=64, help="text sequence length")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--calls", type=int, default=2, help="forwards per timed run (one attach around them)")
    parser.add_argument("--only", nargs="*", choices=sorted(MODELS), help="models to measure (default: all)")
    args = parser.parse_args(argv)

    result: dict = {
        "benchmark": "mmdit_overhead",
        "latent": args.latent,
        "image_tokens": (args.latent // 2) ** 2,
        "text_tokens": args.text_tokens,
        "batch": args.batch,
        "calls_per_run": args.calls,
        "repeats": args.repeats,
        "targets": {"ratio_identity_vs_stock": 1.03, "op_count": "equal"},
        "models": {},
    }
    for name, (build, make_inputs) in MODELS.items():
        if args.only and name not in args.only:
            continue
        torch.manual_seed(0)
        model = build()
        inputs = make_inputs(args.latent, args.text_tokens, args.batch, torch.Generator().manual_seed(0))
        result["models"][name] = measure(model, inputs, args.repeats, args.calls)
        del model
    result["environment"] = environment()
    print_json(result)


if __name__ == "__main__":
    main()
