"""Train the shapes-world text-to-image model from scratch and save it as a diffusers pipeline.

Three phases, one seed:

1. a tiny ``AutoencoderKL`` (32 px images, 4 latent channels, one downsample: scale factor 2 ->
   16x16 latents) learns to reconstruct rendered scenes; its ``scaling_factor`` is then set to
   1/std of the latents;
2. a ``UNet2DConditionModel`` (cross-attention at two resolutions) and a small ``CLIPTextModel``
   learn epsilon prediction jointly on latents of a fixed rendered data set, with 10% of the
   captions dropped for classifier-free guidance, min-SNR loss weighting and an EMA of the weights;
3. the VAE decoder alone is fine-tuned (encoder frozen, so the UNet's latent space is unchanged).

The result is a ``StableDiffusionPipeline`` folder (safetensors only, ``DDIMScheduler``, no safety
checker). The detector never takes part in training. Usage::

    python -m benchmarks.shapes.train --output assets/models/shapes-sd            # default, CPU
    python -m benchmarks.shapes.train --config large --output /tmp/shapes-sd-large  # GPU
    # more UNet + text-encoder steps on a saved pipeline (VAE fixed, lr 3e-4 cosine, EMA from it)
    python -m benchmarks.shapes.train --continue-from assets/models/shapes-sd --unet-steps 1500 \
        --batch-size 128 --ema-decay 0.998 --output /tmp/shapes-sd-continued
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.shapes.world import IMAGE_SIZE, sample_batch, vocabulary

logger = logging.getLogger(__name__)

TOKENIZER_MAX_LENGTH = 24
# --continue-from defaults: a lower peak learning rate and a short warm-up for the fresh optimizer
CONTINUE_LR = 3e-4
CONTINUE_WARMUP = 100


@dataclass
class TrainConfig:
    """Everything a training run depends on (sizes, steps, optimisation)."""

    seed: int = 0
    image_size: int = IMAGE_SIZE
    num_images: int = 30_000
    # VAE
    vae_channels: tuple[int, ...] = (32, 64)
    vae_groups: int = 16
    vae_steps: int = 1_000
    vae_batch_size: int = 24
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    # phase 3: decoder-only fine-tuning (encoder frozen, so the UNet's latent space is unchanged)
    decoder_steps: int = 1_000
    decoder_lr: float = 5e-4
    # text encoder
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    # UNet
    unet_channels: tuple[int, ...] = (32, 64, 64)
    unet_layers_per_block: int = 1
    unet_groups: int = 16
    unet_heads: int = 4
    unet_steps: int = 5_000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 200
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    # data
    pattern_prob: float = 0.3
    background_prob: float = 0.3
    log_every: int = 100


CONFIGS: dict[str, TrainConfig] = {
    "default": TrainConfig(),
    "tiny": TrainConfig(
        num_images=64,
        vae_channels=(8, 16, 16),
        vae_groups=4,
        vae_steps=2,
        vae_batch_size=4,
        text_hidden=16,
        unet_channels=(8, 16, 16),
        unet_groups=4,
        unet_heads=2,
        unet_steps=2,
        batch_size=4,
        warmup_steps=1,
        decoder_steps=2,
        log_every=1,
    ),
    "large": TrainConfig(
        num_images=200_000,
        vae_channels=(64, 128),
        vae_groups=32,
        vae_steps=10_000,
        vae_batch_size=64,
        vae_lr=5e-4,
        text_hidden=128,
        text_layers=4,
        unet_channels=(64, 128, 256),
        unet_layers_per_block=2,
        unet_groups=32,
        unet_heads=8,
        unet_steps=60_000,
        batch_size=256,
        lr=3e-4,
        warmup_steps=1_000,
        ema_decay=0.9999,
    ),
}


# ----------------------------------------------------------------------------------------------
# Components


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP-style BPE of one word (last symbol carries ``</w>``) with the given merge ranks."""
    pieces = [*word[:-1], word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [(ranks.get(p, math.inf), i) for i, p in enumerate(itertools.pairwise(pieces))]
        rank, i = min(pairs)
        if rank == math.inf:
            break
        pieces = [*pieces[:i], pieces[i] + pieces[i + 1], *pieces[i + 2 :]]
    return pieces


def word_merges(words: list[str]) -> list[tuple[str, str]]:
    """Merges that make every word a single token under BPE's rank order.

    A merge appended last has the lowest priority, so it never fires inside a word that already
    merges completely: appending the merge of a word's first two current pieces until it is one
    token never breaks an earlier word. (``editkit.testing.tiny_tokenizer`` chains merges left to
    right, which BPE's rank order can break, e.g. ``orange`` after ``an``.)
    """
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        while len(pieces := _bpe(word, ranks)) > 1:
            ranks[(pieces[0], pieces[1])] = len(merges)
            merges.append((pieces[0], pieces[1]))
    return merges


def build_tokenizer():
    """A CLIP tokenizer (byte-level alphabet, as ``editkit.testing.tiny_tokenizer``) in which every
    word of the world's vocabulary is one token; any other string still tokenizes by characters."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    from editkit.testing import BOS_TOKEN, EOS_TOKEN

    alphabet = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {BOS_TOKEN: 0, EOS_TOKEN: 1}
    for symbol in alphabet + [a + "</w>" for a in alphabet]:
        vocab.setdefault(symbol, len(vocab))
    merges = word_merges(vocabulary())
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=TOKENIZER_MAX_LENGTH,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
    )


def build_text_encoder(config: TrainConfig, vocab_size: int):
    """A small ``CLIPTextModel`` with bos 0 / eos = pad 1, like the tokenizer."""
    from transformers import CLIPTextConfig, CLIPTextModel

    text_config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=config.text_hidden,
        intermediate_size=4 * config.text_hidden,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        max_position_embeddings=TOKENIZER_MAX_LENGTH,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=config.text_hidden,
    )
    return CLIPTextModel(text_config)


def build_vae(config: TrainConfig):
    """A tiny ``AutoencoderKL``: ``len(vae_channels) - 1`` downsamples, 4 latent channels."""
    from diffusers import AutoencoderKL

    n = len(config.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=config.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        latent_channels=4,
        norm_num_groups=config.vae_groups,
        layers_per_block=1,
        sample_size=config.image_size,
    )


def build_unet(config: TrainConfig):
    """A ``UNet2DConditionModel`` with cross-attention in the two highest-resolution levels.

    Down: CrossAttnDownBlock2D x (n-1) + DownBlock2D; up mirrors it. Attention site names are the
    standard diffusers ones (``down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor``).
    """
    from diffusers import UNet2DConditionModel

    n = len(config.unet_channels)
    factor = 2 ** (len(config.vae_channels) - 1)
    return UNet2DConditionModel(
        sample_size=config.image_size // factor,
        in_channels=4,
        out_channels=4,
        block_out_channels=config.unet_channels,
        layers_per_block=config.unet_layers_per_block,
        norm_num_groups=config.unet_groups,
        attention_head_dim=config.unet_heads,
        cross_attention_dim=config.text_hidden,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
    )


def build_scheduler():
    """The SD 1.x ``DDIMScheduler`` configuration."""
    from editkit.testing import sd_ddim_scheduler

    return sd_ddim_scheduler()


# ----------------------------------------------------------------------------------------------
# Helpers


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` -> float ``(N, 3, H, W)`` in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's maximum length, exactly as the pipeline does."""
    return tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    """Linear warm-up then cosine decay to 10%."""

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return schedule


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * model``, parameter by parameter."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)


# ----------------------------------------------------------------------------------------------
# Phases


def train_vae(config: TrainConfig, images: torch.Tensor, accelerator, generator: torch.Generator):
    """Phase 1: reconstruction (MSE) + a small KL term. Returns the trained VAE."""
    vae = build_vae(config)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(min(100, config.vae_steps), config.vae_steps))
    vae, optimizer, scheduler = accelerator.prepare(vae, optimizer, scheduler)
    vae.train()
    start = time.time()
    for step in range(config.vae_steps):
        idx = torch.randint(0, images.shape[0], (config.vae_batch_size,), generator=generator)
        batch = images[idx].to(accelerator.device)
        posterior = accelerator.unwrap_model(vae).encode(batch).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(
            accelerator.device
        )
        recon = accelerator.unwrap_model(vae).decode(z).sample
        loss = F.mse_loss(recon, batch) + config.vae_kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        if step % config.log_every == 0 or step == config.vae_steps - 1:
            logger.info("vae step %d loss %.5f (%.0f s)", step, loss.item(), time.time() - start)
    return accelerator.unwrap_model(vae).eval().requires_grad_(False)


