"""editkit against the research code's approach, in the same run on the same UNet.

Full-size SD 1.5 UNet architecture (random weights: the real model's cost). Every figure is a ratio
against a baseline measured in the same run, interleaved, with the absolute times beside it:

- ``style``: the StyleID diffusers port's approach, forward hooks on each injected ``attn1`` that
  recompute q/k/v from the layer input (recording: q, k, v in fp32) and, when injecting, recompute
  the attention with materialised probabilities and replace the output the layer already computed;
  against editkit's processor (one SDPA call per layer; records only the style's k/v in fp16) and
  the stock UNet forward (the floor).
- ``materialised``: CDS's approach, attention probabilities materialised on every layer (diffusers'
  ``AttnProcessor`` arithmetic) and kept, under a forward + backward pass to the latent; against
  editkit (SDPA, up-block self-attention outputs recorded with their graph). Also the bytes
  autograd saves for backward (CPU) or the peak CUDA memory.
- ``decode_per_step``: the refinement paper's code decodes the latent with the VAE at every
  denoising step (for a heat map); editkit decodes once. Full-size SD VAE architecture.

    python -m benchmarks.research_baselines --size 128 --steps 4 --repeats 2
"""

from __future__ import annotations

import argparse
import contextlib
import math

import torch

from benchmarks.timing import environment, interleaved_medians, peak_memory, print_json, saved_activation_bytes
from editkit.attention import SelfAttentionOutputRecorder, attach
from editkit.style import FeatureRecorder, StyleCache, StyleInjectionController, default_style_sites
from editkit.testing import full_size_sd15_unet

TIMESTEP = 500


def _ratios(times: dict, baseline: str) -> dict:
    """Each configuration's wall and CPU median over the baseline's."""
    base = times[baseline]
    return {
        name: {"wall": t["median_s"] / base["median_s"], "cpu": t["cpu_median_s"] / base["cpu_median_s"]}
        for name, t in times.items()
        if name != baseline
    }


def _heads(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    batch, tokens, dim = tensor.shape
    return tensor.view(batch, tokens, heads, dim // heads).transpose(1, 2)  # (batch, heads, tokens, head_dim)


class StyleIDHooks:
    """Forward hooks in the StyleID diffusers port's manner: recompute q/k/v (and attention) per layer."""

    def __init__(self, unet, sites: list[str], gamma: float = 0.75, tau: float = 1.5) -> None:
        self.modules = {name: unet.get_submodule(name) for name in sites}
        self.gamma, self.tau = gamma, tau
        self.store: dict[str, dict[str, torch.Tensor]] = {}
        self.content: dict[str, torch.Tensor] = {}
        self.inject = False

    @contextlib.contextmanager
    def installed(self, inject: bool):
        self.inject = inject
        handles = [m.register_forward_hook(self._hook(name)) for name, m in self.modules.items()]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, name: str):
        def hook(module, args, output):
            hidden = args[0]
            query, key, value = (_heads(proj(hidden), module.heads) for proj in (module.to_q, module.to_k, module.to_v))
            if not self.inject:  # record every tensor in fp32, as the research code pickles them
                self.store[name] = {"q": query.float().clone(), "k": key.float().clone(), "v": value.float().clone()}
                return output
            saved = self.store[name]
            query = self.gamma * saved["q"].to(query.dtype) + (1 - self.gamma) * query
            logits = query @ saved["k"].to(query.dtype).transpose(-1, -2) * (self.tau / math.sqrt(query.shape[-1]))
            hidden = logits.softmax(dim=-1) @ saved["v"].to(query.dtype)  # materialised probabilities
            hidden = hidden.transpose(1, 2).reshape(output.shape)
            return module.to_out[1](module.to_out[0](hidden))  # replaces the output already computed

        return hook


def style(unet, args, device, dtype) -> dict:
    sites = default_style_sites(unet)
    sample, context = _inputs(unet, 1, args.size, device, dtype)
    hooks = StyleIDHooks(unet, sites)
    recorder = FeatureRecorder(sites, ("key", "value"), [TIMESTEP])
    content_recorder = FeatureRecorder(sites, ("query",), [TIMESTEP])

    def forward():
        """``--calls`` UNet calls under one attach / hook installation, as a denoising loop runs them."""
        with torch.no_grad():
            for _ in range(args.calls):
                unet(sample, TIMESTEP, encoder_hidden_states=context)

    def run_with(controller):
        def run():
            with attach(unet, controller):
                controller.begin_step(0, TIMESTEP)
                forward()

        return run

    def run_hooks(inject: bool):
        def run():
            with hooks.installed(inject):
                forward()

        return run

    run_hooks(False)()
    run_with(recorder)()
    run_with(content_recorder)()
    header = {"model": "benchmark", "size": (args.size, args.size), "num_inference_steps": 1, "resample_steps": 0}
    header |= {"sites": tuple(sites), "timesteps": (TIMESTEP,)}
    style_cache = StyleCache.from_recorder(recorder, sample, kind="style", **header)
    content_cache = StyleCache.from_recorder(content_recorder, sample, kind="content", **header)
    injector = StyleInjectionController(sites, style_cache, content_cache)
    times = interleaved_medians(
        {
            "stock_forward": forward,
            "styleid_hooks_record": run_hooks(False),
            "editkit_record": run_with(recorder),
            "styleid_hooks_inject": run_hooks(True),
            "editkit_inject": run_with(injector),
        },
        repeats=args.repeats,
        warmup=1,
        device=str(device),
    )
    styleid_bytes = sum(t.numel() * t.element_size() for rec in hooks.store.values() for t in rec.values())
    ratios = _ratios(times, "stock_forward")
    return {
        "sites": len(sites),
        "times": times,
        "vs_stock_forward": ratios,
        "editkit_gain": {
            kind: times[f"styleid_hooks_{kind}"]["cpu_median_s"] / times[f"editkit_{kind}"]["cpu_median_s"]
            for kind in ("record", "inject")
        },
        "recorded_bytes_per_step_per_image": {
            "styleid_qkv_fp32": styleid_bytes,
            "editkit_style_kv_fp16": style_cache.nbytes(),
            "editkit_content_q_fp16": content_cache.nbytes(),
        },
        "injected": len(injector.injected),
    }


class MaterialisingProcessor:
    """diffusers ``AttnProcessor`` arithmetic (probabilities materialised), every layer's kept (CDS)."""

    def __init__(self, name: str, store: dict) -> None:
        self.name, self.store = name, store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))  # (batch * heads, tokens, head_dim)
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key, attention_mask)
        self.store[self.name] = probs
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        return attn.to_out[1](attn.to_out[0](hidden_states))


