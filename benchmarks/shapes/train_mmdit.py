"""Train the shapes-world MM-DiT (SD3 architecture, flow matching) and save a ``StableDiffusion3Pipeline``.

Reused: the shipped ``assets/models/shapes-sd/vae`` (frozen; its copy sets ``shift_factor`` 0, which
the SD3 pipeline adds after unscaling) and tokenizer (as ``tokenizer`` and ``tokenizer_2``, 16
tokens). Trained: two ``CLIPTextModelWithProjection`` (text towers start from the shapes-sd one,
projections fresh) jointly with a fresh ``SD3Transformer2DModel``. T5 is ``None``: the pipeline
feeds ``max_sequence_length`` zero tokens for it, ``t5_tokens`` (0) in training.

Objective (SD3, Esser et al. 2024, "rf/lognorm(0.00, 1.00)"): ``x_s = (1 - s) x0 + s noise``,
target ``noise - x0``, unweighted MSE, ``s = sigmoid(u)``, ``u ~ N(logit_mean, logit_std)``,
timestep ``1000 s``; 10% of captions dropped to the empty prompt (CFG); EMA weights ship. Prompts
are embedded as ``StableDiffusion3Pipeline.encode_prompt`` does: penultimate hidden states of both
CLIPs concatenated (64 + 64 = ``joint_attention_dim``, no padding), then the zero T5 tokens;
pooled = both projections concatenated.

Options for experiments: ``--freeze-text-towers`` (both towers kept at their shapes-sd weights),
``--freeze-text-tower NAME`` (one of them), ``--text-tower-lr-scale``. Speed only (the same objective,
equal to float rounding): ``--fused-optimizer`` (torch's fused AdamW) and ``--compile`` (``torch.compile``
of the trained modules; 0.5-3 minutes of compilation on the first step). Both together: 0.28 s per step
against 0.33 eager (one CPU thread, batch 32, 2026-12-02).

Checkpoints (``--checkpoint``, every ``--checkpoint-every`` seconds and at the end): one safetensors
file written atomically (weights, EMA weights, AdamW moments, the batch generator's state; step,
configuration, optimizer groups and LR schedule as JSON metadata; no pickles).
``--continue-from CHECKPOINT`` resumes bit for bit. Usage::

    python -m benchmarks.shapes.train_mmdit --threads 1 --output assets/models/shapes-sd3 \
        --checkpoint /tmp/sd3.ckpt.safetensors --data-cache /tmp/sd3-data.safetensors --max-seconds 3300
    python -m benchmarks.shapes.train_mmdit --continue-from /tmp/sd3.ckpt.safetensors \
        --output assets/models/shapes-sd3 --max-seconds 5400   # resume, train longer
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.shapes.train import encode_dataset, to_tensor, tokenize
from benchmarks.shapes.world import sample_batch

logger = logging.getLogger(__name__)

SHAPES_SD = Path(__file__).resolve().parents[2] / "assets" / "models" / "shapes-sd"
CHECKPOINT_FORMAT = "editkit-shapes-mmdit-checkpoint-1"


@dataclass
class MMDiTConfig:
    """Everything a training run depends on (sizes, steps, optimisation)."""

    seed: int = 0
    num_images: int = 30_000
    pattern_prob: float = 0.3
    background_prob: float = 0.3
    # transformer (SD3Transformer2DModel)
    patch_size: int = 2
    num_layers: int = 4
    num_heads: int = 3
    head_dim: int = 32
    qk_norm: str | None = "rms_norm"
    t5_tokens: int = 0
    tokenizer_max_length: int = 16  # the longest world caption is 16 tokens with bos / eos
    # optimisation
    steps: int = 20_000  # an upper bound: runs stop on --max-seconds (constant LR after warm-up)
    decay_steps: int = 0  # linear decay to 0 over the last decay_steps of `steps` (warm-up-stable-decay)
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 1e-2
    caption_dropout: float = 0.1
    train_text_towers: bool = True  # False: the shapes-sd text towers stay frozen (projections still train)
    frozen_text_towers: tuple[str, ...] = ()  # these towers ("text_encoder", "text_encoder_2") stay frozen
    text_tower_lr_scale: float = 1.0  # the text towers' (not projections') learning rate is lr * this
    ema_decay: float = 0.999
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0
    log_every: int = 100
    # speed only (the same objective; results equal to float rounding)
    fused_optimizer: bool = False  # torch's fused AdamW kernel (one pass over all parameters)
    compile: bool = False  # torch.compile the trained modules (the first step pays the compilation)


CONFIGS: dict[str, MMDiTConfig] = {
    "default": MMDiTConfig(),
    "tiny": MMDiTConfig(num_images=16, num_layers=1, num_heads=2, head_dim=8, steps=4, batch_size=4, warmup_steps=1),
}


# ----------------------------------------------------------------------------------------------
# Components


def build_text_encoder(source: Path, seed: int):
    """A ``CLIPTextModelWithProjection`` whose text tower is the shapes-sd one (projection fresh, seeded)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tower = CLIPTextModel.from_pretrained(source / "text_encoder")
    config = CLIPTextConfig.from_pretrained(source / "text_encoder")
    config.architectures = ["CLIPTextModelWithProjection"]
    torch.manual_seed(seed)
    encoder = CLIPTextModelWithProjection(config)
    encoder.text_model.load_state_dict(tower.state_dict())  # transformers 5: CLIPTextModel is the tower
    return encoder


