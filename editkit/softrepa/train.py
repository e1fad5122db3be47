"""SoftREPA training: soft tokens on a frozen model, contrastive denoising loss, accelerate underneath.

The same function runs on one CPU, one GPU or several processes (``accelerate launch``): token
gradients are averaged across processes, each process takes its own slice of every global
batch, and all randomness of a step (data order, timestep, noise, negatives) is derived from
``(seed, step, process)``, so a run resumed from a checkpoint continues exactly as an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from editkit.attention import attach
from editkit.backbones.families import FAMILIES, UNET_FAMILIES, family_of_model
from editkit.errors import InputError, ModelLoadError
from editkit.softrepa import checkpoint as ckpt
from editkit.softrepa.config import TrainConfig, check_config
from editkit.softrepa.data import CaptionDataset, read_records, split_records
from editkit.softrepa.hard_negatives import hard_negatives
from editkit.softrepa.loss import contrastive_loss, pair_errors, row_chunks
from editkit.softrepa.runfiles import evaluation_line, training_lock, write_log
from editkit.softrepa.tokens import (
    SoftTokenController,
    SoftTokens,
    default_sites,
    initial_tokens,
    read_soft_tokens,
    save_soft_tokens,
)
from editkit.softrepa.validation import held_out_metrics

__all__ = ["TrainConfig", "TrainResult", "learning_rate_schedule", "train_soft_tokens"]

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a run produced: the token file's (best held-out) tokens on the CPU, steps, losses, metric, files, log."""

    tokens: SoftTokens
    steps: int
    losses: list[float]
    best_metric: list[float] | None
    output: Path
    checkpoint: Path | None
    unreadable_images: int
    log: list[dict] = field(default_factory=list)


def text_to_image_class(model: str | Path):
    """diffusers' pipeline class for ``model``: the folder's own class, SD for a single ``.safetensors`` file."""
    import diffusers

    if str(model).lower().endswith(".safetensors"):
        return diffusers.StableDiffusionPipeline
    return diffusers.DiffusionPipeline


def _load_pipe(config: TrainConfig, accelerator):
    from editkit.models import load_pipeline, model_family

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
    pipe = load_pipeline(text_to_image_class(config.model), config.model, device=accelerator.device, dtype=dtype)
    family = model_family(pipe)
    if family not in (*UNET_FAMILIES, "sd3", "flux"):
        raise ModelLoadError(f"{config.model} is a {FAMILIES[family].label} model; SoftREPA does not train on it")
    return pipe


def _freeze(pipe, config: TrainConfig) -> None:
    for name in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.requires_grad_(False).eval()
    if config.gradient_checkpointing:
        _denoiser(pipe).enable_gradient_checkpointing()
    pipe.set_progress_bar_config(disable=True)


def _denoiser(pipe):
    return pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer


def _sites(pipe, patterns: list[str] | None) -> list[str]:
    from editkit.attention import attention_sites, select_sites

    if patterns is None:
        return default_sites(pipe.unet)
    try:
        return select_sites([s.name for s in attention_sites(pipe.unet)], patterns, kind="cross")
    except ValueError as error:
        raise InputError(str(error)) from None


def learning_rate_schedule(optimizer, config: TrainConfig):
    """Cosine annealing with warm restarts, stepped once per ``config.lr_step_every`` iterations (the reference)."""
    return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        optimizer, T_0=config.restart_every // config.lr_step_every, eta_min=config.min_learning_rate
    )


