"""Atomic file writes shared by every output editkit writes (PNG, JSON manifests, safetensors).

:func:`atomic_write` writes a hidden temporary file next to the target and renames it into place,
so an interrupted write never leaves a partial file. What it guarantees:

- **Names**: the temporary file has a short fixed-length name (``.editkit-<host>-<pid>-<random>.tmp``
  plus the target's suffix), so any output name the file system allows also works while writing;
  names over the file system's limit (``NAME_MAX``, 255 bytes on common file systems) are refused
  before anything is written (:func:`check_output_target`).
- **Stale temporary files** that a killed process left (this naming, and the older
  ``.<stem>.<random>.tmp<suffix>`` naming) are removed by :func:`remove_stale_temps`, which the CLI
  calls on the folders it writes to: those of a process of this host that is no longer running,
  and those idle for :data:`STALE_TEMP_SECONDS` (a writer on another host of a shared file system).
- **Errors**: disk full (``ENOSPC``/``EDQUOT``) and unwritable targets become an
  :class:`~editkit.errors.InputError` (exit code 2), also when they arrive wrapped by a library
  (safetensors reports ``... (os error 28)``); the temporary file is removed.
- **Permissions**: the written file gets ``0o666 & ~umask`` whatever the writer did (safetensors
  creates its files 0600).
- **Symlinks**: writing onto a symbolic link replaces the file it points to (the link is kept), as
  a shell redirection or ``cp`` would; a dangling link is written through as well.
- **Paths** with ``..`` after a folder that does not exist are refused (the system would resolve
  them differently from the folders that would be created).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import secrets
import socket
import time
from collections.abc import Callable
from pathlib import Path

from editkit.errors import InputError, OutputExistsError

__all__ = [
    "STALE_TEMP_SECONDS",
    "atomic_write",
    "check_output_target",
    "name_limit",
    "remove_stale_temps",
    "save_safetensors",
]

logger = logging.getLogger(__name__)

#: A temporary file of another host (or of the old naming) idle this long is a killed writer's leftover.
STALE_TEMP_SECONDS = 600
#: Fallback file-name limit in bytes where the file system does not say (``NAME_MAX`` of ext4, xfs, tmpfs).
DEFAULT_NAME_MAX = 255
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)
_TEMP_NAME = re.compile(r"^\.editkit-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{8}\.tmp(\.[^.]*)?$")
_OLD_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp(\.[A-Za-z0-9]+)?$")  # tempfile naming before 15.7
_WRAPPED_ERRNO = re.compile(r"\(os error (\d+)\)")


def atomic_write(path: str | os.PathLike, write_fn: Callable[[Path], object], *, overwrite: bool = False) -> Path:
    """Write a file atomically: ``write_fn(temp_path)`` writes it, then it is renamed onto ``path``.

    The temporary file lies in the target's folder (so the rename is atomic), is fsynced before
    the rename and is deleted on any exception, KeyboardInterrupt included. Missing parent folders
    are created. An existing ``path`` is refused unless ``overwrite``. Returns the path written
    (for a symbolic link: the file it points to). Usage:
    ``atomic_write(out, lambda tmp: image.save(tmp, format="PNG"))``.
    """
    target = check_output_target(path, overwrite=overwrite)
    _make_parents(target)
    tmp = _temp_file(target)
    try:
        write_fn(tmp)
        os.chmod(tmp, _default_mode())  # some writers (safetensors) recreate the file 0600
        with open(tmp, "rb+") as written:  # flush to disk before the rename makes it visible
            os.fsync(written.fileno())
        _move_into_place(tmp, target, overwrite)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        _raise_input_error(error, target)
        raise
    logger.debug("wrote %s", target)
    return target


def save_safetensors(
    path: str | os.PathLike, tensors: dict, *, metadata: dict[str, str] | None = None, overwrite: bool = False
) -> Path:
    """Write ``tensors`` (name -> contiguous CPU tensor) as a safetensors file with :func:`atomic_write`."""
    from safetensors.torch import save_file

    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), overwrite=overwrite)


def check_output_target(path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """The file a write to ``path`` would replace, checked before any work; InputError otherwise.

    Refuses a folder, an existing file without ``overwrite`` (:class:`OutputExistsError`), a name
    over the file system's limit and ``..`` after a missing folder. Creates nothing.
    """
    path = Path(path).expanduser()
    limit = name_limit(path.parent)
    for part in path.parts:  # first: the system refuses to even look at a longer name
        if len(os.fsencode(part)) > limit:
            raise InputError(f"the name {part[:40]}... is {len(os.fsencode(part))} bytes; at most {limit} are allowed")
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    _check_dot_dot(path)
    if path.is_dir():
        raise InputError(f"{path} is a directory; give a file name")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} exists; pass --overwrite to replace it")
    return path


def name_limit(folder: str | os.PathLike) -> int:
    """The longest file name in bytes the file system of ``folder`` (or its nearest existing parent) allows."""
    existing = next((p for p in [Path(folder), *Path(folder).parents] if p.exists()), Path("."))
    try:
        return int(os.pathconf(existing, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows) or no answer
        return DEFAULT_NAME_MAX


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that killed editkit writers left in ``folder``; returns them."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:  # no folder yet, or unreadable: nothing of ours to clean
        return removed
    now = time.time()
    for entry in entries:
        if entry.name.startswith(".") and ".tmp" in entry.name and _is_stale(entry, now):
            try:
                os.unlink(entry.path)
            except OSError:
                continue  # removed meanwhile, or not ours to remove
            removed.append(Path(entry.path))
            logger.info("removed %s, left behind by an interrupted write", entry.path)
    return removed


def _is_stale(entry: os.DirEntry, now: float) -> bool:
    """Whether ``entry`` is an editkit temporary file whose writer is gone."""
    try:
        idle = now - entry.stat(follow_symlinks=False).st_mtime
        regular = entry.is_file(follow_symlinks=False)
    except OSError:
        return False
    ours = _TEMP_NAME.match(entry.name)
    if not regular or (ours is None and not _OLD_TEMP_NAME.match(entry.name)):
        return False
    if ours is not None and ours["host"] == _host_tag():
        return not _process_running(int(ours["pid"]))
    return idle > STALE_TEMP_SECONDS


def _process_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):  # another user's process, or a pid out of range
        return True
    return True


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode(), usedforsecurity=False).hexdigest()[:8]


def _check_dot_dot(path: Path) -> None:
    prefix = Path()
    for part in path.parts:
        if part == ".." and not prefix.is_dir():
            raise InputError(f"{path}: the folder {prefix} does not exist, so '..' after it cannot be followed")
        prefix = prefix / part


def _make_parents(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"cannot create the output folder {path.parent}: {error.strerror}") from None
    if not os.access(path.parent, os.W_OK):
        raise InputError(f"the output folder {path.parent} is not writable; choose another path")


def _default_mode() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _temp_file(path: Path) -> Path:
    """Create an empty hidden temporary file next to ``path`` with a short name (same suffix)."""
    suffix = path.suffix if len(path.suffix) <= 16 else ""
    name = f".editkit-{_host_tag()}-{os.getpid()}-{secrets.token_hex(4)}.tmp{suffix}"
    tmp = path.parent / name
    try:
        descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as error:
        _raise_input_error(error, path)
        raise InputError(f"cannot write in {path.parent}: {error.strerror}") from None
    os.close(descriptor)
    return tmp


def _move_into_place(tmp: Path, path: Path, overwrite: bool) -> None:
    """Rename ``tmp`` onto ``path``; without ``overwrite``, never replace a file that appeared meanwhile."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # atomic create-if-absent
    except FileExistsError:
        raise OutputExistsError(f"{path} exists; pass --overwrite to replace it") from None
    except OSError as error:
        if error.errno in _DISK_FULL:
            raise
        os.replace(tmp, path)  # a file system without hard links
    else:
        tmp.unlink()


def _raise_input_error(error: BaseException, path: Path) -> None:
    """Raise the user's error for a disk-full or unwritable ``error`` (also one a library wrapped)."""
    code = getattr(error, "errno", None) if isinstance(error, OSError) else None
    if code is None and not isinstance(error, (OSError, KeyboardInterrupt, SystemExit, InputError)):
        found = _WRAPPED_ERRNO.search(str(error))
        code = int(found.group(1)) if found else None
    if code in _DISK_FULL:
        raise InputError(f"no space left on the device while writing {path}; free some space") from None
    if code in _NOT_WRITABLE:
        raise InputError(f"cannot write {path}: {os.strerror(code)}") from None