def build_transformer(config: MMDiTConfig, joint_attention_dim: int, pooled_dim: int, sample_size: int):
    """A fresh ``SD3Transformer2DModel`` on ``sample_size`` latents (seeded by the caller)."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=config.patch_size,
        in_channels=4,
        out_channels=4,
        num_layers=config.num_layers,
        attention_head_dim=config.head_dim,
        num_attention_heads=config.num_heads,
        joint_attention_dim=joint_attention_dim,
        caption_projection_dim=config.num_heads * config.head_dim,
        pooled_projection_dim=pooled_dim,
        pos_embed_max_size=sample_size // config.patch_size,
        qk_norm=config.qk_norm,
    )


def build_scheduler(config: MMDiTConfig):
    """``FlowMatchEulerDiscreteScheduler`` with the training ``shift`` (1.0: 32 px images need none)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=config.shift)


def load_vae(source: Path):
    """The frozen shapes-sd VAE, ``shift_factor`` set to 0 for the SD3 pipeline."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(source / "vae").eval().requires_grad_(False)
    vae.register_to_config(shift_factor=0.0)
    return vae


def build_models(config: MMDiTConfig, source: Path) -> dict[str, torch.nn.Module]:
    """The trained modules: ``text_encoder``, ``text_encoder_2`` and ``transformer``."""
    text_encoder = build_text_encoder(source, config.seed)
    text_encoder_2 = build_text_encoder(source, config.seed + 1)
    joint = text_encoder.config.hidden_size + text_encoder_2.config.hidden_size
    pooled = text_encoder.config.projection_dim + text_encoder_2.config.projection_dim
    torch.manual_seed(config.seed + 2)
    transformer = build_transformer(config, joint, pooled, sample_size=16)
    return {"text_encoder": text_encoder, "text_encoder_2": text_encoder_2, "transformer": transformer}


# ----------------------------------------------------------------------------------------------
# The objective


def encode_prompts(models: dict, ids: torch.Tensor, t5_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prompt_embeds, pooled)`` exactly as ``StableDiffusion3Pipeline.encode_prompt`` with T5 absent."""
    outputs = [models[name](ids, output_hidden_states=True) for name in ("text_encoder", "text_encoder_2")]
    clip = torch.cat([out.hidden_states[-2] for out in outputs], dim=-1)  # (batch, tokens, joint_dim)
    zeros = clip.new_zeros(clip.shape[0], t5_tokens, clip.shape[-1])
    pooled = torch.cat([out.text_embeds for out in outputs], dim=-1)
    return torch.cat([clip, zeros], dim=1), pooled


