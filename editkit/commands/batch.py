"""Batch runs for the CLI: work split across processes, a resumable JSON manifest.

Run the same command under ``accelerate launch --multi_gpu --num_processes N`` (on a machine
without CUDA the processes run on the CPU and coordinate over gloo) and each process takes its
share of the jobs (``jobs[rank::N]``: no duplicates, no gaps). Each process records what it
produced in its own part file; the main process merges the parts into ``manifest.json`` once all
are done. A job already listed as done in the manifest (its output still on disk) is skipped, so
an interrupted batch resumes where it stopped.

Recording and writing are a recoverable pair: a job is first recorded as *pending* with its
fingerprint (a hash of its inputs: prompts, the bytes of its input files), each output is then
written atomically and marked written, and the job marked done. A kill (or a full disk) between
two steps leaves an output the manifest knows as pending: the next run redoes it (it replaces
its own pending output) instead of refusing it. A job whose inputs changed since it was recorded
(a corrected prompt, an edited image) has another fingerprint and is redone the same way. One
batch at a time writes a folder: each process holds a lock file (``.manifest.json.lock-<index>``)
while it runs, and a second batch started on the same folder is refused at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from editkit.atomic import DEFAULT_NAME_MAX, atomic_write, name_limit, remove_stale_temps
from editkit.errors import InputError, OutputExistsError
from editkit.jsonio import parse_json

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 2  # 2: entries carry the job's fingerprint and its pending outputs


@dataclass(frozen=True)
class Job:
    """One unit of a batch: a unique key, its output file name(s) and its inputs.

    A job may write several outputs (e.g. one content image stylized by every style); each is
    recorded as soon as it is written, so a resumed batch writes only the missing ones.
    """

    key: str
    output: str | tuple[str, ...]
    inputs: dict[str, str] = field(default_factory=dict)
    #: A hash of everything the job's result depends on besides the batch's options (see :func:`fingerprint`).
    fingerprint: str = ""

    @property
    def outputs(self) -> tuple[str, ...]:
        return (self.output,) if isinstance(self.output, str) else tuple(self.output)


@dataclass
class Task:
    """What ``produce`` gets: the job, the outputs still to write, and a way to record each one written."""

    job: Job
    folder: Path
    pending: tuple[str, ...]
    _written: Callable[[str], None]

    def path(self, name: str) -> Path:
        return self.folder / name

    def written(self, name: str) -> None:
        """Record ``name`` (one of the job's outputs) as written; call it right after each save."""
        self._written(name)


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


def fingerprint(inputs: dict[str, Any], files: Iterable[str | os.PathLike] = ()) -> str:
    """A hash of a job's inputs: the ``inputs`` values and the bytes of each of ``files``."""
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode())
    for path in files:
        try:
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        except OSError as error:
            raise InputError(f"cannot read {path}: {error.strerror or error}") from None
        digest.update(b"\0")
    return digest.hexdigest()[:32]


def output_name(stem: str, suffix: str = ".png", *, limit: int = DEFAULT_NAME_MAX) -> str:
    """``stem + suffix``, with a long stem cut (and a hash of it appended) to fit ``limit`` bytes."""
    name = stem + suffix
    if len(os.fsencode(name)) <= limit:
        return name
    tag = "-" + hashlib.sha256(os.fsencode(stem)).hexdigest()[:8]
    room = limit - len(os.fsencode(suffix + tag))
    cut = os.fsencode(stem)[:room].decode("utf-8", errors="ignore")
    return cut + tag + suffix


def recorded_outputs(folder: Path) -> set[str]:
    """The output names an existing manifest (and its parts) in ``folder`` records; empty if none."""
    names: set[str] = set()
    for path in [folder / MANIFEST_NAME, *sorted(folder.glob(f".{MANIFEST_NAME}.part-*"))]:
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError, RecursionError):
            for entry in json.loads(path.read_text(encoding="utf-8"))["outputs"]:
                names.update(_names(entry.get("output")), entry.get("pending", []), entry.get("written", []))
    return {name for name in names if isinstance(name, str)}


