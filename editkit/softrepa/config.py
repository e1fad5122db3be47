"""SoftREPA training settings: :class:`TrainConfig` (the reference's defaults) and their checks."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from editkit.errors import InputError
from editkit.softrepa.loss import ContrastiveLossConfig

__all__ = ["KEEP_BEST_METRICS", "TrainConfig", "check_config"]

KEEP_BEST_METRICS = ("group", "hard-negatives")


# Settings that do not change the trajectory: a resumed run may differ in these.
_RESUMABLE_CHANGES = (
    "max_steps", "output", "resume", "overwrite", "progress", "device", "checkpoint_every", "keep_checkpoints",
    "validate_every", "patience",
)  # fmt: skip
# Settings added after checkpoints were first written: in the fingerprint only when not at their
# default, so a checkpoint of an earlier version still resumes with the defaults.
_LATER_SETTINGS = {
    "hard_negatives": 0, "keep_best": "group", "token_init": "text", "layers": 5, "max_sequence_length": None,
}  # fmt: skip


@dataclass
class TrainConfig:
    """SoftREPA training settings (defaults: the paper's reference settings where it gives them).

    ``row_chunk``: image rows per denoiser call (``None``: all ``B x N`` pairs in one call);
    ``negative_bank``: extra negative captions per step drawn from the cached training captions;
    ``gather_negatives``: use the other processes' captions as negatives too; ``val_timesteps``:
    the fixed timesteps of the held-out alignment metric; ``patience``: validations without
    improvement before stopping early (0: never).

    Additions of editkit (not in the reference), off by default: ``hard_negatives``: up to N
    hard negatives per batch caption (:func:`editkit.softrepa.hard_negatives.hard_negatives`:
    colours swapped between its two objects, relation flipped) as extra negative columns of the
    error matrix; ``keep_best``: the held-out metric that picks the saved tokens, ``"group"`` (the
    own caption's error lowest among ``val_group`` validation captions) or ``"hard-negatives"`` (the
    own caption's error lowest among it and its hard negatives; images without any are skipped,
    and with none at all the group metric is used, with a warning); both are logged at every
    evaluation. ``token_init``: ``"text"`` (the reference's SD 1.5 initialisation, the empty
    prompt's start-of-text embedding) or ``"normal"`` (N(0, 0.02) on every model); see
    :func:`editkit.softrepa.tokens.initial_tokens`.

    Reference settings (SoftREPA release): ``time_buckets=100`` in the ``"shared"`` layout (one
    ``Embedding(100, width)`` row per 10 timesteps added to all m tokens, N(0, 0.02) init;
    ``"per-token"`` is editkit's earlier ``(buckets, m, width)`` zero-initialised layout);
    cosine annealing with warm restarts from ``learning_rate`` to ``min_learning_rate``, the
    scheduler stepped once per ``lr_step_every`` = 500 iterations with ``T_0 = restart_every /
    lr_step_every`` = 10, so the rate is constant over each 500 iterations and restarts every
    5,000 (``lr_step_every=1`` gives a smooth cosine); ``resolution`` 512 px for every UNet model.

    MM-DiT models (SD3 / SD3.5; FLUX.1 as editkit's extension; :mod:`editkit.softrepa.mmdit_tokens`):
    ``layers`` per-layer token sets on the first joint blocks (the reference's ``n_dc_layers`` = 5;
    ``sites`` patterns select joint sites instead), N(0, 0.02) tokens (``token_init`` and
    ``time_layout`` are UNet settings), timesteps uniform over 0-999 with ``sigma = t / 1000`` and the
    flow target ``noise - x0``; ``max_sequence_length``: T5 tokens of the prompt encoding (``None``:
    the pipeline's default; 0 for a model trained without T5, such as shapes-sd3).
    """

    data: str | Path
    model: str | Path
    output: str | Path
    max_steps: int = 1000
    batch_size: int = 4
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    min_learning_rate: float = 1e-5
    restart_every: int = 5000
    lr_step_every: int = 500
    num_tokens: int = 4
    token_init: str = "text"
    time_buckets: int = 100
    time_layout: str = "shared"
    sites: list[str] | None = None
    layers: int = 5
    max_sequence_length: int | None = None
    resolution: int = 512
    seed: int = 0
    loss: ContrastiveLossConfig = field(default_factory=ContrastiveLossConfig)
    negative_bank: int = 0
    gather_negatives: bool = False
    hard_negatives: int = 0
    row_chunk: int | None = None
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    validate_every: int = 100
    val_fraction: float = 0.1
    val_group: int = 4
    val_timesteps: tuple[int, ...] = (250, 500, 750)
    keep_best: str = "group"
    patience: int = 0
    device: str | None = None
    resume: str | Path | None = None
    overwrite: bool = False
    progress: bool = True

    def fingerprint(self, num_processes: int) -> dict:
        """The settings a resumed run must share with the checkpoint it resumes."""
        values = dataclasses.asdict(self)
        values = {k: (str(v) if isinstance(v, Path) else v) for k, v in values.items() if k not in _RESUMABLE_CHANGES}
        values["val_timesteps"] = list(self.val_timesteps)
        for key, default in _LATER_SETTINGS.items():
            if values[key] == default:
                del values[key]
        values["num_processes"] = num_processes
        return values

    @property
    def checkpoint_dir(self) -> Path:
        output = Path(self.output)
        return output.parent / f"{output.stem}.checkpoints"

    @property
    def log_path(self) -> Path:
        """The JSON training log beside the token file (one entry per evaluation)."""
        output = Path(self.output)
        return output.parent / f"{output.stem}.log.json"


def check_config(config: TrainConfig, num_processes: int) -> None:
    output = Path(config.output)
    if output.suffix.lower() != ".safetensors":
        raise InputError(f"{output}: the token file must end in .safetensors")
    if output.exists() and not (config.overwrite or config.resume):
        raise InputError(f"{output} exists; pass --overwrite to replace it (or --resume to continue its run)")
    has_negatives = config.negative_bank > 0 or (config.gather_negatives and num_processes > 1)
    if config.batch_size < 2 and not has_negatives:
        raise InputError("batch size 1 has no negative captions: use --batch-size 2 or more, or a --negative-bank")
    if config.loss.direction != "rows" and config.batch_size < 2:
        raise InputError("the column direction contrasts images of a batch: it needs --batch-size 2 or more")
    if config.mixed_precision not in ("no", "fp16", "bf16"):
        raise InputError(f"mixed precision must be no, fp16 or bf16, not {config.mixed_precision!r}")
    from editkit.softrepa.tokens import TIME_LAYOUTS, TOKEN_INITS  # tokens imports the attention layer

    if config.time_layout not in TIME_LAYOUTS:
        raise InputError(f"time layout must be {' or '.join(TIME_LAYOUTS)}, not {config.time_layout!r}")
    if config.token_init not in TOKEN_INITS:
        raise InputError(f"token init must be {' or '.join(TOKEN_INITS)}, not {config.token_init!r}")
    if config.keep_best not in KEEP_BEST_METRICS:
        raise InputError(f"keep-best metric must be {' or '.join(KEEP_BEST_METRICS)}, not {config.keep_best!r}")
    if config.layers < 1 or (config.max_sequence_length is not None and config.max_sequence_length < 0):
        raise InputError("--layers must be 1 or more and --max-sequence-length 0 or more")
    if config.hard_negatives < 0:
        raise InputError(f"hard negatives per caption must be 0 or more, not {config.hard_negatives}")
    if config.lr_step_every < 1 or config.restart_every % config.lr_step_every:
        raise InputError(
            f"--restart-every {config.restart_every} must be a multiple of --lr-step-every {config.lr_step_every}"
        )