def sample_sigmas(config: MMDiTConfig, batch: int, generator: torch.Generator) -> torch.Tensor:
    """Logit-normal ``s = sigmoid(u)``, ``u ~ N(logit_mean, logit_std)`` (SD3 eq. 19), then the scheduler's shift."""
    sigmas = torch.sigmoid(config.logit_mean + config.logit_std * torch.randn(batch, generator=generator))
    return config.shift * sigmas / (1 + (config.shift - 1) * sigmas)


def flow_loss(models: dict, batch: dict, config: MMDiTConfig, generator: torch.Generator) -> torch.Tensor:
    """Rectified-flow loss ``|v(x_s, s) - (noise - x0)|^2`` on one batch (``x0``, ``ids``)."""
    x0, ids = batch["x0"], batch["ids"]
    noise = torch.randn(x0.shape, generator=generator)
    sigmas = sample_sigmas(config, x0.shape[0], generator)
    s = sigmas.view(-1, 1, 1, 1)
    noisy = (1 - s) * x0 + s * noise
    prompt_embeds, pooled = encode_prompts(models, ids, config.t5_tokens)
    velocity = models["transformer"](
        hidden_states=noisy,
        encoder_hidden_states=prompt_embeds,
        pooled_projections=pooled,
        timestep=sigmas * 1000,
        return_dict=False,
    )[0]
    return F.mse_loss(velocity, noise - x0)


# ----------------------------------------------------------------------------------------------
# Data