@torch.no_grad()
def encode_dataset(vae, images: torch.Tensor, device, batch_size: int = 512):
    """Posterior means and stds of every image, on CPU."""
    means, stds = [], []
    for i in range(0, images.shape[0], batch_size):
        dist = vae.encode(images[i : i + batch_size].to(device)).latent_dist
        means.append(dist.mean.cpu())
        stds.append(dist.std.cpu())
    return torch.cat(means), torch.cat(stds)


def _snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    snr = alphas_cumprod[timesteps] / (1 - alphas_cumprod[timesteps])
    return torch.clamp(snr, max=gamma) / snr


def train_diffusion(
    config: TrainConfig,
    latents: tuple[torch.Tensor, torch.Tensor],
    captions: list[str],
    tokenizer,
    accelerator,
    generator: torch.Generator,
    unet=None,
    text_encoder=None,
):
    """Phase 2: UNet + text encoder, epsilon prediction with CFG caption dropout. Returns EMA copies.

    With ``unet`` and ``text_encoder`` given (``--continue-from``), training continues from them:
    fresh optimizer and schedule, EMA initialised from their weights and decaying at
    ``config.ema_decay`` from the first step (no EMA warm-up).
    """
    resumed = unet is not None
    if unet is None:
        unet = build_unet(config)
        text_encoder = build_text_encoder(config, len(tokenizer))
    unet.requires_grad_(True)
    text_encoder.requires_grad_(True)
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder)
    ema_text.requires_grad_(False)
    noise_scheduler = build_scheduler()
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(accelerator.device)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config.warmup_steps, config.unet_steps))
    unet, text_encoder, optimizer, scheduler = accelerator.prepare(unet, text_encoder, optimizer, scheduler)
    ema_unet.to(accelerator.device)
    ema_text.to(accelerator.device)
    unet.train()
    text_encoder.train()
    token_ids = tokenize(tokenizer, captions)
    empty_ids = tokenize(tokenizer, [""])[0]
    means, stds = latents
    start = time.time()
    for step in range(config.unet_steps):
        idx = torch.randint(0, means.shape[0], (config.batch_size,), generator=generator)
        eps_latent = torch.randn(means[idx].shape, generator=generator)
        x0 = (means[idx] + stds[idx] * eps_latent).to(accelerator.device)
        ids = token_ids[idx].clone()
        drop = torch.rand(config.batch_size, generator=generator) < config.caption_dropout
        ids[drop] = empty_ids
        noise = torch.randn(x0.shape, generator=generator).to(accelerator.device)
        timesteps = torch.randint(
            0, noise_scheduler.config.num_train_timesteps, (config.batch_size,), generator=generator
        ).to(accelerator.device)
        noisy = noise_scheduler.add_noise(x0, noise, timesteps)
        hidden = text_encoder(ids.to(accelerator.device))[0]
        pred = unet(noisy, timesteps, encoder_hidden_states=hidden).sample
        per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * _snr_weights(alphas_cumprod, timesteps, config.min_snr_gamma)).mean()
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        decay = config.ema_decay if resumed else min(config.ema_decay, (1 + step) / (10 + step))
        ema_update(ema_unet, accelerator.unwrap_model(unet), decay)
        ema_update(ema_text, accelerator.unwrap_model(text_encoder), decay)
        if step % config.log_every == 0 or step == config.unet_steps - 1:
            logger.info("unet step %d loss %.5f (%.0f s)", step, loss.item(), time.time() - start)
    return ema_unet.eval(), ema_text.eval()


