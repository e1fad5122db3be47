"""The speed part of :mod:`benchmarks.flow_edit`: per-step time and op counts of flow editing against its floor.

Pipelines with full-width reduced-depth random-weight transformers (SD3.5-medium: 2 joint blocks, one with
``attn2``; FLUX.1-dev: 2 double + 2 single blocks) and tiny text encoders whose output widths are the real
models' (SD3: two CLIPs with 1024-wide projections and no T5, so the text stream is 77 CLIP tokens padded
to 4096 plus ``--text-tokens`` zero "T5" tokens; FLUX: a 768-wide CLIP and a one-layer 4096-wide T5 giving
``--text-tokens`` tokens). The
edit starts from an image (a tiny 16-channel VAE encodes it, its cost is negligible and not counted in the
op counts) and returns latents.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from benchmarks.opcount import OpCounter, paused_inside
from benchmarks.timing import interleaved_medians, saved_activation_bytes

STEPS = 8  # the schedule's T; n_max = --steps-per-run of them are run


def _tiny_vae(latent_channels: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[8] * 4, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=latent_channels, norm_num_groups=4,
        layers_per_block=1, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0,
    ).eval()  # fmt: skip


def sd35_pipeline():
    """SD3ContrastiveEditPipeline: SD3.5-medium widths, 2 joint blocks; tiny CLIPs (projections 1024 + 1024), no T5."""
    from editkit.testing import _text_encoder, tiny_tokenizer
    from editkit.testing_mmdit import SD35_MEDIUM_TRANSFORMER, flow_match_scheduler, full_width_transformer
    from pipelines.flow_edit import SD3ContrastiveEditPipeline

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    encoders = [_text_encoder(32, 1000, with_projection=True, projection_dim=1024) for _ in range(2)]
    pipe = SD3ContrastiveEditPipeline(
        transformer=full_width_transformer(SD35_MEDIUM_TRANSFORMER, 2), scheduler=flow_match_scheduler(),
        vae=_tiny_vae(16), text_encoder=encoders[0], tokenizer=tokenizer, text_encoder_2=encoders[1],
        tokenizer_2=tiny_tokenizer(),
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_pipeline():
    """FluxContrastiveEditPipeline: FLUX.1-dev widths, 2 double + 2 single blocks; tiny CLIP (768) and T5 (4096)."""
    from transformers import T5Config, T5EncoderModel

    from editkit.testing import _text_encoder, tiny_tokenizer
    from editkit.testing_mmdit import (
        FLUX1_DEV_TRANSFORMER,
        flow_match_scheduler,
        full_width_transformer,
        tiny_t5_tokenizer,
    )
    from pipelines.flow_edit import FluxContrastiveEditPipeline

    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=256, d_model=4096, d_kv=8, d_ff=16, num_layers=1, num_heads=2,
                                 relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1)).eval()  # fmt: skip
    pipe = FluxContrastiveEditPipeline(
        scheduler=flow_match_scheduler(flux=True), vae=_tiny_vae(16), text_encoder=_text_encoder(768, 1000),
        tokenizer=tiny_tokenizer(), text_encoder_2=t5, tokenizer_2=tiny_t5_tokenizer(),
        transformer=full_width_transformer(FLUX1_DEV_TRANSFORMER, 2),
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image_outputs(transformer, patterns: tuple[str, ...]):
    """Forward hooks collecting the image-token outputs of the contrast sites' stock attention layers."""
    outputs: list[torch.Tensor] = []

    def keep(_module, _args, out):
        outputs.append(out[0] if isinstance(out, tuple) else out)

    handles = [
        module.register_forward_hook(keep)
        for name, module in transformer.named_modules()
        if name.startswith(patterns) and name.rsplit(".", 1)[-1] in ("attn", "attn2")
    ]
    return outputs, handles


def floors(pipe, family: str, latent: int, text_tokens: int) -> dict[str, Callable[[], None]]:
    """The stock transformer calls of one FlowEdit step, plain and with the contrastive term."""
    from editkit.backbones import backbone_for

    options = {"max_sequence_length": text_tokens}
    backbone = backbone_for(pipe, **options)
    text = backbone.encode_text(["a photo of a cat"] * 4)
    sample = torch.randn(4, 16, latent, latent, generator=torch.Generator().manual_seed(0))
    timestep = torch.tensor(500.0)

    def call(batch: int):
        conditioning = type(text)(text.prompt_embeds[:batch], text.pooled_prompt_embeds[:batch], text.text_ids)
        return lambda z: backbone.denoise(z, timestep, conditioning)

    def forward_backward(batch: int):
        outputs, handles = _image_outputs(pipe.transformer, ("transformer_blocks",))
        with torch.enable_grad():
            z = sample[:batch].clone().requires_grad_(True)
            call(batch)(z)
            torch.autograd.grad(sum(o.float().square().mean() for o in outputs), z)
        for handle in handles:
            handle.remove()

    def no_grad(batch: int):
        with torch.no_grad():
            call(batch)(sample[:batch])

    if family == "sd3":  # CFG: [src u, src c, tar u, tar c]; contrast: [src u, src c, tar u] + tar c with grad
        return {"floor_plain": lambda: no_grad(4), "floor_contrast": lambda: (no_grad(3), forward_backward(1))}
    return {
        "floor_plain": lambda: (no_grad(1), no_grad(1)),
        "floor_contrast": lambda: (no_grad(1), forward_backward(1)),
    }


