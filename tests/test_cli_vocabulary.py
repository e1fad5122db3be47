"""The CLI's help, vocabulary and fail-fast behaviour, and the import rule (issue 20)."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from editkit.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def _parsers(parser: argparse.ArgumentParser, name: str = "editkit"):
    """(name, parser) for the parser and every subcommand below it."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def test_every_flag_has_help_that_shows_its_default():
    for name, parser in _parsers(build_parser()):
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            where = f"{name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help, f"{where} has no help"
            default = action.default
            if default is None or default is argparse.SUPPRESS or isinstance(default, bool) or default in ("", []):
                continue  # nothing to show (store_true flags are off by default)
            rendered = formatter._get_help_string(action) % {**vars(action), "default": default}
            assert str(default) in rendered, f"{where}: default {default!r} not shown in {rendered!r}"


def test_help_never_wraps_inside_a_flag(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")
    for name, _ in _parsers(build_parser()):
        with pytest.raises(SystemExit):
            main([*name.split()[1:], "--help"])
        lines = capsys.readouterr().out.splitlines()
        for line, following in zip(lines, [*lines[1:], ""]):
            broken = re.search(r"(^|\s)-{1,2}[\w-]*-$", line.rstrip())  # a flag cut at one of its hyphens
            assert not broken, f"{name} --help wraps a flag: {line!r} / {following!r}"


def test_readme_defaults_table_is_generated_from_the_options():
    from editkit.tasks import readme_defaults_table

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = re.search(r"<!-- defaults:start[^>]*-->\n(.*?)\n<!-- defaults:end -->", readme, re.S).group(1)
    assert table == readme_defaults_table()


def test_cli_defaults_are_the_option_defaults():
    from editkit.tasks import ComposeOptions, EditOptions, GenerateOptions, StylizeOptions

    cases = {
        "stylize": (StylizeOptions, ["c.png", "s.png", "-o", "o.png"]),
        "edit": (EditOptions, ["i.png", "-o", "o.png"]),
        "compose": (ComposeOptions, ["a cat", "-o", "o.png"]),
        "softrepa generate": (GenerateOptions, ["a cat", "-o", "o.png"]),
    }
    for command, (options, argv) in cases.items():
        args = build_parser().parse_args([*command.split(), *argv])
        for field in ("num_inference_steps", "seed", "size", "guidance_scale", "gamma", "tau"):
            if hasattr(options, field) and hasattr(args, field):
                assert getattr(args, field) == getattr(options, field), (command, field)


@pytest.fixture
def no_model(monkeypatch):
    """Any model load fails the test: the checks must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("editkit.models.load_pipeline", refuse)


def _run(capsys, argv) -> tuple[int, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def test_a_bad_output_extension_fails_before_any_model_load(no_model, tmp_path, capsys):
    image = tmp_path / "in.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    for argv in (
        ["compose", "a red car", "-o", tmp_path / "c5.txt"],
        ["stylize", image, image, "-o", tmp_path / "s.txt"],
        ["edit", image, "--source-prompt", "a", "--target-prompt", "b", "-o", tmp_path / "e.txt"],
        ["softrepa", "generate", "a car", "--soft-tokens", image, "-o", tmp_path / "g.txt"],
    ):
        code, err = _run(capsys, argv)
        assert code == 2 and "cannot write" in err and ".png" in err, (argv, err)


def test_a_flag_typo_gets_did_you_mean_and_the_subcommands_usage(no_model, capsys):
    code, err = _run(capsys, ["stylize", "c.png", "s.png", "-o", "o.png", "--stpes", "3"])
    assert code == 2 and "did you mean --steps?" in err and err.startswith("usage: editkit stylize")
    code, err = _run(capsys, ["edit", "i.png", "--iterations", "3"])
    assert code == 2 and "renamed: use --steps" in err and err.startswith("usage: editkit edit")
    code, err = _run(capsys, ["softrepa", "train", "--data", "d", "-o", "t.safetensors", "--max-stpes", "3"])
    assert code == 2 and "did you mean --max-steps?" in err and "usage: editkit softrepa train" in err


def test_debug_works_after_the_subcommand(no_model, tmp_path, capsys):
    args = build_parser().parse_args(["stylize", "c.png", "s.png", "-o", "o.png", "--debug"])
    assert args.debug is True
    args = build_parser().parse_args(["--debug", "stylize", "c.png", "s.png", "-o", "o.png"])
    assert args.debug is True  # the subcommand's own --debug does not reset it
    with pytest.raises(AssertionError, match="a model was loaded"):  # --debug: the traceback, not one line
        main(["compose", "a car", "-o", str(tmp_path / "x.png"), "--debug"])


def test_stylize_given_a_text_says_it_takes_image_paths(no_model, tmp_path, capsys):
    style = tmp_path / "style.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(style)
    code, err = _run(capsys, ["stylize", "a cat", style, "-o", tmp_path / "o.png"])
    assert code == 2 and "'a cat' is not an image file; stylize takes two image paths" in err


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed")
@pytest.mark.parametrize(
    ("path", "source", "banned"),
    [
        ("editkit/commands/stylize.py", "from pipelines.style_transfer import StyleTransferPipeline", True),
        ("editkit/commands/stylize.py", "import editkit.app.handlers", True),
        ("editkit/commands/stylize.py", "from editkit.tasks import stylize", False),
        ("editkit/commands/app.py", "from editkit.app import build_demo", False),  # the one launcher
        ("editkit/app/handlers.py", "from editkit.commands.common import add_knob", True),
        ("editkit/app/handlers.py", "from pipelines.compose import ComposePipeline", True),
        ("editkit/tasks/loading.py", "from pipelines.compose import ComposePipeline", False),
        ("editkit/tasks/loading.py", "from editkit.app.models import ModelManager", True),
        ("editkit/style.py", "from pipelines.compose import ComposePipeline", True),
    ],
)
def test_the_import_rule_is_enforced_by_ruff(path, source, banned):
    check = subprocess.run(
        ["ruff", "check", "--no-cache", "--select", "TID251", "--stdin-filename", path, "-"],
        input=f"{source}\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert ("TID251" in check.stdout) == banned, check.stdout