def load_tokenizer(source: Path, config: MMDiTConfig):
    """The shapes-sd tokenizer with ``model_max_length = config.tokenizer_max_length``."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(source / "tokenizer", model_max_length=config.tokenizer_max_length)


def _data_key(config: MMDiTConfig, source: Path) -> str:
    names = ("seed", "num_images", "pattern_prob", "background_prob", "tokenizer_max_length")
    return json.dumps({"source": str(source.resolve()), **{n: getattr(config, n) for n in names}}, sort_keys=True)


def load_data(config: MMDiTConfig, source: Path, cache: Path | None = None) -> dict:
    """Latent posteriors (scaled) and caption token ids of the rendered training scenes.

    With ``cache`` (a safetensors file), data made from the same scenes, VAE and tokenizer length is
    read from it, or written to it after rendering and encoding.
    """
    from safetensors import safe_open

    from editkit.atomic import save_safetensors

    key = _data_key(config, source)
    if cache is not None and cache.is_file():
        with safe_open(str(cache), framework="pt") as file:
            if (file.metadata() or {}).get("key") == key:
                logger.info("training data from %s", cache)
                return {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118 (safe_open is not iterable)
    data = _render_data(config, source)
    if cache is not None:
        save_safetensors(cache, data, metadata={"key": key}, overwrite=True)
    return data


def _render_data(config: MMDiTConfig, source: Path) -> dict:
    start = time.time()
    images, captions, _ = sample_batch(
        config.seed,
        config.num_images,
        training=True,
        pattern_prob=config.pattern_prob,
        background_prob=config.background_prob,
    )
    vae = load_vae(source)
    means, stds = encode_dataset(vae, to_tensor(images), "cpu")
    scaling = float(vae.config.scaling_factor)
    tokenizer = load_tokenizer(source, config)
    logger.info("rendered and encoded %d scenes in %.1f s", len(captions), time.time() - start)
    return {
        "means": (means * scaling).contiguous(),
        "stds": (stds * scaling).contiguous(),
        "ids": tokenize(tokenizer, captions),
        "empty": tokenize(tokenizer, [""])[0],
    }


def next_batch(data: dict, config: MMDiTConfig, generator: torch.Generator) -> dict:
    """A random batch: posterior samples and token ids, captions dropped with ``caption_dropout``."""
    idx = torch.randint(0, data["means"].shape[0], (config.batch_size,), generator=generator)
    eps = torch.randn(data["means"][idx].shape, generator=generator)
    ids = data["ids"][idx].clone()
    ids[torch.rand(config.batch_size, generator=generator) < config.caption_dropout] = data["empty"]
    return {"x0": data["means"][idx] + data["stds"][idx] * eps, "ids": ids}


# ----------------------------------------------------------------------------------------------
# Training state and checkpoints


@dataclass
class TrainState:
    """What a step changes: weights, EMA weights, AdamW, the schedule, the batch generator, the step."""

    config: MMDiTConfig
    models: dict[str, torch.nn.Module]
    ema: dict[str, torch.nn.Module]
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LambdaLR
    generator: torch.Generator
    step: int = 0
    seconds: float = 0.0


def warmup_stable_decay(warmup: int, steps: int, decay_steps: int):
    """Linear warm-up to the peak learning rate, constant, then (when ``decay_steps``) a linear decay to 0
    over the last ``decay_steps`` of ``steps`` (the "WSD" schedule: a run on a time budget can be
    extended from any checkpoint of its constant phase and cooled down at the end)."""

    def schedule(step: int) -> float:
        factor = min(1.0, (step + 1) / max(1, warmup))
        if decay_steps > 0:
            factor = min(factor, max(0.0, (steps - step) / decay_steps))
        return factor

    return schedule


def parameter_groups(models: dict[str, torch.nn.Module], config: MMDiTConfig) -> list[dict]:
    """AdamW groups: the pretrained text towers at ``lr * text_tower_lr_scale``, everything else
    (transformer, the fresh text projections) at ``lr``; frozen parameters left out. One group when
    the scale is 1, so that checkpoints of earlier runs keep their layout."""
    towers = {id(p) for name in TEXT_TOWERS for p in models[name].text_model.parameters()}
    trained = [p for model in models.values() for p in model.parameters() if p.requires_grad]
    if config.text_tower_lr_scale == 1.0:
        return [{"params": trained, "lr": config.lr}]
    groups = [
        {"params": [p for p in trained if id(p) not in towers], "lr": config.lr},
        {"params": [p for p in trained if id(p) in towers], "lr": config.lr * config.text_tower_lr_scale},
    ]
    return [group for group in groups if group["params"]]


TEXT_TOWERS = ("text_encoder", "text_encoder_2")


def frozen_towers(config: MMDiTConfig) -> tuple[str, ...]:
    """The text towers kept at their shapes-sd weights (both when ``train_text_towers`` is False)."""
    unknown = set(config.frozen_text_towers) - set(TEXT_TOWERS)
    if unknown:
        raise ValueError(f"frozen_text_towers: unknown tower(s) {sorted(unknown)}; choose from {TEXT_TOWERS}")
    return TEXT_TOWERS if not config.train_text_towers else tuple(config.frozen_text_towers)


def new_state(config: MMDiTConfig, source: Path) -> TrainState:
    """Fresh models (EMA copies of them), AdamW with warm-up-stable-decay, the seeded batch generator."""
    models = build_models(config, source)
    for name in frozen_towers(config):
        models[name].text_model.requires_grad_(False)
    ema = {name: copy.deepcopy(model).requires_grad_(False).eval() for name, model in models.items()}
    if config.compile:  # in place: state-dict keys unchanged, the EMA copies stay eager
        for model in models.values():
            model.compile()
    optimizer = torch.optim.AdamW(
        parameter_groups(models, config),
        lr=config.lr,
        weight_decay=config.weight_decay,
        fused=config.fused_optimizer or None,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_stable_decay(config.warmup_steps, config.steps, config.decay_steps)
    )
    generator = torch.Generator().manual_seed(config.seed)
    return TrainState(config, models, ema, optimizer, schedule, generator)


def save_checkpoint(state: TrainState, path: str | Path) -> Path:
    """Everything needed to resume, as one safetensors file (tensors + JSON metadata), written atomically."""
    from editkit.atomic import save_safetensors

    tensors: dict[str, torch.Tensor] = {}
    for prefix, group in (("model", state.models), ("ema", state.ema)):
        for name, module in group.items():
            for key, value in module.state_dict().items():
                tensors[f"{prefix}.{name}.{key}"] = value.detach().cpu().contiguous()
    optimizer = state.optimizer.state_dict()
    for index, entry in optimizer["state"].items():
        for key, value in entry.items():
            tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
    tensors["generator"] = state.generator.get_state()
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "step": str(state.step),
        "seconds": repr(state.seconds),
        "config": json.dumps(dataclasses.asdict(state.config)),
        "optimizer_param_groups": json.dumps(optimizer["param_groups"]),
        "lr_scheduler": json.dumps(state.lr_scheduler.state_dict()),
    }
    return save_safetensors(path, tensors, metadata=metadata, overwrite=True)


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a checkpoint; ``ValueError`` when the file is not one."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata() or {}
        if metadata.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path}: not a shapes MM-DiT checkpoint (format {metadata.get('format')!r})")
        return {key: file.get_tensor(key) for key in file.keys()}, metadata  # noqa: SIM118


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}


def load_state(
    path: str | Path,
    source: Path,
    steps: int | None = None,
    batch_size: int | None = None,
    decay_steps: int | None = None,
) -> TrainState:
    """The training state of a checkpoint; ``steps`` / ``batch_size`` / ``decay_steps`` (when given) replace
    the saved ones (a checkpoint written before ``decay_steps`` existed has none)."""
    tensors, metadata = read_checkpoint(path)
    config = MMDiTConfig(**json.loads(metadata["config"]))
    overrides = {"steps": steps, "batch_size": batch_size, "decay_steps": decay_steps}
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
    state = new_state(config, source)
    base_lrs = list(state.lr_scheduler.base_lrs)  # per group (the text towers may have their own)
    for prefix, group in (("model", state.models), ("ema", state.ema)):
        for name, module in group.items():
            module.load_state_dict(_prefixed(tensors, f"{prefix}.{name}."), strict=True)
    groups = json.loads(metadata["optimizer_param_groups"])
    entries: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in _prefixed(tensors, "optimizer.").items():
        index, name = key.split(".", 1)
        entries.setdefault(int(index), {})[name] = value
    for group in groups:  # the live schedule's learning rate, not the saved one's, when steps changed
        group.pop("initial_lr", None)
    state.optimizer.load_state_dict({"state": entries, "param_groups": groups})
    state.lr_scheduler.load_state_dict(json.loads(metadata["lr_scheduler"]))
    state.lr_scheduler.base_lrs = base_lrs
    for group, base, factor in zip(state.optimizer.param_groups, base_lrs, state.lr_scheduler.lr_lambdas):
        group["initial_lr"], group["lr"] = base, base * factor(state.lr_scheduler.last_epoch)
    state.generator.set_state(tensors["generator"])
    state.step, state.seconds = int(metadata["step"]), float(metadata["seconds"])
    return state


# ----------------------------------------------------------------------------------------------
# The loop and the pipeline


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * model`` on parameters (one foreach call)."""
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1 - decay)