def _step_generator(seed: int, step: int, process: int) -> torch.Generator:
    """The generator of one step of one process: every random choice of the step comes from it."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 257 + process)


class _Trainer:
    """One training run's state and steps (kept small: each method is one part of the loop)."""

    def __init__(self, config: TrainConfig, accelerator, pipe, train_set: CaptionDataset, val_set: CaptionDataset):
        self.config, self.accelerator, self.pipe = config, accelerator, pipe
        self.train_set, self.val_set = train_set, val_set
        self.device = accelerator.device
        self.resolution = train_set.resolution
        self.scheduler_config = pipe.scheduler.config
        self.model = _denoiser(pipe)
        self.soft, self.controller = self.make_tokens(torch.Generator().manual_seed(config.seed))
        optimizer = torch.optim.AdamW(self.soft.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
        self.scheduler = learning_rate_schedule(optimizer, config)
        self.optimizer = accelerator.prepare(optimizer)
        self.caption_cache: dict[str, object] = {}
        self.step, self.best, self.stale, self.losses, self.accuracies, self.log = 0, None, 0, [], [], []
        self.best_tensors: dict[str, torch.Tensor] | None = None
        self.evaluated = -1  # the step of the last evaluation (on every process)
        self.report = lambda entry: None
        self.metrics: dict[str, list[float] | None] = {}
        self.warned_fallback = False

    def make_tokens(self, generator: torch.Generator):
        """The learnable tokens (on the device) and the controller that inserts them."""
        config, pipe = self.config, self.pipe
        self.alphas = pipe.scheduler.alphas_cumprod.to(self.device, torch.float32)
        tokens = initial_tokens(pipe, config.num_tokens, generator=generator, init=config.token_init)
        soft = SoftTokens(
            tokens, _sites(pipe, config.sites), time_buckets=config.time_buckets, time_layout=config.time_layout,
            num_train_timesteps=len(self.alphas), base_model=str(config.model), family=family_of_model(pipe),
            generator=generator,
        ).to(self.device)  # fmt: skip
        return soft, SoftTokenController(soft)

    # -- data -------------------------------------------------------------------------------
    def encode(self, captions: list[str]):
        from editkit.conditioning import TextConditioning, encode_text

        missing = [c for c in dict.fromkeys(captions) if c not in self.caption_cache]
        if missing:
            encoded = encode_text(self.pipe, missing, height=self.resolution, width=self.resolution)
            for index, caption in enumerate(missing):
                added = encoded.added_cond_kwargs
                row = None if added is None else {k: v[index : index + 1] for k, v in added.items()}
                self.caption_cache[caption] = TextConditioning(encoded.prompt_embeds[index : index + 1], row)
        return TextConditioning.cat([self.caption_cache[c] for c in captions])

    @torch.no_grad()
    def latents(self, images: torch.Tensor) -> torch.Tensor:
        from editkit.inversion import encode_image_latents

        vae = self.pipe.vae
        return encode_image_latents(vae, images.to(self.device, vae.dtype)).float()

    def batch(self, step: int):
        """This process's images and captions of global batch ``step`` (an epoch-wise permutation)."""
        config, process = self.config, self.accelerator.process_index
        size = len(self.train_set)
        position = (step * self.accelerator.num_processes + process) * config.batch_size
        epoch, start = divmod(position, size)
        order = torch.randperm(size, generator=torch.Generator().manual_seed(config.seed + 7919 * epoch)).tolist()
        return self.train_set.batch(start, config.batch_size, order)

    def negatives(self, captions: list[str], generator: torch.Generator) -> list[str]:
        """``negative_bank`` training captions other than the batch's, drawn with the step's generator."""
        pool = sorted({r.text for r in self.train_set.records} - set(captions))
        if not pool or not self.config.negative_bank:
            return []
        picks = torch.randint(len(pool), (self.config.negative_bank,), generator=generator).tolist()
        return [pool[i] for i in picks]

    def hard_columns(self, captions: list[str]) -> list[str]:
        """Up to ``hard_negatives`` hard negatives per batch caption (none that is a batch caption itself)."""
        if not self.config.hard_negatives:
            return []
        found = [n for c in captions for n in hard_negatives(c, self.config.hard_negatives)]
        return [n for n in dict.fromkeys(found) if n not in set(captions)]

    def columns(self, captions: list[str], generator: torch.Generator):
        """Caption conditioning of the error matrix's columns: the batch, then negatives (no row matches them)."""
        from editkit.conditioning import TextConditioning

        parts = [self.encode(captions)]
        if self.config.gather_negatives and self.accelerator.num_processes > 1:
            parts.append(self._gathered(parts[0]))
        negatives = self.negatives(captions, generator) + self.hard_columns(captions)
        if negatives:
            parts.append(self.encode(negatives))
        return TextConditioning.cat(parts)

    def _gathered(self, own):
        """The other processes' captions of this step (negatives across processes)."""
        from editkit.conditioning import TextConditioning

        batch, process = own.prompt_embeds.shape[0], self.accelerator.process_index
        keep = torch.ones(batch * self.accelerator.num_processes, dtype=torch.bool)
        keep[process * batch : (process + 1) * batch] = False
        embeds = self.accelerator.gather(own.prompt_embeds.contiguous())[keep.to(self.device)]
        added = None
        if own.added_cond_kwargs is not None:
            added = {
                k: self.accelerator.gather(v.contiguous())[keep.to(self.device)]
                for k, v in own.added_cond_kwargs.items()
            }
        return TextConditioning(embeds, added)

    # -- one step ---------------------------------------------------------------------------
    def predictor(self, timestep: int):
        unet = self.pipe.unet

        def predict(sample: torch.Tensor, context: torch.Tensor, added: dict | None) -> torch.Tensor:
            sample, context = sample.to(unet.dtype), context.to(unet.dtype)
            kwargs = {"added_cond_kwargs": added} if added is not None else {}
            with self.accelerator.autocast():
                return unet(sample, timestep, encoder_hidden_states=context, **kwargs).sample

        return predict

    def noised(self, latents: torch.Tensor, generator: torch.Generator, timestep: int | None = None):
        """Shared timestep and ONE shared noise sample for every pair; returns ``(t, noisy, target)``."""
        from editkit.softrepa.loss import diffusion_target, noisy_latents

        if timestep is None:
            timestep = int(torch.randint(len(self.alphas), (1,), generator=generator))
        noise = torch.randn((1, *latents.shape[1:]), generator=generator).to(self.device)
        alpha = self.alphas[timestep]
        prediction_type = self.scheduler_config.get("prediction_type", "epsilon")
        return timestep, noisy_latents(latents, noise, alpha), diffusion_target(latents, noise, alpha, prediction_type)

    def loss_and_backward(self, predict, noisy, target, columns) -> tuple[float, float]:
        """Backpropagate the contrastive loss chunk by chunk; returns ``(loss, contrastive accuracy)``.

        The accuracy is the fraction of the batch's images whose own caption has the lowest error.
        """
        config, batch = self.config, noisy.shape[0]
        chunks = row_chunks(batch, config.row_chunk)
        added = columns.added_cond_kwargs
        embeds = columns.prompt_embeds

        def hits(errors: torch.Tensor, rows: slice) -> int:
            labels = torch.arange(rows.start, rows.stop, device=errors.device)
            return int((errors.detach().argmin(dim=1) == labels).sum())

        if config.loss.direction == "rows" or len(chunks) == 1:
            total, correct = 0.0, 0
            for rows in chunks:
                errors = pair_errors(predict, noisy, target, embeds, rows, added)
                loss = contrastive_loss(errors, config.loss, rows, batch)
                self.accelerator.backward(loss)
                total += float(loss.detach())
                correct += hits(errors, rows)
            return total, correct / batch
        # Columns need the whole matrix: errors without graph, then d loss / d err chunk by chunk.
        with torch.no_grad():
            errors = torch.cat([pair_errors(predict, noisy, target, embeds, rows, added) for rows in chunks])
        errors.requires_grad_(True)
        loss = contrastive_loss(errors, config.loss)
        (grad,) = torch.autograd.grad(loss, errors)
        for rows in chunks:
            self.accelerator.backward((pair_errors(predict, noisy, target, embeds, rows, added) * grad[rows]).sum())
        return float(loss.detach()), hits(errors, slice(0, batch)) / batch

    def forward_backward(self, step: int) -> tuple[float, float]:
        """Gradients of step ``step`` into the tokens (no state changes yet); returns ``(loss, accuracy)``."""
        generator = _step_generator(self.config.seed, step, self.accelerator.process_index)
        images, captions = self.batch(step)
        latents = self.latents(images)
        columns = self.columns(captions, generator)
        timestep, noisy, target = self.noised(latents, generator)
        self.controller.begin_step(step, timestep)
        self.optimizer.zero_grad(set_to_none=True)
        loss, accuracy = self.loss_and_backward(self.predictor(timestep), noisy, target, columns)
        if self.accelerator.num_processes > 1:
            for parameter in self.soft.parameters():
                if parameter.grad is not None:
                    parameter.grad = self.accelerator.reduce(parameter.grad, "mean")
            pair = self.accelerator.reduce(torch.tensor([loss, accuracy], device=self.device), "mean")
            loss, accuracy = float(pair[0]), float(pair[1])
        return loss, accuracy

    def apply_step(self, loss: float, accuracy: float) -> None:
        """The optimiser (and every ``lr_step_every`` iterations the scheduler) step; refuses non-finite tokens."""
        self.optimizer.step()
        self.soft.check_finite(f"at step {self.step + 1}")
        self.step += 1
        if self.step % self.config.lr_step_every == 0:
            self.scheduler.step()
        self.losses.append(loss)
        self.accuracies.append(accuracy)

    # -- validation -------------------------------------------------------------------------
    def validate(self) -> list[float] | None:
        """The keep-best metric (``config.keep_best``) after computing both held-out metrics into ``self.metrics``.

        ``"hard-negatives"`` without any validation image that has hard negatives falls back to
        ``"group"`` (a warning, once).
        """
        self.metrics = held_out_metrics(self)
        chosen = self.metrics[self.config.keep_best]
        if chosen is None and not self.warned_fallback:
            logger.warning("no validation caption has hard negatives: keeping the best tokens by the group metric")
            self.warned_fallback = True
        return chosen if chosen is not None else self.metrics["group"]

    # -- files ------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        """Checkpoint the state after step ``self.step``'s evaluation (so a resume repeats nothing)."""
        if not self.accelerator.is_main_process:
            return None
        folder = self.config.checkpoint_dir
        path = folder / f"step-{self.step:07d}.safetensors"
        extra = {
            "best": self.best, "stale": self.stale, "losses": self.losses, "accuracies": self.accuracies,
            "log": self.log,
        }  # fmt: skip
        fingerprint = self.config.fingerprint(self.accelerator.num_processes)
        ckpt.save_checkpoint(
            path, self.soft, self.optimizer, self.scheduler, step=self.step, fingerprint=fingerprint, extra=extra,
            best=self.best_tensors,
        )  # fmt: skip
        for old in sorted(folder.glob("step-*.safetensors"))[: -max(1, self.config.keep_checkpoints)]:
            old.unlink(missing_ok=True)  # only after the new one is complete: a failed write keeps the last good
        return path

    def resume(self, source: str | Path) -> None:
        source = Path(source)
        path = ckpt.latest_checkpoint(source) if source.is_dir() else source
        fingerprint = self.config.fingerprint(self.accelerator.num_processes)
        self.step, extra, self.best_tensors = ckpt.load_checkpoint(
            path, self.soft, self.optimizer, self.scheduler, fingerprint=fingerprint
        )
        self.best, self.stale, self.losses, self.log = extra["best"], extra["stale"], extra["losses"], extra["log"]
        self.accuracies = extra["accuracies"]
        self.evaluated = self.log[-1]["step"] if self.log else -1
        logger.info("resumed from %s at step %d", path, self.step)

    def write_tokens(self) -> None:
        """Write the best tokens so far (the current ones when nothing was validated) and the log."""
        if not self.accelerator.is_main_process:
            return
        tokens = self.soft if self.best_tensors is None else self.soft.with_tensors(self.best_tensors)
        save_soft_tokens(tokens, self.config.output, overwrite=True)
        write_log(self.config.log_path, self.log)

    def evaluate(self) -> bool:
        """Log the step (validating on the main process, keeping the best tokens); returns whether to stop early."""
        config, stop = self.config, False
        self.evaluated = self.step
        if self.accelerator.is_main_process:
            metric = self.validate() if self.val_set.records else None
            if metric is not None and (self.best is None or metric > self.best):
                self.best, self.stale = metric, 0
                self.best_tensors = {k: v.clone() for k, v in self.soft.tensors().items()}  # a copy, not a view
            elif metric is not None:
                self.stale += 1
            self.log.append(self.log_entry(metric))
            self.report(self.log[-1])
            logger.info("%s", evaluation_line(self.log[-1]))
            self.write_tokens()
            stop = metric is not None and bool(config.patience) and self.stale >= config.patience
        flag = torch.tensor([int(stop)], device=self.device)
        return bool(self.accelerator.reduce(flag, "sum").item()) if self.accelerator.num_processes > 1 else stop

    def log_entry(self, metric: list[float] | None) -> dict:
        since = self.log[-1]["step"] if self.log else 0
        losses, accuracies = self.losses[since:], self.accuracies[since:]
        return {
            "step": self.step,
            "loss": sum(losses) / max(1, len(losses)),
            "train_accuracy": sum(accuracies) / len(accuracies) if accuracies else None,
            "val_accuracy": None if metric is None else metric[0],
            "val_margin": None if metric is None else metric[1],
            "val_group": self.metrics.get("group"),
            "val_hard_negatives": self.metrics.get("hard-negatives"),
            "keep_best": self.config.keep_best,
            "best_accuracy": None if self.best is None else self.best[0],
            "learning_rate": self.scheduler.get_last_lr()[0],
        }

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> Path | None:
        """Train to ``max_steps``: each step, then its evaluation, then its checkpoint (in that order).

        Ctrl-C during a step's forward/backward (the long part, which changes no state) saves
        a checkpoint of the last completed step; elsewhere it leaves the last regular checkpoint,
        so a resume is always exact.
        """
        from tqdm.auto import tqdm

        config, last = self.config, None
        show = config.progress and self.accelerator.is_main_process
        bar = tqdm(total=config.max_steps, initial=self.step, disable=not show, desc="softrepa")
        try:
            with attach(self.model, self.controller):
                while self.step < config.max_steps:
                    try:
                        loss, accuracy = self.forward_backward(self.step)
                    except KeyboardInterrupt:
                        logger.warning("interrupted; resume with --resume %s", self.save_checkpoint())
                        raise
                    self.apply_step(loss, accuracy)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}")
                    stop = bool(config.validate_every) and self.step % config.validate_every == 0 and self.evaluate()
                    if config.checkpoint_every and self.step % config.checkpoint_every == 0:
                        last = self.save_checkpoint()
                    if stop:
                        logger.info("early stop at step %d: no gain in %d validations", self.step, config.patience)
                        break
        finally:
            bar.close()
        return last


