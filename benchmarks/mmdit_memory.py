"""Peak GPU memory of SD3.5-Large and FLUX.1-dev 1024x1024 generation, estimated on the meta device.

Every component is built on the ``meta`` device from the released models' configurations (shapes
and dtypes, no storage) and run for real on meta tensors under :class:`benchmarks.memory_estimate.
LiveBytes`, which counts the bytes of live tensors; attention is replaced by a flash-style stand-in
(output + log-sum-exp, no probabilities), which is what SDPA does on a CUDA GPU. The configurations
are written out below as dicts; parameter counts follow from them (T5-XXL encoder 4.76B, CLIP-L
123M, CLIP-G 695M, SD3.5-Large transformer 8.06B, FLUX.1-dev transformer 11.9B, the 16-channel VAE
84M). All weights bf16 (the released dtype); allocator rounding, workspaces and the CUDA context
are not counted: ``margin_gb`` adds them.

- ``plain``: every component resident on the GPU (``pipe.to("cuda")``); peak = all weights + the
  largest phase's activations (text encoders, one transformer call, VAE decode).
- ``model_cpu_offload``: diffusers' ``enable_model_cpu_offload()``: one component on the GPU at a
  time; peak = the largest (component weights + its activations), plus the text embeddings and
  latents that stay on the GPU.

SD3.5-Large runs classifier-free guidance (transformer batch 2; prompts encoded one batch at a
time); FLUX.1-dev is guidance-distilled (batch 1).

    python -m benchmarks.mmdit_memory [--size 1024] [--budget-gb 24] [--margin-gb 1.5]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from benchmarks.memory_estimate import GB, LiveBytes, _FlashLike, model_bytes
from benchmarks.timing import environment, print_json
from editkit.testing import FLUX1_DEV_TRANSFORMER, SD35_LARGE_TRANSFORMER, full_width_transformer

DTYPE = torch.bfloat16
# openai/clip-vit-large-patch14 text_config (SD3 text_encoder, FLUX text_encoder)
CLIP_L = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "projection_dim": 768, "hidden_act": "quick_gelu",
}  # fmt: skip
# laion/CLIP-ViT-bigG-14-laion2B-39B-b160k text_config (SD3 text_encoder_2)
CLIP_G = {
    "vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
    "num_attention_heads": 20, "max_position_embeddings": 77, "projection_dim": 1280, "hidden_act": "gelu",
}  # fmt: skip
# google/t5-v1_1-xxl (SD3 text_encoder_3, FLUX text_encoder_2: the encoder only)
T5_XXL = {
    "vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
    "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32,
}  # fmt: skip
# stabilityai/stable-diffusion-3.5-large vae/config.json (FLUX.1-dev's differs only in the factors)
FLOW_VAE = {
    "block_out_channels": (128, 256, 512, 512), "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4, "latent_channels": 16, "layers_per_block": 2,
    "sample_size": 1024, "use_quant_conv": False, "use_post_quant_conv": False,
}  # fmt: skip
MODELS = {
    "sd3.5-large": {
        "transformer": SD35_LARGE_TRANSFORMER, "text_encoders": ("clip_l_projection", "clip_g", "t5"),
        "t5_tokens": 256, "batch": 2, "scaling_factor": 1.5305, "shift_factor": 0.0609,
    },
    "flux.1-dev": {
        "transformer": FLUX1_DEV_TRANSFORMER, "text_encoders": ("clip_l", "t5"),
        "t5_tokens": 512, "batch": 1, "scaling_factor": 0.3611, "shift_factor": 0.1159,
    },
}  # fmt: skip


class FlashSDPA(TorchFunctionMode):
    """Every ``F.scaled_dot_product_attention`` call answered with flash attention's memory (no probabilities)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            names = ("query", "key", "value")
            query, key, value = (*args, *(kwargs[n] for n in names[len(args) :]))[:3]
            return _FlashLike.apply(query, key, value)
        return func(*args, **kwargs)


def peak(run: Callable[[], object]) -> int:
    """Peak live bytes of the tensors ``run`` creates (no grad, flash-style attention)."""
    counter = LiveBytes()
    with torch.no_grad(), FlashSDPA(), counter:
        run()
    return counter.peak


def text_encoder(kind: str) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    with torch.device("meta"):
        if kind == "t5":
            model = T5EncoderModel(T5Config(**T5_XXL))
        elif kind == "clip_l":
            model = CLIPTextModel(CLIPTextConfig(**CLIP_L))
        else:
            config = CLIPTextConfig(**(CLIP_G if kind == "clip_g" else CLIP_L))
            model = CLIPTextModelWithProjection(config)
    return model.to(DTYPE).eval().requires_grad_(False)