def finetune_decoder(config: TrainConfig, vae, images: torch.Tensor, accelerator, generator: torch.Generator):
    """Phase 3: train only the VAE decoder (and ``post_quant_conv``) to reconstruct from sampled
    latents of the frozen encoder: sharper corners without moving the latent space."""
    vae.requires_grad_(False)
    decoder_params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for param in decoder_params:
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(decoder_params, lr=config.decoder_lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(min(50, config.decoder_steps), config.decoder_steps)
    )
    optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
    vae.decoder.train()
    start = time.time()
    for step in range(config.decoder_steps):
        idx = torch.randint(0, images.shape[0], (config.vae_batch_size,), generator=generator)
        batch = images[idx].to(accelerator.device)
        with torch.no_grad():
            posterior = vae.encode(batch).latent_dist
            noise = torch.randn(posterior.mean.shape, generator=generator).to(accelerator.device)
            z = posterior.mean + posterior.std * noise
        loss = F.mse_loss(vae.decode(z).sample, batch)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        if step % config.log_every == 0 or step == config.decoder_steps - 1:
            logger.info("decoder step %d loss %.5f (%.0f s)", step, loss.item(), time.time() - start)
    return vae.eval().requires_grad_(False)


def finetune_decoder_of(source: str | Path, config: TrainConfig, output: str | Path, device: str | None = None):
    """Run phase 3 alone on a saved pipeline (e.g. one trained before phase 3 existed)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers import StableDiffusionPipeline

    accelerator = Accelerator(cpu=device == "cpu")
    set_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed + 1)
    pipe = StableDiffusionPipeline.from_pretrained(source)
    images_np, _, _ = sample_batch(
        config.seed,
        config.num_images,
        training=True,
        size=config.image_size,
        pattern_prob=config.pattern_prob,
        background_prob=config.background_prob,
    )
    start = time.time()
    pipe.vae = finetune_decoder(config, pipe.vae.to(accelerator.device), to_tensor(images_np), accelerator, generator)
    pipe.vae.cpu()
    pipe.save_pretrained(output, safe_serialization=True)
    return {"decoder_seconds": round(time.time() - start, 1)}


def continue_diffusion(source: str | Path, config: TrainConfig, output: str | Path, device: str | None = None) -> dict:
    """Continue phase 2 (UNet + text encoder) from a saved pipeline for ``config.unet_steps`` steps.

    The VAE (and its ``scaling_factor``), tokenizer and scheduler are kept as they are; the training
    scenes are rendered from ``config.seed`` as in :func:`train` and encoded by the frozen VAE
    encoder, so the latents are those the UNet was trained on. Batches and noise come from a
    different generator seed than the original run. The EMA weights are saved to ``output``.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers import StableDiffusionPipeline

    accelerator = Accelerator(cpu=device == "cpu")
    set_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed + 2)
    start = time.time()
    pipe = StableDiffusionPipeline.from_pretrained(source)
    vae = pipe.vae.to(accelerator.device).eval().requires_grad_(False)
    images_np, captions, _ = sample_batch(
        config.seed,
        config.num_images,
        training=True,
        size=config.image_size,
        pattern_prob=config.pattern_prob,
        background_prob=config.background_prob,
    )
    means, stds = encode_dataset(vae, to_tensor(images_np), accelerator.device)
    scaling = float(vae.config.scaling_factor)
    logger.info("encoded %d scenes in %.1f s (scaling_factor %.4f kept)", len(captions), time.time() - start, scaling)
    diffusion_start = time.time()
    unet, text_encoder = train_diffusion(
        config,
        (means * scaling, stds * scaling),
        captions,
        pipe.tokenizer,
        accelerator,
        generator,
        unet=pipe.unet.to(accelerator.device),
        text_encoder=pipe.text_encoder.to(accelerator.device),
    )
    diffusion_time = time.time() - diffusion_start
    pipe.unet, pipe.text_encoder = unet.cpu(), text_encoder.cpu()
    pipe.vae = vae.cpu()
    pipe.save_pretrained(output, safe_serialization=True)
    return write_summary(
        output, config, accelerator, scaling, start, continued_from=str(source), unet_seconds=diffusion_time
    )


