"""Figure checks shared by the tests: a figure file must decode as a PNG of a plausible size and show
something (a blank or single-colour canvas is what a plot that drew nothing, or crashed half-way into a
try/except, leaves behind)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from matplotlib import image as mpimg


def assert_figure(source: str | Path | bytes, min_width: int = 100, min_height: int = 100) -> np.ndarray:
    """Decode `source` (a PNG path or its bytes) and check its pixel size and that it is not blank: at least
    three distinct colours (background, axes, data) and a non-trivial spread of pixel values. Returns the
    pixels (height, width, channels), floats in [0, 1]."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{source!s:.200}: not a PNG"
    pixels = mpimg.imread(io.BytesIO(data), format="png")
    height, width = pixels.shape[:2]
    assert width >= min_width and height >= min_height, f"{source!s:.200}: {width}x{height} pixels"
    flat = pixels.reshape(height * width, -1)
    colours = len(np.unique(flat, axis=0))
    assert colours >= 3, f"{source!s:.200}: blank figure ({colours} distinct colour(s))"
    assert float(flat[:, :3].std()) > 0.01, f"{source!s:.200}: nearly uniform pixels"
    return pixels
