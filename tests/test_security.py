"""No code path loads pickles or trusts remote code (issue: reliability and security)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import ClassVar

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("editkit", "pipelines", "benchmarks", "examples") for p in (ROOT / d).rglob("*.py")]
SOURCES += [ROOT / "app.py"] if (ROOT / "app.py").exists() else []

UNSAFE = {
    "torch.load": re.compile(r"\btorch\.load\s*\("),
    "pickle": re.compile(r"^\s*(import pickle|from pickle|import dill|import cloudpickle)|\bpickle\.loads?\s*\(", re.M),
    "trust_remote_code=True": re.compile(r"trust_remote_code\s*=\s*True"),
    "use_safetensors=False": re.compile(r"use_safetensors\s*=\s*False"),
    "weights_only=False": re.compile(r"weights_only\s*=\s*False"),
}


def test_sources_were_found():
    assert len(SOURCES) > 10


def test_no_unsafe_loading_in_the_code():
    offences = [
        f"{path.relative_to(ROOT)}: {name}"
        for path in SOURCES
        for name, pattern in UNSAFE.items()
        if pattern.search(path.read_text(encoding="utf-8"))
    ]
    assert offences == []


# -- every loader refuses pickles, even renamed .safetensors ---------------------------------------
class _Payload:
    """Unpickling this creates ``marker``: proof that a loader ran pickle code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _pickle_named_safetensors(folder: Path, name: str) -> tuple[Path, Path]:
    import pickle

    marker = folder / f"{name}.was-unpickled"
    path = folder / name
    path.write_bytes(pickle.dumps({"weights": _Payload(marker)}, protocol=4))
    return path, marker


def _torch_save_named_safetensors(folder: Path, name: str) -> tuple[Path, Path]:
    """What ``torch.save`` writes (a zip archive holding a pickle), named .safetensors."""
    import zipfile

    path = folder / name
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    return path, folder / f"{name}.was-unpickled"


