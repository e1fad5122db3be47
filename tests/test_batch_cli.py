"""Batch modes of the CLI: interrupted runs resume with only the missing outputs, each output once.

Each command's batch is interrupted at its second output (a Ctrl-C during the save), re-run, and
checked: the interrupted save left nothing, the re-run wrote only what was missing, the manifest
lists every output once. One batch runs as two processes under ``accelerate launch``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import bad_inputs as bad
import pytest
from PIL import Image

from editkit.cli import main

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FAST = ["--steps", "1", "--size", "32", "--no-refine", "--device", "cpu"]
STYLIZE_FAST = ["--steps", "1", "--size", "32", "--device", "cpu"]


def _cli(capsys, argv) -> tuple[int, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def _manifest_outputs(folder: Path) -> list[str]:
    manifest = json.loads((folder / "manifest.json").read_text())
    names = []
    for entry in manifest["outputs"]:
        names += [entry["output"]] if isinstance(entry["output"], str) else entry["output"]
    return names


def _assert_clean(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if ".tmp" in p.name]


def test_compose_batch_resumes_after_ctrl_c(capsys, sd15_dir, tmp_path, saves):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# three prompts\na red car\n\na blue bird\na green tree on the left of a house\n")
    out = tmp_path / "out"
    argv = ["compose", "--prompts", prompts, "--output-dir", out, "--model", sd15_dir, *COMPOSE_FAST]
    saves.interrupt_at = 2
    code, err = _cli(capsys, argv)
    assert code == 130 and "interrupted" in err
    assert sorted(p.name for p in out.glob("*.png")) == ["0000-a-red-car.png"]
    _assert_clean(out)

    saves.interrupt_at = None
    code, err = _cli(capsys, argv)
    assert code == 0, err
    expected = ["0000-a-red-car.png", "0001-a-blue-bird.png", "0002-a-green-tree-on-the-left-of-a-house.png"]
    assert saves == [*expected[:2], *expected[1:]]  # the re-run wrote only the missing two
    assert sorted(p.name for p in out.glob("*.png")) == expected
    assert sorted(_manifest_outputs(out)) == expected  # each output once
    _assert_clean(out)

    code, err = _cli(capsys, argv)  # all done: nothing is redone
    assert code == 0 and len(saves) == 4
    code, err = _cli(capsys, [*argv, "--seed", "5"])  # other options: refused, not mixed
    assert code == 2 and "other options" in err


def test_compose_batch_mode_errors(capsys, sd15_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# nothing\n\n")
    base = ["compose", "--model", sd15_dir, *COMPOSE_FAST]
    assert "holds no prompts" in _cli(capsys, [*base, "--prompts", prompts, "--output-dir", tmp_path / "o"])[1]
    assert "not found" in _cli(capsys, [*base, "--prompts", tmp_path / "none.txt", "--output-dir", tmp_path])[1]
    code, err = _cli(capsys, [*base, "a car", "--output-dir", tmp_path / "o"])
    assert code == 2 and "batch mode takes" in err
    code, err = _cli(capsys, base)
    assert code == 2 and "give a PROMPT" in err


def test_stylize_batch_resumes_after_ctrl_c(capsys, sd15_dir, tmp_path, saves):
    contents, styles, out = tmp_path / "contents", tmp_path / "styles", tmp_path / "out"
    contents.mkdir(), styles.mkdir()
    for i in range(2):
        bad.good_image(contents, f"c{i}.png", (40, 32), seed=i)
        bad.good_image(styles, f"s{i}.png", (32, 32), seed=10 + i)
    argv = ["stylize", contents, styles, "--output-dir", out, "--model", sd15_dir, *STYLIZE_FAST]
    saves.interrupt_at = 2
    code, err = _cli(capsys, argv)
    assert code == 130 and "interrupted" in err
    assert sorted(p.name for p in out.glob("*.png")) == ["c0__s0.png"]
    _assert_clean(out)

    saves.interrupt_at = None
    code, err = _cli(capsys, argv)
    assert code == 0, err
    expected = ["c0__s0.png", "c0__s1.png", "c1__s0.png", "c1__s1.png"]
    assert saves == [*expected[:2], *expected[1:]]  # c0__s0 (written before the Ctrl-C) is not rewritten
    assert sorted(p.name for p in out.glob("*.png")) == expected
    assert sorted(_manifest_outputs(out)) == expected
    _assert_clean(out)


def test_stylize_batch_refuses_files_it_did_not_write(capsys, sd15_dir, tmp_path):
    contents, out = tmp_path / "contents", tmp_path / "out"
    contents.mkdir(), out.mkdir()
    for i in range(2):
        bad.good_image(contents, f"c{i}.png", (40, 32), seed=i)
    style = bad.good_image(tmp_path, "s.png", (32, 32), seed=3)
    (out / "c1__s.png").write_bytes(b"precious")
    code, err = _cli(capsys, ["stylize", contents, style, "--output-dir", out, "--model", sd15_dir, *STYLIZE_FAST])
    assert code == 2 and "not recorded" in err and "--overwrite" in err
    assert (out / "c1__s.png").read_bytes() == b"precious" and not (out / "c0__s.png").exists()


EDIT_FAST = ["--steps", "1", "--device", "cpu"]


def test_edit_batch_resumes_after_ctrl_c(capsys, sd15_dir, tmp_path, saves):
    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    for i in range(3):
        bad.good_image(images, f"p{i}.png", (80, 64), seed=i)
    argv = ["edit", images, "--source-prompt", "a cat", "--target-prompt", "a dog", "--output-dir", out]
    argv += ["--model", sd15_dir, *EDIT_FAST]
    saves.interrupt_at = 2
    code, err = _cli(capsys, argv)
    assert code == 130 and sorted(p.name for p in out.glob("*.png")) == ["p0.png"]
    _assert_clean(out)
    saves.interrupt_at = None
    code, err = _cli(capsys, argv)
    assert code == 0, err
    assert saves == ["p0.png", "p1.png", "p1.png", "p2.png"]
    assert sorted(_manifest_outputs(out)) == ["p0.png", "p1.png", "p2.png"]
    with Image.open(out / "p2.png") as edited:
        meta = json.loads(edited.text["editkit"])
    assert meta["image"] == str(images / "p2.png") and meta["target_prompt"] == "a dog"


def test_edit_batch_from_a_prompt_file(capsys, sd15_dir, tmp_path):
    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    bad.good_image(images, "cat.png", (80, 64))
    edits = tmp_path / "edits.jsonl"
    edits.write_text(
        '{"image": "cat.png", "source_prompt": "a cat", "target_prompt": "a dog"}\n\n'
        '{"image": "cat.png", "source_prompt": "a cat", "target_prompt": "a tiger"}\n'
    )
    base = ["edit", images, "--output-dir", out, "--model", sd15_dir, *EDIT_FAST]
    code, err = _cli(capsys, [*base, "--prompts", edits])
    assert code == 0, err
    assert sorted(_manifest_outputs(out)) == ["0000-cat.png", "0001-cat.png"]
    with Image.open(out / "0001-cat.png") as edited:
        assert json.loads(edited.text["editkit"])["target_prompt"] == "a tiger"
    edits.write_text('{"image": "cat.png", "source": "a cat"}\n')
    code, err = _cli(capsys, [*base, "--prompts", edits, "--overwrite"])
    assert code == 2 and "line 1: expected" in err
    code, err = _cli(capsys, [*base, "--prompts", edits, "--source-prompt", "a cat"])
    assert code == 2 and "leave out --source-prompt" in err
    code, err = _cli(capsys, ["edit", images / "cat.png", "--source-prompt", "a", "--target-prompt", "b"])
    assert code == 2 and "give -o FILE" in err


@pytest.mark.slow
def test_compose_batch_with_two_processes_writes_each_output_once(sd15_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"a red car number {i}\n" for i in range(5)))
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(ROOT / "editkit" / "cli.py"), "compose", "--prompts", str(prompts), "--output-dir", str(out),
        "--model", str(sd15_dir), *COMPOSE_FAST,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    names = _manifest_outputs(out)
    assert len(names) == 5 and len(set(names)) == 5  # each output exactly once
    assert sorted(p.name for p in out.glob("*.png")) == sorted(names)
    processes = {entry["process"] for entry in json.loads((out / "manifest.json").read_text())["outputs"]}
    assert processes == {0, 1}  # both processes worked
    assert not list(out.glob(".manifest.json.part-*"))
    _assert_clean(out)
