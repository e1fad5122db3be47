"""No code path loads pickles or trusts remote code (issue: reliability and security)."""

from __future__ import annotations

import re
from pathlib import Path

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
