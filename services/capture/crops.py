"""Face crops and context photos, cut the way the classifier was trained.

The crop grows the detector's box by ``margin`` of its width and height on each side
and is clipped to the frame, the same rule as ``training/data.py:crop_face`` (the margin
travels in the model's metadata as ``face_margin``).
"""

from __future__ import annotations

import cv2
import numpy as np

from services.capture.detectors import Box

CROP_JPEG_QUALITY = 90
CONTEXT_JPEG_QUALITY = 85
CONTEXT_MAX_SIDE_PX = 960


class EncodeError(RuntimeError):
    """OpenCV could not encode an image as JPEG."""


def margin_box(box: Box, margin: float, width: int, height: int) -> Box:
    """``box`` grown by ``margin`` of its size on each side, clipped to the frame."""
    x1, y1, x2, y2 = box
    dx, dy = (x2 - x1) * margin, (y2 - y1) * margin
    left, top = max(0, int(round(x1 - dx))), max(0, int(round(y1 - dy)))
    right, bottom = min(width, int(round(x2 + dx))), min(height, int(round(y2 + dy)))
    return (left, top, max(right, left + 1), max(bottom, top + 1))


def crop_face(frame: np.ndarray, box: Box, margin: float) -> np.ndarray:
    """The face with its margin, as a view into ``frame`` (no copy)."""
    height, width = frame.shape[:2]
    x1, y1, x2, y2 = margin_box(box, margin, width, height)
    return frame[y1:y2, x1:x2]


def jpeg(image: np.ndarray, quality: int = CROP_JPEG_QUALITY) -> bytes:
    """Encode a BGR image as JPEG bytes."""
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise EncodeError(f"cannot encode a {image.shape} image as JPEG")
    return data.tobytes()


def context_photo(
    frame: np.ndarray, max_side_px: int = CONTEXT_MAX_SIDE_PX
) -> tuple[np.ndarray, float]:
    """The frame scaled down so its long side is at most ``max_side_px``, and the scale."""
    height, width = frame.shape[:2]
    scale = min(1.0, max_side_px / max(height, width))
    if scale >= 1.0:
        return frame, 1.0
    size = (max(1, int(round(width * scale))), max(1, int(round(height * scale))))
    return cv2.resize(frame, size, interpolation=cv2.INTER_AREA), scale


def scale_box(box: Box, scale: float, width: int, height: int) -> Box:
    """A frame box in the pixels of a copy scaled by ``scale`` (width x height)."""
    x1 = min(int(box[0] * scale), width - 1)
    y1 = min(int(box[1] * scale), height - 1)
    x2 = min(max(int(round(box[2] * scale)), x1 + 1), width)
    y2 = min(max(int(round(box[3] * scale)), y1 + 1), height)
    return (x1, y1, x2, y2)
