"""Tests for editkit.image: every PIL mode, broken files, the pixel guard, masks, sizes, atomic saves."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile, PngImagePlugin

from editkit import image as image_module
from editkit.errors import EditkitError, InputError
from editkit.image import (
    atomic_write,
    fit_size,
    load_image,
    load_mask,
    mask_coverage,
    pil_to_tensor,
    resize_to,
    save_image,
    tensor_to_pil,
)


def _gradient(width: int = 64, height: int = 48) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], -1).astype(np.uint8))


def _save(image: Image.Image, path: Path, **options) -> Path:
    image.save(path, **options)
    return path


def _header(path: Path) -> tuple[str, tuple[int, int]]:
    """Mode and size as stored in the file (no orientation or conversion)."""
    with Image.open(path) as image:
        return image.mode, image.size


def _pixel(image: Image.Image, xy: tuple[int, int] = (0, 0)) -> tuple[int, ...]:
    return image.getpixel(xy)


# ----------------------------------------------------------------------------- modes


def test_errors_hierarchy() -> None:
    assert issubclass(InputError, EditkitError)
    assert issubclass(InputError, ValueError)


def test_rgb_png_round_trip(tmp_path: Path) -> None:
    source = _gradient()
    loaded = load_image(_save(source, tmp_path / "rgb.png"))
    assert loaded.mode == "RGB" and loaded.size == (64, 48)
    assert np.array_equal(np.asarray(loaded), np.asarray(source))


def test_accepts_str_path_and_pil_image(tmp_path: Path) -> None:
    path = _save(_gradient(), tmp_path / "rgb.png")
    assert load_image(str(path)).size == (64, 48)
    assert load_image(Image.new("L", (16, 16), 7)).mode == "RGB"


def test_rgba_composited_on_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (16, 16), (255, 0, 0, 0))
    rgba.putpixel((1, 1), (255, 0, 0, 255))
    loaded = load_image(_save(rgba, tmp_path / "rgba.png"))
    assert _pixel(loaded) == (255, 255, 255)
    assert _pixel(loaded, (1, 1)) == (255, 0, 0)


def test_la_composited_on_white(tmp_path: Path) -> None:
    la = Image.new("LA", (16, 16), (0, 128))
    loaded = load_image(_save(la, tmp_path / "la.png"))
    assert loaded.mode == "RGB"
    assert _pixel(loaded)[0] in (127, 128)


def test_palette_with_transparency(tmp_path: Path) -> None:
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((2, 2), 1)
    path = _save(palette, tmp_path / "p.png", transparency=0)
    loaded = load_image(path)
    assert _pixel(loaded) == (255, 255, 255)  # transparent index over white
    assert _pixel(loaded, (2, 2)) == (0, 255, 0)


def test_palette_without_transparency(tmp_path: Path) -> None:
    palette = _gradient().convert("P")
    assert load_image(_save(palette, tmp_path / "p.gif")).mode == "RGB"


def test_cmyk_jpeg(tmp_path: Path) -> None:
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # red
    path = _save(cmyk, tmp_path / "cmyk.jpg", quality=95)
    assert _header(path)[0] == "CMYK"
    red, green, blue = _pixel(load_image(path))
    assert red > 240 and green < 15 and blue < 15


def test_16bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.full((16, 16), 65535, dtype=np.uint16)
    values[0, 0] = 32896  # 128 * 257
    values[0, 1] = 0
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    loaded = load_image(_save(image, tmp_path / "g16.png"))
    assert _pixel(loaded, (0, 0)) == (128, 128, 128)
    assert _pixel(loaded, (1, 0)) == (0, 0, 0)
    assert _pixel(loaded, (2, 0)) == (255, 255, 255)


def test_16bit_big_endian_and_32bit_int_modes() -> None:
    big_endian = Image.new("I;16B", (16, 16), 65535)
    assert _pixel(load_image(big_endian)) == (255, 255, 255)
    int32 = Image.fromarray(np.full((16, 16), 32896, dtype=np.int32))
    assert _pixel(load_image(int32)) == (128, 128, 128)
    with pytest.warns(UserWarning, match="stretched"):
        stretched = load_image(Image.fromarray(np.arange(-128, 128, dtype=np.int32).reshape(16, 16)))
    assert _pixel(stretched) == (0, 0, 0) and _pixel(stretched, (15, 15)) == (255, 255, 255)


def test_float_mode() -> None:
    values = np.full((16, 16), 0.5, dtype=np.float32)
    assert _pixel(load_image(Image.fromarray(values))) == (128, 128, 128)


@pytest.mark.parametrize("mode", ["L", "1"])
def test_gray_and_bilevel(tmp_path: Path, mode: str) -> None:
    image = Image.new(mode, (16, 16), 255 if mode == "L" else 1)
    assert _pixel(load_image(_save(image, tmp_path / f"{mode}.png"))) == (255, 255, 255)


def test_animated_gif_first_frame_with_warning(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (16, 16), color) for color in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    with pytest.warns(UserWarning, match="2 frames; using the first"):
        loaded = load_image(path)
    red, _, blue = _pixel(loaded)
    assert red > 200 and blue < 50


def test_exif_orientation_applied(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    path = _save(_gradient(64, 32), tmp_path / "rotated.jpg", exif=exif.tobytes())
    assert _header(path)[1] == (64, 32)
    assert load_image(path).size == (32, 64)


@pytest.mark.parametrize("size", [(9, 13), (17, 8), (511, 257)])
def test_odd_sizes_kept(size: tuple[int, int]) -> None:
    assert load_image(Image.new("RGB", size)).size == size


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("size", [(7, 100), (100, 4), (8, 600)])
def test_degenerate_sizes_refused(size: tuple[int, int]) -> None:
    with pytest.raises(InputError, match=f"degenerate size {size[0]}x{size[1]}"):
        load_image(Image.new("RGB", size))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        load_image(tmp_path / "nope.png")


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="is a directory"):
        load_image(tmp_path)


def test_zero_byte_file(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(InputError, match=r"empty \(0 bytes\)"):
        load_image(tmp_path / "empty.png")


def test_text_file_named_png(tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("definitely not an image\n")
    with pytest.raises(InputError, match="not an image"):
        load_image(tmp_path / "notes.png")


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_file(tmp_path: Path, suffix: str) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    full = _save(Image.fromarray(noise), tmp_path / f"full{suffix}")
    data = full.read_bytes()
    truncated = tmp_path / f"truncated{suffix}"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated or corrupt"):
        load_image(truncated)


def test_pixel_limit_checked_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(_gradient(64, 48), tmp_path / "big.png")

    def refuse_decode(self: Image.Image) -> None:
        raise AssertionError("decoded before the pixel check")

    monkeypatch.setattr(Image.Image, "load", refuse_decode)
    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse_decode)
    with pytest.raises(InputError, match="3072 pixels, over the limit of 1000"):
        load_image(path, max_pixels=1000)


def test_pil_decompression_bomb_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(_gradient(64, 48), tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # warning zone (> 1000, < 2000 is error zone)
    with pytest.raises(InputError, match="decompression-bomb"):
        load_image(path)
    assert Image.MAX_IMAGE_PIXELS == 1000  # only the monkeypatch changed it


# ----------------------------------------------------------------------------- masks


def test_mask_binary_same_size_no_warning(tmp_path: Path, recwarn: pytest.WarningsRecorder) -> None:
    mask = Image.new("L", (32, 16), 0)
    mask.paste(255, (0, 0, 16, 16))
    tensor = load_mask(_save(mask, tmp_path / "m.png"), (32, 16))
    assert tensor.shape == (1, 1, 16, 32) and tensor.dtype == torch.float32
    assert set(tensor.unique().tolist()) == {0.0, 1.0}
    assert mask_coverage(tensor) == pytest.approx(0.5)
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


def test_mask_resized_and_thresholded_with_warnings() -> None:
    gray = Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.float32), (64, 1)).astype(np.uint8))
    with pytest.warns(UserWarning) as record:
        tensor = load_mask(gray, (32, 16), threshold=0.5)
    messages = " ".join(str(w.message) for w in record)
    assert "not binary" in messages and "resized to 32x16" in messages
    assert tensor.shape == (1, 1, 16, 32)
    assert tensor[0, 0, :, 0].eq(0).all() and tensor[0, 0, :, -1].eq(1).all()
    assert set(tensor.unique().tolist()) <= {0.0, 1.0}


def test_mask_uses_alpha_channel() -> None:
    rgba = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    rgba.paste((0, 0, 0, 255), (0, 0, 8, 16))
    tensor = load_mask(rgba, (16, 16))
    assert mask_coverage(tensor) == pytest.approx(0.5)


def test_mask_opaque_rgba_uses_luminance() -> None:
    rgba = Image.new("RGBA", (16, 16), (255, 255, 255, 255))
    rgba.paste((0, 0, 0, 255), (0, 0, 16, 4))
    assert mask_coverage(load_mask(rgba, (16, 16))) == pytest.approx(0.75)


def test_empty_mask_is_returned() -> None:
    tensor = load_mask(Image.new("L", (16, 16), 0), (16, 16))
    assert mask_coverage(tensor) == 0.0


def test_mask_bad_threshold() -> None:
    with pytest.raises(InputError, match="threshold"):
        load_mask(Image.new("L", (16, 16)), (16, 16), threshold=0)


# ----------------------------------------------------------------------------- sizes and tensors


def test_fit_size_examples() -> None:
    assert fit_size(513, 769) == (512, 768)
    assert fit_size(1024, 768, target=512) == (512, 384)
    assert fit_size(768, 1024, max_side=512) == (384, 512)
    assert fit_size(4000, 3000, target=1024, max_side=512) == (512, 384)
    assert fit_size(3, 900, target=512) == (8, 512)  # never below one multiple
    assert fit_size(100, 100, max_side=100) == (96, 96)  # rounding never exceeds max_side
    with pytest.raises(InputError):
        fit_size(0, 10)


@settings(max_examples=200, deadline=None, database=None)
@given(
    width=st.integers(1, 8000),
    height=st.integers(1, 8000),
    multiple=st.sampled_from([1, 8, 16, 64]),
    target=st.one_of(st.none(), st.integers(64, 2048)),
    max_side=st.one_of(st.none(), st.integers(64, 2048)),
)
def test_fit_size_properties(width: int, height: int, multiple: int, target: int | None, max_side: int | None) -> None:
    out_width, out_height = fit_size(width, height, multiple=multiple, target=target, max_side=max_side)
    assert out_width % multiple == 0 and out_height % multiple == 0
    assert out_width >= multiple and out_height >= multiple
    if max_side is not None:
        assert max(out_width, out_height) <= max_side
    if target is not None and max_side is None:
        assert abs(max(out_width, out_height) - target) <= multiple / 2
    longer = max(width, height)
    scale = min(target / longer if target else 1.0, max_side / longer if max_side else math.inf)
    # Each side moves by at most one multiple from its exact scaled length (rounding and max_side clamp),
    # unless raised to the one-multiple minimum.
    for exact, out in ((width * scale, out_width), (height * scale, out_height)):
        assert abs(out - exact) <= multiple or out == multiple
    short = min(width, height) * scale
    if short >= 8 * multiple:
        ratio_error = abs(math.log((out_width / out_height) / (width / height)))
        assert ratio_error <= 2 * math.log1p(multiple / (short - multiple))


def test_resize_to() -> None:
    image = _gradient(64, 48)
    assert resize_to(image, (32, 24)).size == (32, 24)
    assert resize_to(image, (64, 48)) is image


def test_tensor_round_trip_is_exact() -> None:
    images = [_gradient(), _gradient().transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    tensor = pil_to_tensor(images)
    assert tensor.shape == (2, 3, 48, 64) and tensor.dtype == torch.float32
    assert tensor.min() >= -1 and tensor.max() <= 1
    back = tensor_to_pil(tensor)
    for original, restored in zip(images, back):
        assert np.array_equal(np.asarray(original), np.asarray(restored))
    assert pil_to_tensor(images[0], dtype=torch.float16).dtype == torch.float16


def test_tensor_to_pil_clamps_and_rounds() -> None:
    tensor = torch.tensor([-3.0, 3.0, 0.0, 0.6 / 127.5 - 1.0]).reshape(1, 1, 1, 4).repeat(1, 3, 8, 1)
    (image,) = tensor_to_pil(tensor)
    assert [image.getpixel((x, 0))[0] for x in range(4)] == [0, 255, 128, 1]
    (gray,) = tensor_to_pil(torch.zeros(1, 8, 8))
    assert gray.mode == "L"


def test_pil_to_tensor_refuses_mixed_sizes() -> None:
    with pytest.raises(InputError, match="one size"):
        pil_to_tensor([_gradient(64, 48), _gradient(48, 64)])


# ----------------------------------------------------------------------------- saving


def test_save_png_metadata_round_trip(tmp_path: Path) -> None:
    metadata = {"prompt": "a cat, ünïcode", "seed": "42"}
    path = save_image(_gradient(), tmp_path / "out" / "nested" / "a.png", metadata=metadata)
    assert path.exists()
    with Image.open(path) as saved:
        assert {key: saved.text[key] for key in metadata} == metadata
    assert not list(path.parent.glob(".*"))  # no temporary file left


@pytest.mark.parametrize("suffix", [".jpg", ".jpeg", ".webp"])
def test_save_other_formats(tmp_path: Path, suffix: str) -> None:
    rgba = _gradient().convert("RGBA")
    path = save_image(rgba, tmp_path / f"a{suffix}")
    with Image.open(path) as saved:
        assert saved.format == image_module.SAVE_FORMATS[suffix]
    with pytest.warns(UserWarning, match="PNG files only"):
        save_image(rgba, tmp_path / f"b{suffix}", metadata={"a": "b"})


def test_save_refuses_existing_unless_overwrite(tmp_path: Path) -> None:
    path = save_image(_gradient(), tmp_path / "a.png")
    before = path.read_bytes()
    with pytest.raises(InputError, match="exists; pass --overwrite"):
        save_image(Image.new("RGB", (16, 16)), path)
    assert path.read_bytes() == before
    save_image(Image.new("RGB", (16, 16)), path, overwrite=True)
    assert _header(path)[1] == (16, 16)


def test_saved_file_mode_follows_umask(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        path = save_image(_gradient(), tmp_path / "a.png")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644


def test_save_unknown_extension(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"\.png, \.jpg or \.webp"):
        save_image(_gradient(), tmp_path / "a.bmp")


def test_save_into_a_file_as_folder(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="cannot create the output folder"):
        save_image(_gradient(), tmp_path / "file" / "a.png")


@pytest.mark.parametrize("failure", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failed_write_leaves_nothing(tmp_path: Path, failure: BaseException) -> None:
    def half_write_then_fail(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        raise failure

    with pytest.raises(type(failure)):
        atomic_write(tmp_path / "a.safetensors", half_write_then_fail)
    assert list(tmp_path.iterdir()) == []


def test_failed_image_save_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(self: Image.Image, fp, *args, **kwargs) -> None:
        Path(fp).write_bytes(b"partial")
        raise OSError("encoder crashed")

    monkeypatch.setattr(Image.Image, "save", explode)
    with pytest.raises(OSError, match="encoder crashed"):
        save_image(Image.new("RGB", (16, 16)), tmp_path / "a.png")
    assert list(tmp_path.iterdir()) == []


def test_disk_full_is_an_input_error(tmp_path: Path) -> None:
    def disk_full(tmp: Path) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(InputError, match="no space left"):
        atomic_write(tmp_path / "a.bin", disk_full)
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_with_a_pnginfo_writer(tmp_path: Path) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("k", "v")
    path = atomic_write(tmp_path / "x.png", lambda tmp: _gradient().save(tmp, pnginfo=info))
    with Image.open(path) as saved:
        assert saved.text["k"] == "v"
