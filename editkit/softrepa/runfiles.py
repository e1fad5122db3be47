"""A training run's side files: the lock on its checkpoint folder and its JSON log.

Two trainings writing one ``-o`` would clobber each other's checkpoints and token file, so a run
holds an exclusive ``flock`` on ``<checkpoint folder>/.lock`` while it trains (the main process
only). The kernel releases the lock when the process ends, even by ``kill -9``, so a stale lock
file never blocks the next run. On systems without ``fcntl`` (Windows) there is no lock.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

from editkit.errors import InputError

__all__ = ["evaluation_line", "training_lock", "write_log"]

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"


@contextlib.contextmanager
def training_lock(folder: Path) -> Iterator[None]:
    """Hold the exclusive lock of ``folder`` (created if missing); refuse when another run holds it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / LOCK_NAME, "a+")  # noqa: SIM115 (held open for the whole run)
    except OSError as error:
        raise InputError(f"cannot create the checkpoint folder {folder}: {error.strerror}") from None
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(
                f"another training is running with the checkpoints in {folder}; wait for it or choose another -o"
            ) from None
        yield
    finally:
        handle.close()  # releases the lock


def write_log(path: Path, entries: list[dict]) -> Path:
    """Write the training log (a JSON list, one object per evaluation) atomically."""
    from editkit.image import atomic_write

    text = json.dumps(entries, indent=1, sort_keys=True) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite=True)


def evaluation_line(entry: dict) -> str:
    """One short progress line of an evaluation: step, loss, train accuracy, held-out metrics, best so far.

    The first held-out accuracy is the keep-best metric (named after the margin); then both metrics.
    """

    def number(value, form: str = ".3f") -> str:
        return "-" if value is None else format(value, form)

    def metric(name: str) -> str:
        value = entry.get(name)
        return number(None if value is None else value[0])

    return (
        f"step {entry['step']}: loss {entry['loss']:.4f}, "
        f"train contrastive accuracy {number(entry['train_accuracy'])}, "
        f"held-out accuracy {number(entry['val_accuracy'])} (margin {number(entry['val_margin'], '.3g')}; "
        f"{entry.get('keep_best', 'group')}), group {metric('val_group')}, "
        f"hard negatives {metric('val_hard_negatives')}, best {number(entry['best_accuracy'])}"
    )
