"""The shapes world's deterministic detector, now in :mod:`editkit.shapes.detect` (the library's
shapes verifier uses it, and ``editkit`` never imports ``benchmarks``); re-exported here."""

from editkit.shapes.detect import (  # noqa: F401
    MIN_AREA,
    SOLID_MAX_DARK,
    SQUARE_MIN,
    STRIPES_MIN_AGREEMENT,
    TRIANGLE_MAX,
    Detection,
    Palette,
    build_palette,
    classify_pixels,
    connected_components,
    detect,
    detect_background,
    detect_batch,
)