def without_outputs(files: Sequence[Path], output_folder: Path | None) -> list[Path]:
    """``files`` less the outputs a batch in ``output_folder`` recorded (when both share a folder)."""
    if output_folder is None or not output_folder.is_dir():
        return list(files)
    folder = output_folder.resolve()
    recorded = recorded_outputs(output_folder)
    kept = [p for p in files if not (p.resolve().parent == folder and p.name in recorded)]
    if len(kept) < len(files):
        logger.info("skipping %d input(s) that are this batch's own outputs", len(files) - len(kept))
    return kept


def _names(output: Any) -> list[str]:
    return [output] if isinstance(output, str) else list(output or [])


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
    """What a batch in ``folder`` has produced, merged from per-process part files.

    ``overwrite`` starts afresh (the recorded outputs are ignored and will be replaced). A
    manifest made with other parameters is refused: resuming it would mix two configurations.
    """

    def __init__(self, folder: Path, command: str, params: dict[str, Any], *, overwrite: bool = False) -> None:
        self.folder = folder
        self.command = command
        self.params = json.loads(json.dumps(params, sort_keys=True, default=str))
        self.entries: dict[str, dict[str, Any]] = {}
        if overwrite:
            return
        # the merged manifest, then the parts an interrupted run left behind
        for path in [folder / MANIFEST_NAME, *sorted(folder.glob(f".{MANIFEST_NAME}.part-*"))]:
            self.entries.update(self._read(path))

    def _read(self, path: Path) -> dict[str, dict[str, Any]]:
        if not path.exists():
            return {}
        try:
            data = parse_json(path.read_text(encoding="utf-8"), str(path))
            entries = {entry["key"]: entry for entry in data["outputs"]}
        except (ValueError, KeyError, TypeError, OSError):
            raise InputError(
                f"{path} is not an editkit manifest; move it away or choose another output folder"
            ) from None
        if data.get("command", self.command) != self.command or data.get("params", self.params) != self.params:
            raise InputError(
                f"{path} records a batch made with other options; use another output folder, "
                "or pass --overwrite to start it again"
            )
        return entries

    def _current(self, job: Job) -> dict[str, Any] | None:
        """The entry of ``job`` if it was made from the same inputs (entries of version 1 carry none)."""
        entry = self.entries.get(job.key)
        if entry is None or entry.get("fingerprint", job.fingerprint) != job.fingerprint:
            return None
        return entry

    def written(self, job: Job) -> set[str]:
        """The outputs of ``job`` recorded as written from its current inputs and still on disk."""
        entry = self._current(job)
        if entry is None:
            return set()
        names = job.outputs if entry.get("done", "written" not in entry) else entry.get("written", [])
        return {name for name in names if name in job.outputs and (self.folder / name).exists()}

    def owned(self, job: Job) -> set[str]:
        """Outputs of ``job`` on disk that this batch wrote or was writing (from any inputs): its to replace."""
        entry = self.entries.get(job.key)
        if entry is None:
            return set()
        names = {*entry.get("written", []), *entry.get("pending", [])}
        return {name for name in names if name in job.outputs and (self.folder / name).exists()}

    def is_done(self, job: Job) -> bool:
        """Whether ``job`` is recorded as done and all its outputs are still on disk."""
        return self._current(job) is not None and self.written(job) == set(job.outputs)

    def unrecorded(self, jobs: Iterable[Job]) -> list[Path]:
        """Outputs already on disk that this batch did not record (another run's files)."""
        return [
            self.folder / name
            for job in jobs
            for name in job.outputs
            if (self.folder / name).exists() and name not in self.owned(job)
        ]

    def begin(self, job: Job, share: ProcessShare, pending: Sequence[str]) -> None:
        """Record ``job`` as pending (its fingerprint, the outputs about to be written) before writing them."""
        entry = self._entry(job, share, done=False)
        entry.update(written=sorted(self.written(job)), pending=sorted(pending))
        self.entries[job.key] = entry
        self._write_part(share)

    def record_output(self, job: Job, share: ProcessShare, name: str) -> None:
        """Record one written output of an unfinished job (pending -> written)."""
        entry = self.entries.get(job.key)
        if entry is None or entry.get("process") != share.index or entry.get("done"):
            entry = self._entry(job, share, done=False)
        entry["written"] = sorted({*entry.get("written", []), name})
        entry["pending"] = [n for n in entry.get("pending", []) if n != name]
        self.entries[job.key] = entry
        self._write_part(share)

    def record(self, job: Job, share: ProcessShare, **details: Any) -> None:
        """Record a finished job in this process's part file (atomically rewritten)."""
        self.entries[job.key] = {**self._entry(job, share, done=True), **details}
        self._write_part(share)

    def _entry(self, job: Job, share: ProcessShare, *, done: bool) -> dict[str, Any]:
        outputs = list(job.outputs)
        return {"key": job.key, "output": job.output if isinstance(job.output, str) else outputs,
                "inputs": job.inputs, "fingerprint": job.fingerprint, "process": share.index, "done": done,
                "written": outputs if done else [], "pending": []}  # fmt: skip

    def _write_part(self, share: ProcessShare) -> None:
        part = self.folder / f".{MANIFEST_NAME}.part-{share.index}"
        mine = [e for e in self.entries.values() if e.get("process") == share.index]
        _write_json(part, {"command": self.command, "params": self.params, "outputs": mine})

    def merge(self, jobs: Iterable[Job]) -> Path:
        """Main process: merge every part into ``manifest.json`` (in job order) and remove the parts."""
        for part in sorted(self.folder.glob(f".{MANIFEST_NAME}.part-*")):
            for key, entry in self._read(part).items():  # a stale part of an earlier run never undoes a done job
                if not self.entries.get(key, {}).get("done") or entry.get("done"):
                    self.entries[key] = entry
        order = {job.key: i for i, job in enumerate(jobs)}
        outputs = sorted(self.entries.values(), key=lambda e: order.get(e["key"], len(order)))
        path = _write_json(
            self.folder / MANIFEST_NAME,
            {"version": MANIFEST_VERSION, "command": self.command, "params": self.params, "outputs": outputs},
        )
        for part in self.folder.glob(f".{MANIFEST_NAME}.part-*"):
            part.unlink(missing_ok=True)
        return path


