"""Peak GPU memory of SDXL 1024x1024 stylization and editing, estimated without a GPU, against a 24 GB budget.

The full-size SDXL UNet (2.57B parameters) and VAE are built on the ``meta`` device (shapes and
dtypes, no storage) and run for real on meta tensors while a dispatch mode counts the bytes of every
tensor that is alive: each new (non-view) op output is added when created and subtracted when Python
frees it, so the peak is the peak of live activations, exactly as the model code allocates them
(autograd's saved tensors included when gradients are on). Attention is replaced by a flash-style
stand-in (output + log-sum-exp, no probabilities), which is what SDPA does on a CUDA GPU; the
materialised alternative is reported beside it. Allocator rounding, cuBLAS/cuDNN workspaces and the
CUDA context (about 0.5-1 GB) are not counted: ``margin_gb`` adds them.

- ``plain``: one CFG step (batch 2), fp16 UNet; VAE decode in fp32 (SDXL's VAE overflows in fp16).
- ``stylize``: the method's UNet passes are batch 1 (guidance 1) or 2 (CFG); its activation memory is
  the UNet's; the style cache (content queries + style keys/values at the default sites, every step,
  fp16) is counted apart, on the GPU or streamed from the CPU (``offload_features=True``: one step).
- ``edit``: the contrastive edit's target branch, forward + backward to the latent (batch 1), with and
  without gradient checkpointing, plus the no-grad source pass.

    python -m benchmarks.memory_estimate [--size 1024] [--steps 50] [--budget-gb 24]
"""

from __future__ import annotations

import argparse
import contextlib
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from benchmarks.timing import environment, print_json

GB = 1e9
# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the values that shape memory)
SDXL_UNET_CONFIG = {
    "sample_size": 128,
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "use_linear_projection": True,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
}
SDXL_VAE_CONFIG = {
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "latent_channels": 4,
    "layers_per_block": 2,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}
