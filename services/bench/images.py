"""Images for the benchmarks: face crops, context photos and camera frames.

From the shared data sets when they are there (real faces: chandrikadeb7 crops, ilc2021
and andrewmvd street photos), else from the bundled sample scenes, so ``--quick`` runs
anywhere. Crops are re-encoded to about the size a capture node sends (~20 kB JPEG at
quality 90); context photos are 640x480 frames at quality 85, as capture sends them.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from maskmesh.settings import REPO_ROOT

logger = logging.getLogger(__name__)

CROP_JPEG_QUALITY = 90
CONTEXT_JPEG_QUALITY = 85
TARGET_CROP_BYTES = 20_000
_EXTENSIONS = (".jpg", ".jpeg", ".png")


def shared_dir() -> Path:
    """``$MASKMESH_SHARED``, else ``../shared`` beside the repository."""
    value = os.environ.get("MASKMESH_SHARED")
    return Path(value) if value else REPO_ROOT.parent / "shared"


def _images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in _EXTENSIONS)


def _encode(image: np.ndarray, quality: int) -> bytes:
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError(f"cannot encode a {image.shape} image")
    return data.tobytes()


def decode_jpeg(data: bytes) -> np.ndarray:
    """A JPEG as a BGR array; raises if OpenCV cannot read it."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError("not a readable JPEG")
    return image


def cover(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """``image`` scaled to cover width x height and centre-cropped to it."""
    h, w = image.shape[:2]
    scale = max(width / w, height / h)
    size = (max(width, int(round(w * scale))), max(height, int(round(h * scale))))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    big = cv2.resize(image, size, interpolation=interp)
    x0, y0 = (big.shape[1] - width) // 2, (big.shape[0] - height) // 2
    return np.ascontiguousarray(big[y0:y0 + height, x0:x0 + width])


def crop_jpeg(image: np.ndarray, target_bytes: int = TARGET_CROP_BYTES) -> bytes:
    """A face crop re-encoded at quality 90, scaled so that it is about target_bytes."""
    side = 200
    data = b""
    for _ in range(3):
        h, w = image.shape[:2]
        scale = side / max(h, w)
        size = (max(16, int(round(w * scale))), max(16, int(round(h * scale))))
        data = _encode(cv2.resize(image, size, interpolation=cv2.INTER_AREA),
                       CROP_JPEG_QUALITY)
        if abs(len(data) - target_bytes) < 0.15 * target_bytes:
            break
        side = int(min(640, max(64, side * (target_bytes / len(data)) ** 0.5)))
    return data


@dataclass(frozen=True)
class FaceImages:
    """Encoded crops and context photos, and where they came from."""

    crops: list[bytes]
    contexts: list[bytes]
    source: str

    @property
    def mean_crop_bytes(self) -> float:
        return sum(map(len, self.crops)) / max(1, len(self.crops))

    @property
    def mean_context_bytes(self) -> float:
        return sum(map(len, self.contexts)) / max(1, len(self.contexts))


def _sample_scenes() -> list[np.ndarray]:
    from services.capture.sample import sample_scenes

    return list(sample_scenes().values())


def face_images(count: int, seed: int = 0) -> FaceImages:
    """``count`` crops (mixed masked and bare) and as many 640x480 context photos."""
    rng = random.Random(seed)
    shared = shared_dir() / "datasets"
    crops_src = _images(shared / "chandrikadeb7")
    scenes_src = _images(shared / "ilc2021" / "images") or _images(shared / "andrewmvd")
    crops: list[bytes] = []
    contexts: list[bytes] = []
    if crops_src and scenes_src:
        for path in rng.sample(crops_src, min(count, len(crops_src))):
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is not None:
                crops.append(crop_jpeg(image))
        for path in rng.sample(scenes_src, min(count, len(scenes_src))):
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is not None:
                contexts.append(_encode(cover(image, 640, 480), CONTEXT_JPEG_QUALITY))
        source = f"{shared} (chandrikadeb7 crops, ilc2021 scenes)"
    if not crops or not contexts:
        scenes = _sample_scenes()
        base = scenes[0]
        for i in range(count):
            shifted = np.roll(base, (i * 7) % 40, axis=1)
            crops.append(crop_jpeg(shifted[40:300, 120:340]))
            contexts.append(_encode(cover(scenes[i % len(scenes)], 640, 480),
                                    CONTEXT_JPEG_QUALITY))
        source = "bundled sample scenes (shared data not found)"
    return FaceImages(crops, contexts, source)


def frames(width: int, height: int, count: int, seed: int = 0) -> tuple[list[np.ndarray], str]:
    """``count`` street scenes with faces at width x height, and where they came from."""
    rng = random.Random(seed)
    shared = shared_dir() / "datasets"
    paths = _images(shared / "andrewmvd" / "images") + _images(shared / "ilc2021" / "images")
    out: list[np.ndarray] = []
    for path in rng.sample(paths, min(count, len(paths))):
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is not None:
            out.append(cover(image, width, height))
    if out:
        return out, f"{shared} (andrewmvd and ilc2021 scenes)"
    scenes = _sample_scenes()
    return [cover(scenes[i % len(scenes)], width, height) for i in range(count)], \
        "bundled sample scenes (shared data not found)"