def check_batch_outputs(jobs: Sequence[Job], folder: Path, command: str, params: dict[str, Any], overwrite: bool):
    """Before any heavy work: unique outputs, a resumable manifest, no unrecorded file in the way,
    names the file system allows, and no other batch running in ``folder``."""
    manifest = _checked_manifest(jobs, folder, command, params, overwrite)
    with _batch_lock(folder, current_share()[0]):
        pass
    done = sum(manifest.is_done(job) for job in jobs)
    if done:
        logger.warning("resuming: %d of %d jobs are already done in %s", done, len(jobs), folder)


def _checked_manifest(jobs: Sequence[Job], folder: Path, command: str, params: dict[str, Any], overwrite: bool):
    names = [name for job in jobs for name in job.outputs]
    if len({job.key for job in jobs}) != len(jobs) or len(set(names)) != len(names):
        raise InputError("batch jobs must have unique keys and output names")
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder} is a file; give a folder for the batch's outputs")
    limit = name_limit(folder)
    too_long = next((name for name in names if len(os.fsencode(name)) > limit), None)
    if too_long is not None:
        raise InputError(f"the output name {too_long[:40]}... is over the file system's limit of {limit} bytes")
    manifest = Manifest(folder, command, params, overwrite=overwrite)
    clash = [] if overwrite else manifest.unrecorded(jobs)
    if clash:
        raise InputError(f"{clash[0]} exists and is not recorded in this batch's manifest; pass --overwrite")
    return manifest