def train_step(state: TrainState, data: dict) -> float:
    """One AdamW step (grad-norm clip 1) on a fresh batch, then the EMA update (warm-up ``(1+k)/(10+k)``)."""
    config = state.config
    loss = flow_loss(state.models, next_batch(data, config, state.generator), config, state.generator)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for group in state.optimizer.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    state.optimizer.step()
    state.lr_scheduler.step()
    decay = min(config.ema_decay, (1 + state.step) / (10 + state.step))
    for name, model in state.models.items():
        ema_update(state.ema[name], model, decay)
    state.step += 1
    return loss.item()


def run(
    state: TrainState, data: dict, checkpoint: Path | None, checkpoint_every: float, max_seconds: float = math.inf
) -> TrainState:
    """Train until ``config.steps`` or ``max_seconds`` of training in all (resumed runs included),
    checkpointing every ``checkpoint_every`` seconds and at the end."""
    for model in state.models.values():
        model.train()
    start, last_save = time.time(), time.time()
    seconds_before = state.seconds
    while state.step < state.config.steps and state.seconds < max_seconds:
        loss = train_step(state, data)
        state.seconds = seconds_before + time.time() - start
        if state.step % state.config.log_every == 0:
            logger.info("step %d loss %.5f (%.0f s)", state.step, loss, state.seconds)
        if checkpoint is not None and time.time() - last_save >= checkpoint_every:
            save_checkpoint(state, checkpoint)
            last_save = time.time()
    if checkpoint is not None:
        save_checkpoint(state, checkpoint)
    return state


