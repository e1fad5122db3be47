"""Issue 15.3-15.5 and 15.13: batches survive a kill between writing and recording an output,
redo jobs whose inputs changed, never take their own outputs as inputs, and refuse a second
batch on the same folder instead of racing it.

A kill is simulated in-process by :class:`Killed` (a BaseException nothing in editkit catches)
raised at the exact event; one case uses a real ``os._exit`` in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import bad_inputs as bad
import pytest
from PIL import Image
from test_batch_cli import _cli

import editkit.image
from editkit.commands import batch

ROOT = Path(__file__).resolve().parents[1]
FAST = {
    "stylize": ["--steps", "1", "--size", "32", "--device", "cpu"],
    "edit": ["--steps", "1", "--device", "cpu"],
    "compose": ["--steps", "1", "--size", "32", "--no-refine", "--device", "cpu"],
}


class Killed(BaseException):
    """The process died here (nothing after this point ran)."""


def _argv(command: str, tmp_path: Path, model: Path, out: Path) -> list:
    """A three-output batch of ``command`` into ``out``."""
    inputs = tmp_path / "inputs"
    inputs.mkdir(exist_ok=True)
    if command == "compose":
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("a red car\na blue bird\na green tree\n")
        return ["compose", "--prompts", prompts, "--output-dir", out, "--model", model, *FAST[command]]
    for i in range(3):
        bad.good_image(inputs, f"p{i}.png", (40, 32), seed=i)
    if command == "edit":
        head = ["edit", inputs, "--source-prompt", "a cat", "--target-prompt", "a dog", "--output-dir", out]
        return [*head, "--model", model, *FAST[command]]
    style = bad.good_image(tmp_path, "style.png", (32, 32), seed=9)
    return ["stylize", inputs, style, "--output-dir", out, "--model", model, *FAST[command]]


def _manifest_outputs(folder: Path) -> list[str]:
    entries = json.loads((folder / "manifest.json").read_text())["outputs"]
    return [name for e in entries for name in ([e["output"]] if isinstance(e["output"], str) else e["output"])]


@pytest.mark.parametrize("command", ["stylize", "edit", "compose"])
def test_a_kill_between_writing_and_recording_resumes(capsys, sd15_dir, tmp_path, monkeypatch, saves, command):
    out = tmp_path / "out"
    argv = _argv(command, tmp_path, sd15_dir, out)

    def killed(self, job, share, name):  # the output is on disk; the process dies before recording it
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(batch.Manifest, "record_output", killed)
        with pytest.raises(Killed):
            _cli(capsys, argv)
    first = saves[0]
    assert [p.name for p in out.glob("*.png")] == [first]
    code, err = _cli(capsys, argv)
    assert code == 0, err
    assert sorted(saves[1:]) == sorted(p.name for p in out.glob("*.png"))  # the unrecorded output redone
    assert len(_manifest_outputs(out)) == 3 == len(set(_manifest_outputs(out)))
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp, part or lock file left


def test_a_real_kill_after_the_write_resumes(capsys, sd15_dir, tmp_path):
    out = tmp_path / "out"
    argv = [str(a) for a in _argv("compose", tmp_path, sd15_dir, out)]
    script = (
        "import os, sys\n"
        "import editkit.commands.batch as batch\n"
        "batch.Manifest.record_output = lambda *a, **k: os._exit(9)\n"
        "from editkit.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    killed = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, cwd=ROOT)
    assert killed.returncode == 9 and len(list(out.glob("*.png"))) == 1, killed.stderr[-2000:]
    code, err = _cli(capsys, argv)  # the resume (in this process: the kill was the real one)
    assert code == 0, err
    assert sorted(_manifest_outputs(out)) == sorted(p.name for p in out.glob("*.png"))
    assert len(_manifest_outputs(out)) == 3


def test_changed_inputs_are_redone(capsys, sd15_dir, tmp_path, saves):
    """15.4: a corrected JSONL line, and a replaced image, are redone; the unchanged jobs are not."""
    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    bad.good_image(images, "cat.png", (40, 32))
    bad.good_image(images, "dog.png", (40, 32), seed=1)
    edits = tmp_path / "edits.jsonl"
    line = '{{"image": "{}", "source_prompt": "a cat", "target_prompt": "{}"}}\n'
    edits.write_text(line.format("cat.png", "a dgo") + line.format("dog.png", "a wolf"))
    argv = ["edit", images, "--prompts", edits, "--output-dir", out, "--model", sd15_dir, *FAST["edit"]]
    assert _cli(capsys, argv)[0] == 0 and saves == ["0000-cat.png", "0001-dog.png"]
    edits.write_text(line.format("cat.png", "a dog") + line.format("dog.png", "a wolf"))  # the typo fixed
    code, err = _cli(capsys, argv)
    assert code == 0, err
    assert saves[2:] == ["0000-cat.png"]
    with Image.open(out / "0000-cat.png") as edited:
        assert json.loads(edited.text["editkit"])["target_prompt"] == "a dog"
    bad.good_image(images, "dog.png", (40, 32), seed=7)  # the same name, another picture
    assert _cli(capsys, argv)[0] == 0 and saves[3:] == ["0001-dog.png"]
    assert _cli(capsys, argv)[0] == 0 and len(saves) == 4  # nothing changed: nothing redone


def test_a_stylize_batch_into_its_own_content_folder(capsys, sd15_dir, tmp_path, saves):
    """15.5: the outputs (recorded, or written by a killed run) are never stylized themselves."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(2):
        bad.good_image(folder, f"c{i}.png", (40, 32), seed=i)
    style = bad.good_image(tmp_path, "style.png", (32, 32), seed=9)
    argv = ["stylize", folder, style, "--output-dir", folder, "--model", sd15_dir, *FAST["stylize"]]
    assert _cli(capsys, argv)[0] == 0
    assert sorted(p.name for p in folder.glob("*.png")) == ["c0.png", "c0__style.png", "c1.png", "c1__style.png"]
    code, err = _cli(capsys, argv)
    assert code == 0, err
    assert len(saves) == 2 and len(list(folder.glob("*.png"))) == 4
    (folder / "manifest.json").unlink()  # even unrecorded, a file named like one of its outputs is no input
    code, err = _cli(capsys, [*argv, "--overwrite"])
    assert code == 0, err
    assert len(list(folder.glob("*.png"))) == 4 and "c0__style__style.png" not in saves