@contextlib.contextmanager
def _batch_lock(folder: Path, share: ProcessShare):
    """Hold ``folder``'s lock of this process's share: a second batch on the folder is refused, not raced."""
    try:
        import fcntl
    except ImportError:  # no advisory locks on this platform: nothing to hold
        yield
        return
    if not folder.is_dir():
        yield
        return
    lock = folder / f".{MANIFEST_NAME}.lock-{share.index}"
    try:
        handle = open(lock, "a+b")  # noqa: SIM115 (held for the whole block)
    except OSError as error:
        raise InputError(f"cannot write in {folder}: {error.strerror}") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise InputError(
                f"another editkit batch is writing to {folder}; wait until it ends (then rerun to resume) "
                "or choose another output folder"
            ) from None
        yield
    finally:
        handle.close()


def _write_json(path: Path, data: dict) -> Path:
    text = json.dumps(data, indent=2, sort_keys=True, default=str)
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite=True)


def run_batch(
    jobs: Sequence[Job],
    folder: Path,
    command: str,
    params: dict[str, Any],
    produce: Callable[[Task], dict[str, Any] | None],
    *,
    overwrite: bool = False,
) -> Path:
    """Produce this process's share of ``jobs`` into ``folder`` and write the merged manifest.

    ``produce(task)`` writes ``task.path(name)`` for each name in ``task.pending`` (calling
    ``task.written(name)`` after each) and returns details for the manifest. Done jobs are skipped
    unless ``overwrite``. Returns the manifest path.
    """
    share, barrier = current_share()
    _checked_manifest(jobs, folder, command, params, overwrite)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"cannot create the output folder {folder}: {error.strerror}") from None
    with _batch_lock(folder, share):
        barrier()  # every process has checked the folder before any writes to it
        _remove_leftovers(folder, share, overwrite)
        manifest = Manifest(folder, command, params, overwrite=overwrite)
        todo = [job for job in share.take(jobs) if not manifest.is_done(job)]
        logger.info("process %d/%d: %d of its jobs to do", share.index + 1, share.count, len(todo))
        for job in todo:
            _run_job(job, manifest, share, produce, overwrite)
        barrier()
        path = folder / MANIFEST_NAME
        if share.is_main:
            path = manifest.merge(jobs)
        barrier()
    (folder / f".{MANIFEST_NAME}.lock-{share.index}").unlink(missing_ok=True)
    return path


def _remove_leftovers(folder: Path, share: ProcessShare, overwrite: bool) -> None:
    """Stale temporary files; with ``overwrite`` also the part files of the run being replaced."""
    remove_stale_temps(folder)
    if not overwrite:
        return
    for part in folder.glob(f".{MANIFEST_NAME}.part-*"):  # this process's, and the main one removes absent ones
        index = part.name.rsplit("-", 1)[-1]
        if index == str(share.index) or (share.is_main and not (index.isdigit() and int(index) < share.count)):
            part.unlink(missing_ok=True)


def _run_job(job: Job, manifest: Manifest, share: ProcessShare, produce: Callable, overwrite: bool) -> None:
    """Record ``job`` pending, replace its own stale or pending outputs, produce it, record it done."""
    written = manifest.written(job)
    pending = tuple(name for name in job.outputs if name not in written)
    replaced = sorted(manifest.owned(job) - written)  # ours, from a killed write or older inputs: redone
    manifest.begin(job, share, pending)
    for name in replaced:
        (manifest.folder / name).unlink(missing_ok=True)
    task = Task(job, manifest.folder, pending, lambda name: manifest.record_output(job, share, name))
    try:
        details = produce(task) or {}
    except OutputExistsError as error:
        raise InputError(
            f"{error.args[0].split(' exists')[0]} was written meanwhile by another process; "
            "rerun the command to resume this batch"
        ) from None
    manifest.record(job, share, **details)
