"""Sample scenes for a run without a camera, made at run time from a public-domain photo.

The photo is scikit-image's ``astronaut()`` (Eileen Collins, a NASA portrait in the
public domain), which ships inside the installed package, so nothing is downloaded.
From it come scenes with one face each: the bare face, the same face with a surgical
style mask drawn over nose, mouth and chin, and both again smaller and off centre in a
640x480 frame, so a sample run has a few frames, masked and not.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np

from services.capture.detectors import Box, DetectorError, Res10Detector

logger = logging.getLogger(__name__)

# Where res10 finds the face in astronaut(); used if the detector cannot be loaded.
_FALLBACK_BOX: Box = (180, 58, 272, 177)

_MASK_BGR = (225, 190, 120)  # the light blue of surgical masks
_PLEAT_BGR = (190, 160, 95)
_EDGE_BGR = (250, 246, 240)  # the white binding round the edge
_LOOP_BGR = (244, 242, 238)


def astronaut_bgr() -> np.ndarray:
    """The astronaut photo as a BGR uint8 array (512 x 512)."""
    from skimage import data  # imported here: only the sample needs scikit-image

    return np.ascontiguousarray(cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR))


def find_face(image: np.ndarray) -> Box:
    """The most confident face box in ``image``, or the known astronaut box."""
    try:
        found = Res10Detector(score_threshold=0.5, min_face_px=32).detect(image)
    except DetectorError:
        found = []
    if not found:
        return _FALLBACK_BOX
    return max(found, key=lambda d: d.score).box


def draw_mask(image: np.ndarray, face: Box) -> np.ndarray:
    """A copy of ``image`` with a pleated surgical mask over the lower face of ``face``.

    Proportions follow a frontal face box: eyes near 37 % of its height, the mask's top
    edge a little under them on the nose bridge, its lower edge under the chin.
    """
    out = image.copy()
    x1, y1, x2, y2 = face
    w, h = x2 - x1, y2 - y1

    def pt(fx: float, fy: float) -> tuple[int, int]:
        return (int(round(x1 + fx * w)), int(round(y1 + fy * h)))

    # Outline: a straight-ish top on the nose, wide sides, rounded over the chin.
    outline = np.array(
        [pt(0.10, 0.52), pt(0.30, 0.44), pt(0.50, 0.42), pt(0.70, 0.44), pt(0.90, 0.52),
         pt(0.93, 0.75), pt(0.82, 0.92), pt(0.62, 1.02), pt(0.50, 1.04), pt(0.38, 1.02),
         pt(0.18, 0.92), pt(0.07, 0.75)],
        dtype=np.int32,
    )

    # Ear loops first, so the mask covers their ends.
    thickness = max(1, w // 45)
    for side, ear_x in ((0, -0.02), (1, 1.02)):
        top = outline[0] if side == 0 else outline[4]
        low = outline[11] if side == 0 else outline[5]
        ear_top, ear_low = pt(ear_x, 0.45), pt(ear_x, 0.66)
        cv2.line(out, tuple(top), ear_top, _LOOP_BGR, thickness, cv2.LINE_AA)
        cv2.line(out, tuple(low), ear_low, _LOOP_BGR, thickness, cv2.LINE_AA)
        cv2.line(out, ear_top, ear_low, _LOOP_BGR, thickness, cv2.LINE_AA)

    # The fabric, shaded darker towards the sides and bottom as a curved surface is.
    layer = np.zeros_like(out)
    cv2.fillPoly(layer, [outline], _MASK_BGR, cv2.LINE_AA)
    alpha = np.zeros(out.shape[:2], dtype=np.float32)
    cv2.fillPoly(alpha, [outline], 1.0, cv2.LINE_AA)
    yy, xx = np.mgrid[0 : out.shape[0], 0 : out.shape[1]].astype(np.float32)
    cx, cy = x1 + 0.5 * w, y1 + 0.62 * h
    falloff = ((xx - cx) / (0.55 * w)) ** 2 + ((yy - cy) / (0.6 * h)) ** 2
    shade = np.clip(1.05 - 0.25 * falloff, 0.7, 1.05)[..., None]
    fabric = np.clip(layer.astype(np.float32) * shade, 0, 255)
    a = alpha[..., None]
    out = (out.astype(np.float32) * (1 - a) + fabric * a).astype(np.uint8)

    # Three pleats across, and the white binding round the edge.
    for fy in (0.62, 0.74, 0.86):
        left, right = pt(0.10, fy), pt(0.90, fy)
        mid = pt(0.50, fy + 0.03)
        pleat = np.array([left, mid, right], dtype=np.int32)
        cv2.polylines(out, [pleat], False, _PLEAT_BGR, max(1, w // 40), cv2.LINE_AA)
    cv2.polylines(out, [outline], True, _EDGE_BGR, max(1, w // 35), cv2.LINE_AA)
    # A nose wire shows as a faint line along the top edge.
    cv2.polylines(out, [outline[:5]], False, (200, 200, 200), max(1, w // 60), cv2.LINE_AA)
    return out


def place_in_frame(
    image: np.ndarray, scale: float, origin: tuple[int, int], size: tuple[int, int] = (640, 480)
) -> np.ndarray:
    """``image`` scaled by ``scale`` with its top-left at ``origin`` on a grey wall."""
    width, height = size
    frame = np.full((height, width, 3), (96, 104, 110), dtype=np.uint8)
    small = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    ox, oy = origin
    h = min(small.shape[0], height - oy)
    w = min(small.shape[1], width - ox)
    frame[oy : oy + h, ox : ox + w] = small[:h, :w]
    return frame


def sample_scenes() -> dict[str, np.ndarray]:
    """The sample scenes by file stem, each with exactly one face."""
    bare = astronaut_bgr()
    masked = draw_mask(bare, find_face(bare))
    return {
        "01-astronaut-bare": bare,
        "02-astronaut-mask": masked,
        "03-astronaut-mask-left": place_in_frame(masked, 0.7, (20, 60)),
        "04-astronaut-bare-right": place_in_frame(bare, 0.8, (260, 40)),
        "05-astronaut-mask-right": place_in_frame(masked, 0.9, (180, 0)),
    }


def write_sample_images(folder: Path) -> list[Path]:
    """Write the sample scenes into ``folder`` as JPEG files; returns their paths, sorted."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, image in sample_scenes().items():
        path = folder / f"{stem}.jpg"
        if not cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, 92]):
            raise OSError(f"cannot write sample image {path}")
        paths.append(path)
    logger.info("wrote %d sample scenes to %s", len(paths), folder)
    return sorted(paths)
