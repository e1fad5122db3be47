"""SoftREPA: soft-token contrastive fine-tuning of a frozen text-to-image model (arXiv 2503.08250).

Use trained tokens with any editkit pipeline (they are one more attention controller)::

    from editkit.softrepa import load_soft_tokens

    tokens = load_soft_tokens("tokens.safetensors", model=pipe.unet, strength=1.0)  # MM-DiT: pipe.transformer
    image = pipe(..., attention_controllers=[tokens]).images[0]

or with a plain diffusers text-to-image pipeline::

    from editkit.softrepa import use_soft_tokens

    with use_soft_tokens(pipe.unet, tokens):
        image = pipe("a red cube left of a blue ball").images[0]

Train them with ``editkit softrepa train`` or :func:`train_soft_tokens`. SD3 / SD3.5 and FLUX.1
folders train and load MM-DiT tokens (:mod:`editkit.softrepa.mmdit_tokens`; pass
``model=pipe.transformer``).
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from editkit.softrepa.tokens import SoftTokenController

#: Where each public name lives; imported on first use (PEP 562), so that reading the training
#: defaults (``editkit.softrepa.config``) does not import the attention layer and diffusers.
_EXPORTS = {
    "ContrastiveLossConfig": "loss",
    "contrastive_loss": "loss",
    "error_logits": "loss",
    "pair_errors": "loss",
    "SoftTokenController": "tokens",
    "SoftTokens": "tokens",
    "check_token_family": "tokens",
    "default_sites": "tokens",
    "initial_tokens": "tokens",
    "MMDiTSoftTokenController": "mmdit_tokens",
    "MMDiTSoftTokens": "mmdit_tokens",
    "default_mmdit_sites": "mmdit_tokens",
    "load_soft_tokens": "tokens",
    "read_soft_tokens": "tokens",
    "save_soft_tokens": "tokens",
    "validate_for_unet": "tokens",
    "TrainConfig": "config",
    "TrainResult": "train",
    "train_soft_tokens": "train",
}

__all__ = [
    "ContrastiveLossConfig",
    "MMDiTSoftTokenController",
    "MMDiTSoftTokens",
    "SoftTokenController",
    "SoftTokens",
    "TrainConfig",
    "TrainResult",
    "check_token_family",
    "contrastive_loss",
    "default_mmdit_sites",
    "default_sites",
    "error_logits",
    "initial_tokens",
    "load_soft_tokens",
    "pair_errors",
    "read_soft_tokens",
    "save_soft_tokens",
    "train_soft_tokens",
    "use_soft_tokens",
    "validate_for_unet",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


@contextlib.contextmanager
def use_soft_tokens(unet: torch.nn.Module, controller: SoftTokenController) -> Iterator[SoftTokenController]:
    """Attach ``controller`` to ``unet`` for pipelines that do not call ``begin_step`` (plain diffusers).

    A forward pre-hook passes each UNet call's timestep to the controller (for time-dependent
    tokens), so ``StableDiffusionPipeline``/``StableDiffusionXLPipeline`` run with the tokens as is.
    ``unet`` may be an MM-DiT transformer with MM-DiT tokens (``StableDiffusion3Pipeline``,
    ``FluxPipeline``): those read each call's timestep themselves, so this is plain ``attach``.
    """
    from editkit.attention import attach

    if not hasattr(controller, "set_timestep"):  # MM-DiT tokens: their own hook reads the timestep
        with attach(unet, controller):
            yield controller
        return

    def hook(module, args, kwargs):
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        if timestep is not None:  # tensor arithmetic only: under torch.compile this hook is traced
            controller.set_timestep(timestep)
        return None

    handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with attach(unet, controller):
            yield controller
    finally:
        handle.remove()