def assemble_pipeline(vae, text_encoder, tokenizer, unet):
    """The ``StableDiffusionPipeline`` (DDIM, no safety checker)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def train(config: TrainConfig, output: str | Path, device: str | None = None) -> dict:
    """Run both phases and save the pipeline to ``output``. Returns a summary dict."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator(cpu=device == "cpu")
    set_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    start = time.time()
    images_np, captions, _ = sample_batch(
        config.seed,
        config.num_images,
        training=True,
        size=config.image_size,
        pattern_prob=config.pattern_prob,
        background_prob=config.background_prob,
    )
    images = to_tensor(images_np)
    logger.info("rendered %d training images in %.1f s", len(captions), time.time() - start)
    vae = train_vae(config, images, accelerator, generator)
    vae_time = time.time() - start
    means, stds = encode_dataset(vae, images, accelerator.device)
    scaling = 1.0 / float(means.std())
    vae.register_to_config(scaling_factor=scaling)
    logger.info("latent std %.4f -> scaling_factor %.4f", 1 / scaling, scaling)
    tokenizer = build_tokenizer()
    unet, text_encoder = train_diffusion(
        config, (means * scaling, stds * scaling), captions, tokenizer, accelerator, generator
    )
    decoder_start = time.time()
    vae = finetune_decoder(config, vae, images, accelerator, generator)
    decoder_time = time.time() - decoder_start
    pipe = assemble_pipeline(vae.cpu(), text_encoder.cpu(), tokenizer, unet.cpu())
    pipe.save_pretrained(output, safe_serialization=True)
    times = {"vae_seconds": vae_time, "decoder_seconds": decoder_time}
    return write_summary(output, config, accelerator, scaling, start, **times)


