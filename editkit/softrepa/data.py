"""Captioned image data for SoftREPA training: ``metadata.jsonl`` folders or CSV files, loaded lazily.

A folder holds images and a ``metadata.jsonl`` with one ``{"file_name": ..., "text": ...}`` object
per line (the Hugging Face ``imagefolder`` convention); a ``.csv`` file has ``file_name`` (or
``image``) and ``text`` (or ``caption``) columns, paths relative to the CSV's folder. Images are
read and resized only when a batch needs them; unreadable ones are skipped and counted.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from editkit.errors import EditkitError, InputError

__all__ = ["CaptionDataset", "CaptionRecord", "read_records", "split_records"]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_FILE = "metadata.jsonl"
FILE_KEYS = ("file_name", "image", "path")
TEXT_KEYS = ("text", "caption")


@dataclass(frozen=True)
class CaptionRecord:
    path: Path
    text: str


def _field(row: dict, keys: tuple[str, ...]) -> str:
    return next((str(row[key]) for key in keys if row.get(key) not in (None, "")), "").strip()


def _rows_from_jsonl(metadata: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise InputError(f"{metadata}:{number} is not a JSON object") from None
        if not isinstance(row, dict):
            raise InputError(f"{metadata}:{number} is not a JSON object")
        rows.append(row)
    return rows


def _rows_from_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def read_records(data: str | Path) -> tuple[list[CaptionRecord], dict[str, int]]:
    """Records of a data folder or CSV, and counts of what was skipped (missing files, empty captions)."""
    data = Path(data).expanduser()
    if not data.exists():
        raise InputError(f"data not found: {data}")
    if data.is_file():
        if data.suffix.lower() != ".csv":
            raise InputError(f"{data}: give a folder with {METADATA_FILE} or a .csv file of file_name,text")
        root, rows = data.parent, _rows_from_csv(data)
    else:
        root, metadata = data, data / METADATA_FILE
        if not metadata.is_file():
            images = [p for p in data.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
            if not images:
                raise InputError(f"{data} is empty: no images and no {METADATA_FILE}")
            raise InputError(f"{data}: {len(images)} images but no captions; add a {METADATA_FILE} of file_name,text")
        rows = _rows_from_jsonl(metadata)
    return _records(root, rows, data)


def _records(root: Path, rows: list[dict], source: Path) -> tuple[list[CaptionRecord], dict[str, int]]:
    records, skipped = [], {"missing_file": 0, "no_caption": 0}
    for row in rows:
        name, text = _field(row, FILE_KEYS), _field(row, TEXT_KEYS)
        path = root / name
        if not name or not path.is_file():
            skipped["missing_file"] += 1
        elif not text:
            skipped["no_caption"] += 1
        else:
            records.append(CaptionRecord(path, text))
    if skipped["missing_file"] or skipped["no_caption"]:
        logger.warning(
            "%s: skipped %d entries without an image file and %d without a caption",
            source,
            skipped["missing_file"],
            skipped["no_caption"],
        )
    if not records:
        raise InputError(f"{source}: no usable image-caption pairs (every entry lacks an image or a caption)")
    return records, skipped


def split_records(
    records: list[CaptionRecord], val_fraction: float, seed: int
) -> tuple[list[CaptionRecord], list[CaptionRecord]]:
    """A deterministic train/validation split (validation gets ``val_fraction``, none if fewer than 4 records)."""
    count = int(len(records) * val_fraction)
    if count < 2 or len(records) - count < 2:
        return list(records), []
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    val = sorted(order[:count])
    train = sorted(order[count:])
    return [records[i] for i in train], [records[i] for i in val]


@dataclass
class CaptionDataset:
    """Lazily loaded images (centre-cropped and resized to ``resolution``) with their captions.

    ``batch(start, size, order)`` takes the first ``size`` readable records from position
    ``start`` of the permutation ``order`` (wrapping around); unreadable images are skipped and
    counted in ``unreadable``.
    """

    records: list[CaptionRecord]
    resolution: int
    unreadable: set[int] = field(default_factory=set)

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int) -> torch.Tensor | None:
        """Image ``index`` as a ``(3, H, W)`` tensor in [-1, 1], or ``None`` if it cannot be read."""
        from editkit.image import load_image, pil_to_tensor

        if index in self.unreadable:
            return None
        try:
            image = load_image(self.records[index].path)
        except (EditkitError, OSError, ValueError) as error:
            logger.warning("skipping unreadable image %s: %s", self.records[index].path, error)
            self.unreadable.add(index)
            return None
        return pil_to_tensor(_center_square(image, self.resolution))[0]

    def batch(self, start: int, size: int, order: list[int]) -> tuple[torch.Tensor, list[str]]:
        """``size`` images ``(size, 3, H, W)`` and captions from ``order[start:]``, skipping unreadable ones."""
        images, captions = [], []
        for offset in range(len(order)):
            index = order[(start + offset) % len(order)]
            image = self.load(index)
            if image is not None:
                images.append(image)
                captions.append(self.records[index].text)
            if len(images) == size:
                return torch.stack(images), captions
        raise InputError(
            f"only {len(images)} readable images; a batch needs {size} (unreadable: {len(self.unreadable)})"
        )


def _center_square(image, resolution: int):
    from PIL import Image

    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    return image.resize((resolution, resolution), Image.Resampling.BICUBIC)