def materialised(unet, args, device, dtype) -> dict:
    sample, context = _inputs(unet, 2, args.size, device, dtype)
    probs: dict[str, torch.Tensor] = {}
    snapshot = dict(unet.attn_processors)
    cds_processors = {key: MaterialisingProcessor(key, probs) for key in snapshot}
    outputs: dict[str, torch.Tensor] = {}
    up_attn1 = [n for n, _ in unet.named_modules() if n.startswith("up_blocks") and n.endswith("attn1")]

    def backward(latent):
        loss = sum(o.float().square().mean() for o in outputs.values())
        torch.autograd.grad(loss, latent)

    def cds():
        unet.set_attn_processor(dict(cds_processors))
        handles = [unet.get_submodule(n).register_forward_hook(_keep(outputs, n)) for n in up_attn1]
        try:
            with torch.enable_grad():
                latent = sample.clone().requires_grad_(True)
                unet(latent, TIMESTEP, encoder_hidden_states=context)
                backward(latent)
        finally:
            for handle in handles:
                handle.remove()
            unet.set_attn_processor(dict(snapshot))
            probs.clear()
            outputs.clear()

    def editkit():
        recorder = SelfAttentionOutputRecorder(sites="up_blocks", keep_grad=True)
        with attach(unet, recorder), torch.enable_grad():
            latent = sample.clone().requires_grad_(True)
            unet(latent, TIMESTEP, encoder_hidden_states=context)
            outputs.update(recorder.outputs)
            backward(latent)
        outputs.clear()

    runs = {"editkit": editkit, "cds_materialised": cds}
    times = interleaved_medians(runs, args.repeats, 1, str(device))
    return {
        "times": times,
        "cds_vs_editkit": _ratios(times, "editkit")["cds_materialised"],
        "saved_for_backward_bytes": {name: saved_activation_bytes(run, unet) for name, run in runs.items()},
        "cuda_peak_bytes": {name: peak_memory(run, str(device)) for name, run in runs.items()},
    }


def _keep(outputs: dict, name: str):
    def hook(module, args, output):
        outputs[name] = output

    return hook


def sd_vae(device, dtype):
    """The SD 1.x VAE architecture (83M parameters) with random weights."""
    from diffusers import AutoencoderKL

    with torch.device(device):
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512,
        )  # fmt: skip
    return vae.to(dtype).eval().requires_grad_(False)


def decode_per_step(unet, args, device, dtype) -> dict:
    from diffusers import DDIMScheduler

    vae = sd_vae(device, dtype)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    sample, context = _inputs(unet, 1, args.size, device, dtype)

    def generate(decode_every_step: bool):
        def run():
            scheduler.set_timesteps(args.steps)
            latents = sample
            with torch.no_grad():
                for t in scheduler.timesteps:
                    eps = unet(torch.cat([latents] * 2), t, encoder_hidden_states=context.repeat(2, 1, 1)).sample
                    uncond, cond = eps.chunk(2)
                    latents = scheduler.step(uncond + 7.5 * (cond - uncond), t, latents).prev_sample
                    if decode_every_step:
                        vae.decode(latents / vae.config.scaling_factor)
                vae.decode(latents / vae.config.scaling_factor)

        return run

    times = interleaved_medians(
        {"editkit_decode_once": generate(False), "paper_decode_every_step": generate(True)},
        args.repeats,
        1,
        str(device),
    )
    return {
        "steps": args.steps,
        "times": times,
        "paper_vs_editkit": _ratios(times, "editkit_decode_once")["paper_decode_every_step"],
        "note": "the ratio grows with resolution (VAE decode ~ a UNet pass at 512 px on GPU)",
    }


def _inputs(unet, batch: int, size: int, device, dtype):
    generator = torch.Generator().manual_seed(0)
    latent = size // 8
    sample = torch.randn(batch, 4, latent, latent, generator=generator).to(device, dtype)
    context = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=generator).to(device, dtype)
    return sample, context


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (latent = size / 8)")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps of the decode comparison")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float16" if torch.cuda.is_available() else "float32")
    parser.add_argument("--only", nargs="*", choices=("style", "materialised", "decode_per_step"), default=None)
    parser.add_argument("--calls", type=int, default=4, help="UNet calls per timed run of the style section")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    unet = full_size_sd15_unet(dtype=dtype, device=device)
    result = {"benchmark": "research_baselines", "size_px": args.size, "device": args.device, "dtype": args.dtype}
    for name, section in (("style", style), ("materialised", materialised), ("decode_per_step", decode_per_step)):
        if args.only is None or name in args.only:
            result[name] = section(unet, args, device, dtype)
    result["environment"] = environment()
    print_json(result)


if __name__ == "__main__":
    main()