def edit_runs(pipe, family: str, latent: int, text_tokens: int, steps: int, contrasts=(None, "dual"), **extra) -> dict:
    import numpy as np
    from PIL import Image

    side = latent * pipe.vae_scale_factor
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (side, side, 3), dtype=np.uint8))
    options = {"max_sequence_length": text_tokens}

    def run(contrast):
        return lambda: pipe(image, "a photo of a cat", "a photo of a dog", num_inference_steps=STEPS, n_max=steps,
                            contrast=contrast, generator=torch.Generator().manual_seed(0), output_type="latent",
                            **options, **extra)  # fmt: skip

    names = {None: "flowedit", "dual": "flowedit_dual"}
    return {names[contrast]: run(contrast) for contrast in contrasts}


def _ops(pipe, run: Callable[[], object], encoders: list) -> int:
    counter = OpCounter()
    with paused_inside(counter, encoders), counter:
        run()
    return counter.count


def _memory(pipe, family: str, latent: int, text_tokens: int) -> dict:
    """Activation bytes autograd saves in one dual step, with and without gradient checkpointing (CPU)."""
    plain = edit_runs(pipe, family, latent, text_tokens, 1, contrasts=("dual",))["flowedit_dual"]
    checkpointed = edit_runs(pipe, family, latent, text_tokens, 1, contrasts=("dual",), gradient_checkpointing=True)
    return {
        "dual_saved_activation_bytes": saved_activation_bytes(plain, pipe.transformer),
        "dual_checkpointed_saved_activation_bytes": saved_activation_bytes(
            checkpointed["flowedit_dual"], pipe.transformer
        ),
    }


def speed(args) -> dict:
    """Per-step time and ops: the difference between runs of ``1 + k`` steps and of 1 step, over ``k``
    (the run's fixed setup, text and image encoding, cancels), against the floor of one step."""
    results, k = {}, max(args.steps_per_run, 1)
    for family, build in (("sd3", sd35_pipeline), ("flux", flux_pipeline)):
        if args.only and family != args.only:
            continue
        pipe = build()
        latent = args.size // pipe.vae_scale_factor
        long = edit_runs(pipe, family, latent, args.text_tokens, 1 + k)
        once = {f"{name}_1": run for name, run in edit_runs(pipe, family, latent, args.text_tokens, 1).items()}
        runs = long | once | floors(pipe, family, latent, args.text_tokens)
        times = interleaved_medians(runs, repeats=args.repeats, warmup=1, device=args.device)
        encoders = [m for m in (pipe.text_encoder, pipe.text_encoder_2, pipe.vae) if m is not None]
        ops = {name: _ops(pipe, runs[name], encoders) for name in runs}
        per_step, per_step_cpu, ops_per_step = {}, {}, {}
        for name in long:
            per_step[name] = (times[name]["median_s"] - times[f"{name}_1"]["median_s"]) / k
            per_step_cpu[name] = (times[name]["cpu_median_s"] - times[f"{name}_1"]["cpu_median_s"]) / k
            ops_per_step[name] = (ops[name] - ops[f"{name}_1"]) / k
        pairs = {"flowedit": "floor_plain", "flowedit_dual": "floor_contrast"}
        results[family] = {
            "per_step_s": per_step,
            "per_step_cpu_s": per_step_cpu,
            "floors_s": {floor: times[floor]["median_s"] for floor in pairs.values()},
            "efficiency": {
                f"{name}_vs_{floor}": times[floor]["median_s"] / per_step[name] for name, floor in pairs.items()
            }
            | {
                f"{name}_vs_{floor}_cpu": times[floor]["cpu_median_s"] / per_step_cpu[name]
                for name, floor in pairs.items()
            },
            "ops_per_step": ops_per_step | {floor: ops[floor] for floor in pairs.values()},
            "ops_run_setup": {name: ops[f"{name}_1"] - ops_per_step[name] for name in long},
            "whole_run_s": {name: times[name]["median_s"] for name in runs if not name.startswith("floor")},
            "memory": _memory(pipe, family, latent, args.text_tokens),
            "latent": latent,
            "steps_timed": k,
        }
    return {"speed": results}