def export_pipeline(state: TrainState, source: Path, output: str | Path) -> dict:
    """Save the EMA weights as a ``StableDiffusion3Pipeline`` folder (written beside, then renamed)."""
    import shutil

    from diffusers import StableDiffusion3Pipeline

    tokenizer = load_tokenizer(source, state.config)
    pipe = StableDiffusion3Pipeline(
        transformer=state.ema["transformer"],
        scheduler=build_scheduler(state.config),
        vae=load_vae(source),
        text_encoder=state.ema["text_encoder"],
        tokenizer=tokenizer,
        text_encoder_2=state.ema["text_encoder_2"],
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    output = Path(output)
    tmp, old = output.with_name(f".{output.name}.tmp"), output.with_name(f".{output.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    summary = {
        "config": dataclasses.asdict(state.config),
        "steps_done": state.step,
        "train_seconds": round(state.seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
    }
    (tmp / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for name in ("README.md",):  # keep a model card written by hand
        if (output / name).is_file():
            shutil.copy2(output / name, tmp / name)
    if output.exists():
        output.rename(old)
    tmp.rename(output)
    shutil.rmtree(old, ignore_errors=True)
    return summary


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="default")
    parser.add_argument("--output", default="assets/models/shapes-sd3", help="the pipeline folder (EMA weights)")
    parser.add_argument("--source", default=str(SHAPES_SD), help="shapes-sd folder (VAE, tokenizer, text towers)")
    parser.add_argument("--checkpoint", default=None, help="safetensors checkpoint to write (default: none)")
    parser.add_argument("--checkpoint-every", type=float, default=300.0, help="seconds between checkpoints")
    parser.add_argument(
        "--continue-from",
        default=None,
        help="resume from this checkpoint (its configuration; --steps, --batch-size, --decay-steps apply)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--max-seconds", type=float, default=math.inf, help="training time budget (all runs)")
    parser.add_argument("--data-cache", default=None, help="safetensors file caching the encoded training data")
    for name, kind in (("steps", int), ("batch-size", int), ("lr", float), ("num-images", int), ("num-layers", int)):
        parser.add_argument(f"--{name}", type=kind, default=None)
    parser.add_argument(
        "--decay-steps", type=int, default=None, help="decay the learning rate linearly to 0 over the last N steps"
    )
    parser.add_argument("--log-every", type=int, default=None)
    parser.add_argument(
        "--freeze-text-towers", action="store_true", help="keep the shapes-sd text towers frozen (new runs only)"
    )
    parser.add_argument(
        "--freeze-text-tower",
        action="append",
        choices=TEXT_TOWERS,
        default=None,
        help="keep this text tower frozen (repeatable; new runs only)",
    )
    parser.add_argument("--fused-optimizer", action="store_true", help="fused AdamW kernel (new runs only)")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the trained modules (this run and its resumes)"
    )
    parser.add_argument(
        "--text-tower-lr-scale",
        type=float,
        default=None,
        help="the text towers' learning rate as a fraction of --lr (new runs only; default 1)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = _parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    source = Path(args.source)
    if args.continue_from:
        state = load_state(
            args.continue_from, source, steps=args.steps, batch_size=args.batch_size, decay_steps=args.decay_steps
        )
        logger.info("resumed %s at step %d of %d", args.continue_from, state.step, state.config.steps)
    else:
        names = ("steps", "decay_steps", "batch_size", "lr", "num_images", "num_layers", "log_every")
        names += ("text_tower_lr_scale",)
        overrides = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
        if args.freeze_text_towers:
            overrides["train_text_towers"] = False
        if args.freeze_text_tower:
            overrides["frozen_text_towers"] = tuple(args.freeze_text_tower)
        overrides.update({name: True for name in ("fused_optimizer", "compile") if getattr(args, name)})
        state = new_state(dataclasses.replace(CONFIGS[args.config], **overrides), source)
    data = load_data(state.config, source, Path(args.data_cache) if args.data_cache else None)
    checkpoint = Path(args.checkpoint or args.continue_from) if (args.checkpoint or args.continue_from) else None
    run(state, data, checkpoint, args.checkpoint_every, args.max_seconds)
    print(json.dumps({k: v for k, v in export_pipeline(state, source, args.output).items() if k != "config"}))


if __name__ == "__main__":
    main()