def _datasets(config: TrainConfig, resolution: int) -> tuple[CaptionDataset, CaptionDataset]:
    records, _ = read_records(config.data)
    train, val = split_records(records, config.val_fraction, config.seed)
    if len(train) < config.batch_size:
        raise InputError(f"{config.data}: {len(train)} training pairs, fewer than the batch size {config.batch_size}")
    return CaptionDataset(train, resolution), CaptionDataset(val, resolution)


def train_soft_tokens(config: TrainConfig, *, pipe=None, accelerator=None, report=None) -> TrainResult:
    """Train SoftREPA tokens as ``config`` says; writes the token file (best held-out tokens), its log and checkpoints.

    ``pipe``: an already loaded SD/SDXL, SD3/SD3.5 or FLUX pipeline (its models are frozen, and gradient
    checkpointing is turned on when asked); otherwise ``config.model`` is loaded. ``report``:
    called with each evaluation's log entry (the CLI prints it as one line). The main process
    holds a lock on the checkpoint folder, so a second run on the same ``output`` is refused.
    """
    from accelerate import Accelerator

    if accelerator is None:
        if config.device is not None and config.device != "cpu":
            from editkit.models import choose_device

            choose_device(config.device)
        accelerator = Accelerator(cpu=config.device == "cpu", mixed_precision=config.mixed_precision)
    check_config(config, accelerator.num_processes)
    lock = training_lock(config.checkpoint_dir) if accelerator.is_main_process else contextlib.nullcontext()
    with lock:
        return _train(config, accelerator, pipe, report)