def _loaders(sd15_pipe):
    import torch

    from editkit.models import load_pipeline
    from editkit.softrepa import SoftTokens, default_sites, load_soft_tokens
    from editkit.softrepa.checkpoint import load_checkpoint
    from editkit.style import StyleCache
    from pipelines.compose import ComposePipeline

    tokens = SoftTokens(torch.zeros(1, sd15_pipe.unet.config.cross_attention_dim), default_sites(sd15_pipe.unet))
    optimizer = torch.optim.SGD(tokens.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return {
        "soft tokens": lambda path: load_soft_tokens(path, unet=sd15_pipe.unet),
        "style cache": StyleCache.load,
        "single-file model": lambda path: load_pipeline(ComposePipeline, path, device="cpu"),
        "training checkpoint": lambda path: load_checkpoint(path, tokens, optimizer, scheduler, fingerprint={}),
    }


@pytest.mark.parametrize("writer", [_pickle_named_safetensors, _torch_save_named_safetensors])
@pytest.mark.parametrize("loader", ["soft tokens", "style cache", "single-file model", "training checkpoint"])
def test_pickles_named_safetensors_are_refused_unread(tmp_path, sd15_pipe, monkeypatch, loader, writer):
    import pickle

    import torch

    from editkit.errors import EditkitError

    def forbidden(*args, **kwargs):
        raise AssertionError("a loader tried to unpickle")

    for module, name in [(pickle, "load"), (pickle, "loads"), (torch, "load")]:
        monkeypatch.setattr(module, name, forbidden)
    path, marker = writer(tmp_path, "weights.safetensors")
    with pytest.raises(EditkitError) as caught:
        _loaders(sd15_pipe)[loader](path)
    assert "pickle" in str(caught.value) or "not a readable safetensors" in str(caught.value)
    assert not marker.exists()


def test_safetensors_headers_that_look_like_pickles_are_not_refused(tmp_path):
    """A safetensors header length of 0x0?80 begins like a pickle (0x80, protocol 2-5): still safetensors."""
    import torch
    from safetensors.torch import save_file

    from editkit.safefiles import is_pickle, looks_like_safetensors

    collisions = 0
    for pad in range(0, 1200, 8):
        path = tmp_path / f"t{pad}.safetensors"
        save_file({"w": torch.zeros(1)}, str(path), metadata={"pad": "x" * pad})
        head = path.read_bytes()[:2]
        collisions += head[0] == 0x80 and 2 <= head[1] <= 5
        assert looks_like_safetensors(path) and not is_pickle(path)
    assert collisions  # the loop met the pickle-like headers


# -- remote code and single files ------------------------------------------------------------------
class _Recorder:
    """A pipeline class that records how load_pipeline calls it (and fails, to stop there)."""

    calls: ClassVar[list] = []

    @classmethod
    def from_pretrained(cls, source, **kwargs):
        cls.calls.append(("from_pretrained", source, kwargs))
        raise OSError("recorded")

    @classmethod
    def from_single_file(cls, source, **kwargs):
        cls.calls.append(("from_single_file", source, kwargs))
        raise OSError("recorded")


def test_load_pipeline_asks_for_safetensors_and_no_remote_code(sd15_dir, tmp_path):
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES
    from safetensors.torch import save_file

    from editkit.errors import ModelLoadError
    from editkit.models import load_pipeline

    single = tmp_path / "model.safetensors"  # an SD 1.x key, so editkit recognises the family
    save_file({CHECKPOINT_KEY_NAMES["v1"]: __import__("torch").zeros(1)}, str(single))
    _Recorder.calls = []
    for source in (sd15_dir, single):
        with pytest.raises(ModelLoadError):
            load_pipeline(_Recorder, source, device="cpu")
    (folder_call, _, folder_kwargs), (file_call, _, file_kwargs) = _Recorder.calls
    assert folder_call == "from_pretrained" and folder_kwargs["use_safetensors"] is True
    assert file_call == "from_single_file"
    assert not folder_kwargs.get("trust_remote_code") and not file_kwargs.get("trust_remote_code")


@pytest.mark.parametrize("option", [{"trust_remote_code": True}, {"use_safetensors": False}])
def test_load_pipeline_refuses_remote_code_and_pickles(sd15_dir, option):
    from editkit.errors import InputError
    from editkit.models import load_pipeline

    _Recorder.calls = []
    with pytest.raises(InputError, match="never trusts remote code"):
        load_pipeline(_Recorder, sd15_dir, device="cpu", **option)
    assert _Recorder.calls == []  # refused before anything is read


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin", ".pkl"])
def test_single_file_checkpoints_only_as_safetensors(tmp_path, suffix):
    from editkit.errors import ModelLoadError
    from editkit.models import load_pipeline

    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"\x80\x04K\x01.")
    _Recorder.calls = []
    with pytest.raises(ModelLoadError, match=r"only \.safetensors"):
        load_pipeline(_Recorder, path, device="cpu")
    assert _Recorder.calls == []


def _calls(source: str, name: str) -> list[str]:
    """The argument text of every ``.name(...)`` call in ``source`` (balanced parentheses)."""
    found = []
    for match in re.finditer(rf"\.{name}\(", source):
        depth, index = 1, match.end()
        while depth and index < len(source):
            depth += {"(": 1, ")": -1}.get(source[index], 0)
            index += 1
        found.append(source[match.end() : index - 1])
    return found


def test_library_model_loads_ask_for_safetensors():
    """Every model (not tokenizer/processor) from_pretrained in editkit passes use_safetensors=True."""
    offences = []
    for path in (ROOT / "editkit").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"(\w+)\.from_pretrained\(", text):
            if re.search(r"processor|tokenizer", match.group(1), re.I):
                continue
            arguments = _calls(text[match.start() :], "from_pretrained")[0]
            if "use_safetensors=True" not in arguments:
                offences.append(f"{path.relative_to(ROOT)}: {match.group(0)}{arguments[:60]})")
    assert offences == []