def write_summary(output, config: TrainConfig, accelerator, scaling: float, start: float, **extra) -> dict:
    """Write ``training_summary.json`` (configuration, times, scaling factor, device) and return it.

    ``extra`` entries come after the configuration; float values are seconds, rounded to 0.1 s.
    """
    summary = {"config": dataclasses.asdict(config)}
    summary |= {k: round(v, 1) if isinstance(v, float) else v for k, v in extra.items()}
    summary |= {
        "total_seconds": round(time.time() - start, 1),
        "scaling_factor": scaling,
        "device": str(accelerator.device),
        "torch_threads": torch.get_num_threads(),
    }
    Path(output, "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="default")
    parser.add_argument("--output", default="assets/models/shapes-sd")
    parser.add_argument("--device", default=None, help="'cpu' forces CPU; default: what accelerate picks")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--vae-steps", type=int, default=None)
    parser.add_argument("--unet-steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--num-images", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--warmup-steps", type=int, default=None)
    parser.add_argument("--ema-decay", type=float, default=None)
    parser.add_argument("--log-every", type=int, default=None)
    parser.add_argument("--decoder-steps", type=int, default=None)
    parser.add_argument(
        "--finetune-decoder-of",
        default=None,
        help="skip phases 1-2: load this pipeline folder, run phase 3 (decoder fine-tuning), save to --output",
    )
    parser.add_argument(
        "--continue-from",
        default=None,
        help="load this pipeline folder and train its UNet + text encoder for --unet-steps more steps "
        f"(VAE fixed; fresh optimizer; defaults --lr {CONTINUE_LR}, --warmup-steps {CONTINUE_WARMUP}); "
        "save to --output",
    )
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The named configuration with command-line overrides applied."""
    overrides = {
        name: getattr(args, name)
        for name in (
            "seed",
            "vae_steps",
            "unet_steps",
            "batch_size",
            "num_images",
            "lr",
            "warmup_steps",
            "ema_decay",
            "log_every",
            "decoder_steps",
        )
        if getattr(args, name) is not None
    }
    return dataclasses.replace(CONFIGS[args.config], **overrides)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = _parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.continue_from:
        config = config_from_args(args)
        config = dataclasses.replace(
            config,
            lr=CONTINUE_LR if args.lr is None else args.lr,
            warmup_steps=CONTINUE_WARMUP if args.warmup_steps is None else args.warmup_steps,
        )
        summary = continue_diffusion(args.continue_from, config, args.output, args.device)
    elif args.finetune_decoder_of:
        summary = finetune_decoder_of(args.finetune_decoder_of, config_from_args(args), args.output, args.device)
    else:
        summary = train(config_from_args(args), args.output, device=args.device)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}))


if __name__ == "__main__":
    main()
