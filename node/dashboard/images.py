"""Summary pages (RGB Secondary Capture objects) as PNG images for the browser."""

from __future__ import annotations

import io
from functools import lru_cache
from pathlib import Path

from PIL import Image
from pydicom import dcmread

__all__ = ["summary_png"]


@lru_cache(maxsize=32)
def _png(path: str, modified: int, size: int) -> bytes:
    dataset = dcmread(path)
    pixels = dataset.pixel_array
    if pixels.ndim == 2 and pixels.dtype != "uint8":
        span = max(int(pixels.max()) - int(pixels.min()), 1)
        pixels = ((pixels - pixels.min()) * (255.0 / span)).astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def summary_png(path: Path) -> bytes:
    """The first frame of a Secondary Capture file as PNG bytes (cached while the file is unchanged).

    Raises
    ------
    OSError, ValueError
        The file cannot be read or its pixel data decoded.
    """
    stat = Path(path).stat()
    return _png(str(path), stat.st_mtime_ns, stat.st_size)
