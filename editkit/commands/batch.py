"""Batch runs for the CLI: work split across processes, a resumable JSON manifest.

Run the same command under ``accelerate launch --multi_gpu --num_processes N`` (on a machine
without CUDA the processes run on the CPU and coordinate over gloo) and each process takes its
share of the jobs (``jobs[rank::N]``: no duplicates, no gaps). Each process records what it
produced in its own part file; the main process merges the parts into ``manifest.json`` once all
are done. A job already listed as done in the manifest (its output still on disk) is skipped, so
an interrupted batch resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from editkit.errors import InputError
from editkit.image import atomic_write

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class Job:
    """One output of a batch: a unique key, its output file name and its inputs."""

    key: str
    output: str
    inputs: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ProcessShare:
    """This process's place among the batch's processes."""

    index: int = 0
    count: int = 1

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def take(self, jobs: Sequence[Job]) -> list[Job]:
        """This process's jobs: every ``count``-th job starting at ``index``."""
        return list(jobs[self.index :: self.count])


def current_share() -> tuple[ProcessShare, Callable[[], None]]:
    """This process's share and a barrier; a single process when not under ``accelerate launch``."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return ProcessShare(), lambda: None
    import torch
    from accelerate import PartialState

    # without CUDA, torchrun-style processes (accelerate launch --multi_gpu) share work over gloo
    state = PartialState(cpu=not torch.cuda.is_available())
    return ProcessShare(state.process_index, state.num_processes), state.wait_for_everyone


def images_in(folder: Path) -> list[Path]:
    """The image files of ``folder`` (sorted, hidden files skipped); an error if there are none."""
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder")
    suffixes = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in suffixes and not p.name.startswith("."))
    if not files:
        raise InputError(f"{folder} holds no images (.png, .jpg, .webp, ...)")
    return files


class Manifest:
    """What a batch in ``folder`` has produced, merged from per-process part files."""

    def __init__(self, folder: Path, command: str, params: dict[str, Any]) -> None:
        self.folder = folder
        self.command = command
        self.params = params
        self.entries: dict[str, dict[str, Any]] = {}
        # the merged manifest, then the parts an interrupted run left behind
        for path in [folder / MANIFEST_NAME, *sorted(folder.glob(f".{MANIFEST_NAME}.part-*"))]:
            self.entries.update(self._read(path))

    @staticmethod
    def _read(path: Path) -> dict[str, dict[str, Any]]:
        if not path.exists():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return {entry["key"]: entry for entry in data["outputs"]}
        except (ValueError, KeyError, TypeError):
            raise InputError(
                f"{path} is not an editkit manifest; move it away or choose another --output-dir"
            ) from None

    def is_done(self, job: Job) -> bool:
        """Whether ``job`` is recorded as done and its output is still on disk."""
        return job.key in self.entries and (self.folder / job.output).exists()

    def record(self, job: Job, share: ProcessShare, **details: Any) -> None:
        """Record a finished job in this process's part file (atomically rewritten)."""
        entry = {"key": job.key, "output": job.output, "inputs": job.inputs, "process": share.index, **details}
        self.entries[job.key] = entry
        part = self.folder / f".{MANIFEST_NAME}.part-{share.index}"
        mine = [e for e in self.entries.values() if e.get("process") == share.index]
        _write_json(part, {"outputs": mine})

    def merge(self, jobs: Iterable[Job]) -> Path:
        """Main process: merge every part into ``manifest.json`` (in job order) and remove the parts."""
        for part in sorted(self.folder.glob(f".{MANIFEST_NAME}.part-*")):
            self.entries.update(self._read(part))
        order = {job.key: i for i, job in enumerate(jobs)}
        outputs = sorted(self.entries.values(), key=lambda e: order.get(e["key"], len(order)))
        path = _write_json(
            self.folder / MANIFEST_NAME,
            {"version": MANIFEST_VERSION, "command": self.command, "params": self.params, "outputs": outputs},
        )
        for part in self.folder.glob(f".{MANIFEST_NAME}.part-*"):
            part.unlink(missing_ok=True)
        return path


def _write_json(path: Path, data: dict) -> Path:
    text = json.dumps(data, indent=2, sort_keys=True, default=str)
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite=True)


def run_batch(
    jobs: Sequence[Job],
    folder: Path,
    command: str,
    params: dict[str, Any],
    produce: Callable[[Job], dict[str, Any] | None],
) -> Path:
    """Produce this process's share of ``jobs`` into ``folder`` and write the merged manifest.

    ``produce(job)`` writes ``folder / job.output`` and returns details for the manifest.
    Returns the manifest path.
    """
    if len({job.key for job in jobs}) != len(jobs) or len({job.output for job in jobs}) != len(jobs):
        raise InputError("batch jobs must have unique keys and output names")
    folder.mkdir(parents=True, exist_ok=True)
    share, barrier = current_share()
    manifest = Manifest(folder, command, params)
    todo = [job for job in share.take(jobs) if not manifest.is_done(job)]
    logger.info("process %d/%d: %d of its jobs to do", share.index + 1, share.count, len(todo))
    for job in todo:
        manifest.record(job, share, **(produce(job) or {}))
    barrier()
    path = folder / MANIFEST_NAME
    if share.is_main:
        path = manifest.merge(jobs)
    barrier()
    return path
