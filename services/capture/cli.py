"""``maskmesh detect``: find and classify the faces of scene images, without the bus.

One line per image. With ``--json``::

    {"path": "a.jpg", "faces": [{"box": [x1, y1, x2, y2], "score": 0.98,
                                 "label": "mask", "p_mask": 0.97, "violation": false}]}

``violation`` is ``p_mask`` below the threshold (the model's, 0.8, or ``--threshold``),
as the inference service decides it.

An image that cannot be read gives ``{"path": ..., "error": ...}`` and the command ends
with status 1 after the other images. Faces are cropped exactly as a capture node crops
them, so what this prints is what the inference service would decide.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from maskmesh.logs import configure_logging
from maskmesh.settings import threshold_arg
from services.capture.crops import crop_face
from services.capture.detectors import Detector, DetectorError, make_detector
from services.capture.sources import list_images

logger = logging.getLogger(__name__)

DEFAULT_MARGIN = 0.2


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="maskmesh detect", description="Detect and classify the faces of scene images."
    )
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH",
                        help="image files or folders of images")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--detector", choices=["res10", "yunet"], default="res10",
                        help="face detector (default res10, shipped in a registry wheel)")
    # --detector-model, as `maskmesh up` names it; --model is kept for old command lines.
    parser.add_argument("--detector-model", "--model", dest="model", type=Path, metavar="ONNX",
                        help="face detector model file (required for yunet); the mask "
                             "classifier is --classifier")
    parser.add_argument("--classifier", type=Path, metavar="ONNX",
                        help="mask classifier (default $MASKMESH_MODEL or "
                             "models/maskmesh-efficientnet-lite0.onnx)")
    parser.add_argument("--no-classify", action="store_true",
                        help="detect only; label, p_mask and violation are null")
    parser.add_argument("--threshold", type=threshold_arg, default=None,
                        help="p_mask below this is a violation (default: the model's, 0.8)")
    parser.add_argument("--score-threshold", type=float,
                        help="lowest detector score kept (res10 0.4, yunet 0.6)")
    parser.add_argument("--min-face-px", type=int, default=32,
                        help="narrowest face kept, in pixels (default 32)")
    parser.add_argument("--pad-ratio", type=float, default=0.0,
                        help="grey border round each image for res10, a fraction of the long "
                             "side; about 0.1 helps on tightly cropped faces")
    parser.add_argument("--crop-margin", type=float,
                        help="crop margin; default the classifier's face_margin, else 0.2")
    return parser.parse_args(list(argv))


def _expand(paths: Sequence[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            yield from list_images(path)
        else:
            yield path


def _load_classifier(path: Path | None) -> Any:
    from services.inference.classifier import MaskClassifier
    from services.inference.settings import default_model_path

    return MaskClassifier(path or default_model_path())


def detect_image(
    image: np.ndarray, detector: Detector, classifier: Any | None, margin: float,
    threshold: float | None = None,
) -> list[dict[str, Any]]:
    """The faces of one BGR image as JSON-ready dicts (box, score, label, p_mask, violation).

    ``threshold`` defaults to the classifier's own.
    """
    if classifier is not None and threshold is None:
        threshold = classifier.threshold
    detections = detector.detect(image)
    predictions: list[Any] = [None] * len(detections)
    if classifier is not None and detections:
        crops = [crop_face(image, d.box, margin) for d in detections]
        predictions = classifier.classify(crops)
    faces = []
    for det, pred in zip(detections, predictions, strict=True):
        faces.append({
            "box": list(det.box),
            "score": round(det.score, 4),
            "label": pred.label if pred is not None else None,
            "p_mask": round(pred.p_mask, 4) if pred is not None else None,
            "violation": (pred.is_violation(threshold)
                          if pred is not None and threshold is not None else None),
        })
    return faces


def _text_line(result: dict[str, Any]) -> str:
    if "error" in result:
        return f"{result['path']}: error: {result['error']}"
    parts = []
    for face in result["faces"]:
        box = ",".join(str(v) for v in face["box"])
        verdict = "" if face["label"] is None else f" {face['label']} p_mask={face['p_mask']:.2f}"
        if face["violation"]:
            verdict += " violation"
        parts.append(f"[{box}] score={face['score']:.2f}{verdict}")
    return f"{result['path']}: {len(parts)} faces " + " ".join(parts)


def detect_main(argv: Sequence[str]) -> int:
    """``maskmesh detect``: 0 when every image was read, 1 if one was not, 2 on bad use."""
    args = _parse(argv)
    configure_logging("WARNING")
    try:
        detector = make_detector(
            args.detector, args.model, args.score_threshold, args.min_face_px, args.pad_ratio
        )
    except DetectorError as exc:
        hint = (" (--detector-model names the face detector's file; a mask classifier goes "
                "in --classifier)" if args.detector == "yunet" and args.model is not None
                else "")
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        print(f"maskmesh detect: {first_line}{hint}", file=sys.stderr)
        return 2

    classifier = None
    if not args.no_classify:
        try:
            classifier = _load_classifier(args.classifier)
        except Exception as exc:  # ModelLoadError, or the inference package absent
            print(f"maskmesh detect: cannot load the classifier: {exc} "
                  "(give --classifier PATH or --no-classify)", file=sys.stderr)
            return 2
    margin = args.crop_margin
    if margin is None:
        model_margin = getattr(getattr(classifier, "info", None), "face_margin", 0.0)
        margin = model_margin if model_margin else DEFAULT_MARGIN

    failed = 0
    for path in _expand(args.paths):
        image = cv2.imread(str(path), cv2.IMREAD_COLOR) if path.is_file() else None
        result: dict[str, Any]
        if image is None:
            failed += 1
            reason = "not an image OpenCV can read" if path.is_file() else "no such file"
            result = {"path": str(path), "error": reason}
        else:
            result = {"path": str(path),
                      "faces": detect_image(image, detector, classifier, margin,
                                            args.threshold)}
        print(json.dumps(result) if args.json else _text_line(result), flush=True)
    return 1 if failed else 0