def _train(config: TrainConfig, accelerator, pipe, report) -> TrainResult:
    if config.resume is None and accelerator.is_main_process and any(config.checkpoint_dir.glob("step-*")):
        logger.warning("%s holds checkpoints of an earlier run; they may be replaced", config.checkpoint_dir)
    from editkit.models import model_source_family
    from editkit.softrepa.flow_train import check_family_options

    check_family_options(config, family_of_model(pipe) if pipe is not None else model_source_family(config.model))
    pipe = pipe if pipe is not None else _load_pipe(config, accelerator)
    _freeze(pipe, config)
    train_set, val_set = _datasets(config, config.resolution)
    trainer_class = _Trainer
    if family_of_model(pipe) in ("sd3", "flux"):
        from editkit.softrepa import flow_train

        trainer_class = flow_train.FlowTrainer
    trainer = trainer_class(config, accelerator, pipe, train_set, val_set)
    trainer.report = report or trainer.report
    if config.resume is not None:
        trainer.resume(config.resume)
    try:
        last = trainer.run()
    finally:
        if config.gradient_checkpointing:
            _denoiser(pipe).disable_gradient_checkpointing()
    if trainer.evaluated != trainer.step:
        trainer.evaluate()  # the final step's evaluation (also what writes the token file)
    else:
        trainer.write_tokens()  # e.g. a resume of a finished run into another -o
    last = trainer.save_checkpoint() or last
    accelerator.wait_for_everyone()
    if train_set.unreadable:
        logger.warning("skipped %d unreadable images", len(train_set.unreadable))
    return TrainResult(
        read_soft_tokens(config.output) if accelerator.is_main_process else trainer.soft.cpu(), trainer.step,
        trainer.losses, trainer.best, Path(config.output), last, len(train_set.unreadable), trainer.log,
    )  # fmt: skip
