"""editkit.atomic (issue 15.7, 15.8, 15.11, 15.12): names the file system allows, stale temporary
files removed, disk full as a user error also from safetensors, modes from the umask, symlinks."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from editkit.errors import InputError
from editkit.image import atomic_write  # re-exported from editkit.atomic (where it was before 15.7)


def save_safetensors(path: Path, tensors: dict) -> Path:
    """How every safetensors output (style caches, tokens, checkpoints) is written."""
    from safetensors.torch import save_file

    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))


def _dead_pid() -> int:
    """The pid of a process that has ended."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def _host_tag() -> str:
    """This host's tag in editkit's temporary names, as a writer of this host would put it."""
    import hashlib
    import socket

    return hashlib.sha1(socket.gethostname().encode(), usedforsecurity=False).hexdigest()[:8]


def test_a_name_of_250_bytes_is_written_and_one_over_the_limit_refused(tmp_path):
    name = "é" * 123 + ".png"  # 250 bytes in UTF-8; the temporary name must not push it over 255
    assert len(os.fsencode(name)) == 250
    path = atomic_write(tmp_path / name, lambda tmp: tmp.write_bytes(b"x"))
    assert path.read_bytes() == b"x"
    with pytest.raises(InputError, match="at most 255"):
        atomic_write(tmp_path / ("x" * 252 + ".png"), lambda tmp: tmp.write_bytes(b"x"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_stale_temporary_files_are_removed_and_live_ones_kept(tmp_path):
    from editkit.atomic import STALE_TEMP_SECONDS, remove_stale_temps

    old = time.time() - STALE_TEMP_SECONDS - 60
    stale = {
        f".editkit-{_host_tag()}-{_dead_pid()}-0123abcd.tmp.png": None,  # a killed writer of this host
        ".result.k2j4_9zq.tmp.png": old,  # the naming before 15.7, idle for long
        ".cache.a1b2c3d4.tmp.safetensors": old,
        ".editkit-00000000-12-0123abcd.tmp.png": old,  # another host's, idle for long
    }
    kept = {
        f".editkit-{_host_tag()}-{os.getpid()}-0123abcd.tmp.png": old,  # a live writer
        ".result.k2j4_9zq.tmp.png.recent": None,
        ".cache.a1b2c3d4.tmp.safetensors.x": old,  # not editkit's naming
        ".fresh.abcdefgh.tmp.png": None,  # the old naming, but just written (maybe by a live process)
        ".editkit-00000000-12-0123abcd.tmp.jpg": None,  # another host's, busy
        ".notes.tmp": old,
        "visible.abcdefgh.tmp.png": old,
    }
    for name, mtime in {**stale, **kept}.items():
        (tmp_path / name).write_bytes(b"partial")
        if mtime is not None:
            os.utime(tmp_path / name, (mtime, mtime))
    removed = remove_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    assert remove_stale_temps(tmp_path / "missing") == []


def test_disk_full_inside_safetensors_is_a_user_error(tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(InputError, match="no space left"):
        save_safetensors(tmp_path / "cache.safetensors", {"a": torch.zeros(2)})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_every_output_follows_the_umask(tmp_path, umask, mode):
    from PIL import Image

    from editkit.image import save_image

    previous = os.umask(umask)
    try:
        files = [
            save_safetensors(tmp_path / "tensors.safetensors", {"a": torch.zeros(2)}),
            save_image(Image.new("RGB", (8, 8)), tmp_path / "image.png"),
            atomic_write(tmp_path / "manifest.json", lambda tmp: tmp.write_text("{}")),
        ]
    finally:
        os.umask(previous)
    assert {path.name: oct(path.stat().st_mode & 0o777) for path in files} == {path.name: oct(mode) for path in files}


def test_overwriting_a_symlink_replaces_the_file_it_points_to(tmp_path):
    target = tmp_path / "real" / "image.png"
    target.parent.mkdir()
    target.write_bytes(b"old")
    link = tmp_path / "latest.png"
    link.symlink_to(target)
    with pytest.raises(InputError, match="exists"):
        atomic_write(link, lambda tmp: tmp.write_bytes(b"new"))
    written = atomic_write(link, lambda tmp: tmp.write_bytes(b"new"), overwrite=True)
    assert written == target.resolve() and link.is_symlink() and link.read_bytes() == b"new"


def test_dot_dot_after_a_missing_folder_is_refused_and_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        atomic_write(Path("ghost/../g.png"), lambda tmp: tmp.write_bytes(b"x"))
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "real").mkdir()
    assert atomic_write(Path("real/../g.png"), lambda tmp: tmp.write_bytes(b"x")).read_bytes() == b"x"
