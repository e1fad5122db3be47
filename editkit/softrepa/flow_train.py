"""SoftREPA training on MM-DiT flow models (SD3 / SD3.5; FLUX.1 as editkit's extension).

The training loop, objective, checkpoints, validation and token file are those of
:mod:`editkit.softrepa.train`; what differs per family lives here, written against the backbone
interface (:func:`editkit.backbones.backbone_for`): per-layer tokens on the first joint blocks
(:mod:`editkit.softrepa.mmdit_tokens`), the prompt encoding (sequence + pooled embeddings), and the
rectified-flow forward process of the released code (``SD3EulerDC.error``): one integer timestep
``t`` uniform over ``0 .. num_train_timesteps - 1`` per step, ``sigma = t / num_train_timesteps``
(no resolution shift), ``x_t = (1 - sigma) x0 + sigma noise`` with one noise sample shared by every
pair, and the target velocity ``noise - x0``.
"""

from __future__ import annotations

import torch

from editkit.backbones import backbone_for
from editkit.backbones.base import FlowConditioning
from editkit.backbones.families import family_of_model
from editkit.backbones.flow_matching import flow_noisy, flow_velocity
from editkit.conditioning import TextConditioning
from editkit.errors import InputError
from editkit.softrepa.mmdit_tokens import MMDiTSoftTokenController, MMDiTSoftTokens, default_mmdit_sites
from editkit.softrepa.tokens import INIT_STD
from editkit.softrepa.train import _Trainer

__all__ = ["FlowTrainer", "flow_sites"]

POOLED = "pooled_projections"


def flow_sites(transformer: torch.nn.Module, patterns: list[str] | None, layers: int) -> list[str]:
    """The token sites: the first ``layers`` joint blocks, or the joint sites ``patterns`` select."""
    from editkit.attention import attention_sites, select_sites

    if patterns is None:
        return default_mmdit_sites(transformer, layers)
    try:
        return select_sites(attention_sites(transformer), patterns, kind="joint")
    except ValueError as error:
        raise InputError(str(error)) from None


def check_family_options(config, family: str | None) -> None:
    """Refuse, before the model loads, options of the other architecture (InputError naming option and family).

    ``family`` None (a Hub repo not cached yet): nothing to check yet.
    """
    from editkit.softrepa.config import _LATER_SETTINGS

    if family is None:
        return
    if family in ("sd3", "flux"):
        if config.time_layout != "shared":
            raise InputError(f"--time-layout {config.time_layout} is a UNet option; {family} tokens use the shared one")
        return
    if config.layers != _LATER_SETTINGS["layers"] or config.max_sequence_length is not None:
        option = "--max-sequence-length" if config.max_sequence_length is not None else "--layers"
        raise InputError(f"{option} is an MM-DiT option (SD3 / SD3.5, FLUX); this is a {family} model")


class FlowTrainer(_Trainer):
    """:class:`editkit.softrepa.train._Trainer` with the MM-DiT tokens, text encoding and flow targets."""

    def make_tokens(self, generator: torch.Generator):
        config, pipe = self.config, self.pipe
        options = {} if config.max_sequence_length is None else {"max_sequence_length": config.max_sequence_length}
        self.backbone = backbone_for(pipe, **options)
        self.num_train_timesteps = int(pipe.scheduler.config.num_train_timesteps)
        self.text_ids = None
        embedder = pipe.transformer.context_embedder
        sites = flow_sites(pipe.transformer, config.sites, config.layers)
        tokens = torch.randn(len(sites), config.num_tokens, embedder.in_features, generator=generator) * INIT_STD
        soft = MMDiTSoftTokens(
            tokens, sites, width=embedder.out_features, time_buckets=config.time_buckets,
            num_train_timesteps=self.num_train_timesteps, base_model=str(config.model), family=family_of_model(pipe),
            generator=generator,
        ).to(self.device)  # fmt: skip
        return soft, MMDiTSoftTokenController(soft)

    def encode(self, captions: list[str]) -> TextConditioning:
        """Caption embeddings as ``TextConditioning(prompt_embeds, {"pooled_projections": pooled})`` (cached)."""
        missing = [c for c in dict.fromkeys(captions) if c not in self.caption_cache]
        if missing:
            encoded = self.backbone.encode_text(missing)
            self.text_ids = encoded.text_ids
            for index, caption in enumerate(missing):
                pooled = encoded.pooled_prompt_embeds[index : index + 1]
                self.caption_cache[caption] = TextConditioning(
                    encoded.prompt_embeds[index : index + 1], {POOLED: pooled}
                )
        return TextConditioning.cat([self.caption_cache[c] for c in captions])

    @torch.no_grad()
    def latents(self, images: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        return self.backbone.encode_image(images.to(self.device, vae.dtype)).float()

    def predictor(self, timestep: int):
        backbone, dtype = self.backbone, self.model.dtype

        def predict(sample: torch.Tensor, context: torch.Tensor, added: dict | None) -> torch.Tensor:
            conditioning = FlowConditioning(context.to(dtype), added[POOLED].to(dtype), self.text_ids)
            time = torch.tensor(float(timestep), device=sample.device)
            with self.accelerator.autocast():
                return backbone.denoise(sample.to(dtype), time, conditioning)

        return predict

    def noised(self, latents: torch.Tensor, generator: torch.Generator, timestep: int | None = None):
        """Shared timestep and ONE shared noise sample for every pair; returns ``(t, x_t, noise - x0)``."""
        if timestep is None:
            timestep = int(torch.randint(self.num_train_timesteps, (1,), generator=generator))
        noise = torch.randn((1, *latents.shape[1:]), generator=generator).to(self.device)
        sigma = timestep / self.num_train_timesteps
        return timestep, flow_noisy(latents, noise, sigma), flow_velocity(latents, noise)
