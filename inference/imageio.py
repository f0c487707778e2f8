"""Reading ordinary image files (PNG, JPEG, TIFF; 8- and 16-bit) as 2-D grayscale arrays."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def read_grayscale(path: Path | str) -> np.ndarray:
    """A 2-D uint8/uint16 array; colour stored with R=G=B collapses exactly, true colour is
    converted to luminance. Raises ValueError for an unreadable or unsupported file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED | cv2.IMREAD_ANYDEPTH)
    if image is None:
        raise ValueError(f"{path}: not a readable image (PNG, JPEG or TIFF expected)")
    if image.ndim == 3:
        if image.shape[2] == 4:
            image = image[:, :, :3]
        if image.shape[2] == 1 or (
            np.array_equal(image[:, :, 0], image[:, :, 1])
            and np.array_equal(image[:, :, 1], image[:, :, 2])
        ):
            image = image[:, :, 0]
        else:
            image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    if image.ndim != 2:
        raise ValueError(f"{path}: unsupported image layout {image.shape}")
    return np.ascontiguousarray(image)