def test_a_second_batch_on_the_same_folder_is_refused(capsys, sd15_dir, tmp_path):
    """15.13: a batch running in a folder holds its lock; another one is refused before any work."""
    import fcntl

    out = tmp_path / "out"
    out.mkdir()
    argv = _argv("compose", tmp_path, sd15_dir, out)
    with open(out / ".manifest.json.lock-0", "a+b") as held:  # what the running batch holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, err = _cli(capsys, argv)
    assert code == 2 and "another editkit batch is writing" in err and "--overwrite" not in err
    assert not list(out.glob("*.png"))


def test_the_loser_of_a_race_is_not_told_to_overwrite(capsys, sd15_dir, tmp_path, monkeypatch):
    """15.13: an output that appears while this batch writes it is the other process's work."""
    real = editkit.image.save_image

    def raced(image, path, **kwargs):
        Path(path).write_bytes(b"the winner's image")  # lands between the check and the create
        return real(image, path, **kwargs)

    monkeypatch.setattr(editkit.image, "save_image", raced)
    out = tmp_path / "out"
    code, err = _cli(capsys, _argv("compose", tmp_path, sd15_dir, out))
    assert code == 2 and "another process" in err and "rerun" in err and "--overwrite" not in err
    assert (out / "0000-a-red-car.png").read_bytes() == b"the winner's image"


def test_long_stems_and_dotted_folders_in_batch_mode(capsys, sd15_dir, tmp_path):
    """15.11: output names from long input stems are shortened (with a hash) to fit the file system,
    and ``-o results.v2`` is a folder in batch mode."""
    contents = tmp_path / "contents"
    contents.mkdir()
    stems = ["c" * 200 + "1", "c" * 200 + "2"]  # each fits; content__style would be over 255 bytes
    for i, stem in enumerate(stems):
        bad.good_image(contents, f"{stem}.png", (40, 32), seed=i)
    style = bad.good_image(tmp_path, "s" * 120 + ".png", (32, 32), seed=9)
    out = tmp_path / "results.v2"
    code, err = _cli(capsys, ["stylize", contents, style, "--output-dir", out, "--model", sd15_dir, *FAST["stylize"]])
    assert code == 0, err
    names = sorted(p.name for p in out.glob("*.png"))
    assert len(names) == 2 and len(set(names)) == 2 and all(len(os.fsencode(n)) <= 255 for n in names)
    assert sorted(_manifest_outputs(out)) == names


def test_resuming_is_reported_once(capsys, caplog, sd15_dir, tmp_path):
    """15.13: the "resuming" line used to be printed by the check and again by the run."""
    out = tmp_path / "out"
    argv = _argv("compose", tmp_path, sd15_dir, out)
    assert _cli(capsys, argv)[0] == 0
    (out / "0001-a-blue-bird.png").unlink()
    caplog.clear()
    code, err = _cli(capsys, argv)
    assert code == 0, err
    assert [r.getMessage() for r in caplog.records].count("resuming: 2 of 3 jobs are already done in " + str(out)) == 1


@pytest.mark.parametrize("where", ["prompt file", "manifest"])
def test_deeply_nested_json_in_batch_files_exits_2(capsys, sd15_dir, tmp_path, where):
    """15.2: 100k nested brackets in a JSON-lines prompt file or a manifest were a RecursionError."""
    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir(), out.mkdir()
    bad.good_image(images, "cat.png", (40, 32))
    edits = tmp_path / "edits.jsonl"
    edits.write_text(
        bad.DEEP_JSON if where == "prompt file" else '{"image": "cat.png", "source_prompt": "a", "target_prompt": "b"}'
    )
    if where == "manifest":
        (out / "manifest.json").write_text(bad.DEEP_JSON)
    code, err = _cli(capsys, ["edit", images, "--prompts", edits, "--output-dir", out, "--model", sd15_dir])
    fragment = "nested too deeply" if where == "prompt file" else "not an editkit manifest"
    assert code == 2 and fragment in err and "Traceback" not in err, err[-2000:]