# CLIP ViT-L/14 text (123M) + OpenCLIP ViT-bigG/14 text with projection (695M) parameters
SDXL_TEXT_ENCODER_PARAMETERS = 123_060_480 + 694_659_840


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of live tensors created under it (views and in-place results excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outputs = tree_flatten(out)[0]
        for tensor, spec in zip(outputs, func._schema.returns):
            if isinstance(tensor, torch.Tensor) and spec.alias_info is None:
                size = tensor.numel() * tensor.element_size()
                self.now += size
                self.peak = max(self.peak, self.now)
                weakref.finalize(tensor, self._free, size)
        return out

    def _free(self, size: int) -> None:
        self.now -= size


class _FlashLike(torch.autograd.Function):
    """Attention with flash-attention's memory: output and log-sum-exp saved, no probabilities."""

    @staticmethod
    def forward(ctx, query, key, value):
        out = query.new_empty((*query.shape[:-1], value.shape[-1]))
        lse = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        query, key, value, _, _ = ctx.saved_tensors
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def flash_kernel(query, key, value, attn_mask=None, scale=None, on_probs=None):
    """An ``AttentionKernel`` stand-in with flash attention's memory (meta tensors)."""
    return _FlashLike.apply(query, key, value)


@contextlib.contextmanager
def flash_attention(model: torch.nn.Module):
    """editkit's processor on every site of ``model`` with the flash-style kernel."""
    from editkit.attention import AttentionController, attach

    with attach(model, AttentionController()):
        for processor in model.attn_processors.values():
            processor.kernel = flash_kernel
        yield


def build_meta_models(dtype: torch.dtype = torch.float16):
    """The SDXL UNet (``dtype``) and VAE (fp32) on the meta device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG).to(dtype).eval().requires_grad_(False)
        vae = AutoencoderKL(**SDXL_VAE_CONFIG).eval().requires_grad_(False)
    return unet, vae


def model_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def measure(run, model: torch.nn.Module, flash: bool = True) -> int:
    """Peak live bytes of the tensors ``run`` creates (meta device); attention of ``model`` flash-style."""
    counter = LiveBytes()
    with flash_attention(model) if flash else contextlib.nullcontext(), counter:
        run()
    return counter.peak


def unet_inputs(unet, batch: int, size: int, dtype: torch.dtype, grad: bool = False):
    latent = size // 8
    sample = torch.empty(batch, 4, latent, latent, device="meta", dtype=dtype, requires_grad=grad)
    kwargs = {
        "encoder_hidden_states": torch.empty(batch, 77, 2048, device="meta", dtype=dtype),
        "added_cond_kwargs": {
            "text_embeds": torch.empty(batch, 1280, device="meta", dtype=dtype),
            "time_ids": torch.empty(batch, 6, device="meta", dtype=dtype),
        },
    }
    return sample, kwargs


def unet_forward_peak(unet, batch: int, size: int, dtype: torch.dtype, flash: bool = True) -> int:
    sample, kwargs = unet_inputs(unet, batch, size, dtype)

    def run():
        with torch.no_grad():
            unet(sample, torch.tensor(500, device="meta"), **kwargs)

    return measure(run, unet, flash)


def unet_backward_peak(unet, batch: int, size: int, dtype: torch.dtype, checkpointing: bool) -> int:
    """Forward + backward to the latent (the edit's gradient step)."""
    sample, kwargs = unet_inputs(unet, batch, size, dtype, grad=True)
    if checkpointing:
        unet.enable_gradient_checkpointing()

    def run():
        with torch.enable_grad():
            out = unet(sample, torch.tensor(500, device="meta"), **kwargs).sample
            torch.autograd.grad(out.float().square().mean(), sample)

    try:
        return measure(run, unet)
    finally:
        unet.disable_gradient_checkpointing()


def vae_peaks(vae, size: int) -> dict[str, int]:
    image = torch.empty(1, 3, size, size, device="meta")
    latent = torch.empty(1, 4, size // 8, size // 8, device="meta")

    def encode():
        with torch.no_grad():
            return vae.encode(image).latent_dist.mean

    def decode():
        with torch.no_grad():
            return vae.decode(latent).sample

    return {"encode": measure(encode, vae), "decode": measure(decode, vae)}


def style_cache_bytes(unet, size: int, steps: int) -> int:
    """Content queries + style keys/values, fp16, at the default SDXL sites for every step."""
    from editkit.attention import attention_sites
    from editkit.style import DEFAULT_SITE_PATTERNS

    patterns = DEFAULT_SITE_PATTERNS["sdxl"]
    total = 0
    for site in attention_sites(unet):
        if site.kind != "self" or not any(site.name.startswith(p + ".") for p in patterns):
            continue
        level = len(unet.config.block_out_channels) - 1 - site.block_index  # up block i works at level n-1-i
        tokens = (size // 8 // 2**level) ** 2
        total += 3 * tokens * unet.get_submodule(site.name).to_q.out_features * 2  # q + k + v, fp16
    return total * steps


def estimate(size: int, steps: int, budget_gb: float, margin_gb: float) -> dict:
    dtype = torch.float16
    unet, vae = build_meta_models(dtype)
    weights = model_bytes(unet) + model_bytes(vae) + SDXL_TEXT_ENCODER_PARAMETERS * 2
    vae_peak = vae_peaks(vae, size)
    vae_phase = max(vae_peak.values())
    unet_b1, unet_b2 = (unet_forward_peak(unet, b, size, dtype) for b in (1, 2))
    unet_b2_materialised = unet_forward_peak(unet, 2, size, dtype, flash=False)
    cache = style_cache_bytes(unet, size, steps)
    grad_pass = {ckpt: unet_backward_peak(unet, 1, size, dtype, ckpt) for ckpt in (False, True)}
    edit = {ckpt: max(peak, unet_b2) for ckpt, peak in grad_pass.items()}  # the no-grad source pass ran before
    plain_peak = weights + max(unet_b2, vae_phase)

    def total(activations: int, extra: int = 0) -> dict:
        peak = weights + max(activations, vae_phase) + extra
        return {"peak_gb": peak / GB, "with_margin_gb": peak / GB + margin_gb,
                "fits_budget": peak / GB + margin_gb <= budget_gb}  # fmt: skip

    return {
        "setup": {
            "size_px": size,
            "steps": steps,
            "unet_dtype": "float16",
            "vae_dtype": "float32",
            "budget_gb": budget_gb,
            "margin_gb": margin_gb,
        },
        "weights_gb": {
            "unet": model_bytes(unet) / GB,
            "vae": model_bytes(vae) / GB,
            "text_encoders": SDXL_TEXT_ENCODER_PARAMETERS * 2 / GB,
            "total": weights / GB,
        },
        "activations_gb": {
            "unet_forward_batch1": unet_b1 / GB,
            "unet_forward_batch2": unet_b2 / GB,
            "unet_forward_batch2_materialised_attention": unet_b2_materialised / GB,
            "vae_encode_fp32": vae_peak["encode"] / GB,
            "vae_decode_fp32": vae_peak["decode"] / GB,
            "edit_grad_pass": grad_pass[False] / GB,
            "edit_grad_pass_checkpointed": grad_pass[True] / GB,
        },
        "plain_generation_cfg": total(unet_b2),
        "stylize_cache_gb": cache / GB,
        "stylize_guidance1_cache_on_gpu": total(unet_b1, cache),
        "stylize_cfg_cache_on_gpu": total(unet_b2, cache),
        "stylize_cfg_cache_streamed_from_cpu": total(unet_b2, cache // steps),
        "stylize_vs_plain_cache_excluded": (weights + max(unet_b2, vae_phase)) / plain_peak,
        "edit": total(edit[False]),
        "edit_checkpointed": total(edit[True]),
        "notes": "meta-device measurement of live tensors; flash-style attention (CUDA SDPA); the edit's "
        "peak is the larger of its no-grad source pass (batch 2) and its target grad pass (batch 1)",
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (cache entries per site)")
    parser.add_argument("--budget-gb", type=float, default=24.0)
    parser.add_argument("--margin-gb", type=float, default=1.5, help="CUDA context, workspaces, fragmentation")
    args = parser.parse_args(argv)
    result = {"benchmark": "memory_estimate", **estimate(args.size, args.steps, args.budget_gb, args.margin_gb)}
    result["environment"] = environment()
    print_json(result)


if __name__ == "__main__":
    main()