def encoder_phase(kind: str, t5_tokens: int) -> dict[str, int]:
    model = text_encoder(kind)
    ids = torch.zeros(1, t5_tokens if kind == "t5" else 77, dtype=torch.long, device="meta")
    return {"weights": model_bytes(model), "activations": peak(lambda: model(ids, output_hidden_states=kind != "t5"))}


def transformer_inputs(name: str, size: int) -> dict[str, torch.Tensor]:
    spec, latent = MODELS[name], size // 8
    batch, text = spec["batch"], spec["t5_tokens"] + (0 if name.startswith("flux") else 77)

    def empty(*shape: int, dtype: torch.dtype = DTYPE) -> torch.Tensor:
        return torch.empty(*shape, device="meta", dtype=dtype)

    common = {"encoder_hidden_states": empty(batch, text, 4096), "timestep": empty(batch)}
    if not name.startswith("flux"):
        return {**common, "hidden_states": empty(batch, 16, latent, latent), "pooled_projections": empty(batch, 2048)}
    tokens = (latent // 2) ** 2
    return {
        **common, "hidden_states": empty(batch, tokens, 64), "pooled_projections": empty(batch, 768),
        "guidance": empty(batch, dtype=torch.float32), "txt_ids": torch.zeros(text, 3, device="meta"),
        "img_ids": torch.zeros(tokens, 3, device="meta"),
    }  # fmt: skip


def transformer_phase(name: str, size: int) -> dict[str, int]:
    model = full_width_transformer(MODELS[name]["transformer"], num_blocks=None, device="meta", dtype=DTYPE)
    inputs = transformer_inputs(name, size)
    return {"weights": model_bytes(model), "activations": peak(lambda: model(**inputs, return_dict=False))}


def vae_phase(name: str, size: int) -> dict[str, int]:
    from diffusers import AutoencoderKL

    spec = MODELS[name]
    with torch.device("meta"):
        vae = AutoencoderKL(**FLOW_VAE, scaling_factor=spec["scaling_factor"], shift_factor=spec["shift_factor"])
    vae = vae.to(DTYPE).eval().requires_grad_(False)
    latent = torch.empty(1, 16, size // 8, size // 8, device="meta", dtype=DTYPE)
    return {"weights": model_bytes(vae), "activations": peak(lambda: vae.decode(latent).sample)}


def held_bytes(name: str, size: int) -> int:
    """Tensors kept on the GPU across phases: text embeddings (cond + uncond) and the latents."""
    inputs = transformer_inputs(name, size)
    return sum(t.numel() * t.element_size() for t in inputs.values()) * 2


def estimate(name: str, size: int, budget_gb: float, margin_gb: float) -> dict:
    spec = MODELS[name]
    phases = {f"text_encoder_{kind}": encoder_phase(kind, spec["t5_tokens"]) for kind in spec["text_encoders"]}
    phases["transformer"] = transformer_phase(name, size)
    phases["vae_decode"] = vae_phase(name, size)
    held = held_bytes(name, size)
    weights = sum(p["weights"] for p in phases.values())
    plain = weights + max(p["activations"] for p in phases.values()) + held
    offload = max(p["weights"] + p["activations"] for p in phases.values()) + held

    def verdict(total: int) -> dict:
        return {"peak_gb": total / GB, "with_margin_gb": total / GB + margin_gb,
                "fits_budget": total / GB + margin_gb <= budget_gb}  # fmt: skip

    return {
        "phases_gb": {k: {n: v / GB for n, v in p.items()} for k, p in phases.items()},
        "weights_gb": weights / GB,
        "held_on_gpu_gb": held / GB,
        "plain": verdict(plain),
        "model_cpu_offload": verdict(offload),
        "offload_vs_plain": offload / plain,
        "largest_offload_phase": max(phases, key=lambda k: phases[k]["weights"] + phases[k]["activations"]),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels")
    parser.add_argument("--budget-gb", type=float, default=24.0)
    parser.add_argument("--margin-gb", type=float, default=1.5, help="CUDA context, workspaces, fragmentation")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args(argv)
    result = {
        "benchmark": "mmdit_memory",
        "setup": {"size_px": args.size, "dtype": "bfloat16", "budget_gb": args.budget_gb, "margin_gb": args.margin_gb},
        **{name: estimate(name, args.size, args.budget_gb, args.margin_gb) for name in args.models},
        "notes": "meta-device measurement of live tensors; flash-style attention (CUDA SDPA); weights from the "
        "configs above; offload = diffusers enable_model_cpu_offload (one component resident at a time)",
        "environment": environment(),
    }
    print_json(result)


if __name__ == "__main__":
    main()
