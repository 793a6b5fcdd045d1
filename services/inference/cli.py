"""``maskmesh classify``: classify face-crop image files, one JSON object per line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import cv2
import numpy as np

from maskmesh.settings import threshold_arg
from services.inference.settings import DEFAULT_MODEL, MODEL_ENV, default_model_path

logger = logging.getLogger(__name__)

BATCH_SIZE = 16


def _read(path: str) -> np.ndarray | None:
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError:
        return None
    return cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None


def classify_main(argv: list[str]) -> int:
    """Classify face crops; exit status 1 if any file could not be read."""
    parser = argparse.ArgumentParser(prog="maskmesh classify", description=classify_main.__doc__)
    parser.add_argument("paths", nargs="+", metavar="PATH", help="face crop image files")
    parser.add_argument("--model", type=Path, default=None,
                        help=f"ONNX model (default ${MODEL_ENV} or {DEFAULT_MODEL.name})")
    parser.add_argument("--threshold", type=threshold_arg, default=None,
                        help="p_mask below this is a violation (default: the model's, 0.8)")
    parser.add_argument("--json", action="store_true",
                        help="JSON lines output (the only format; accepted for clarity)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from services.inference.classifier import MaskClassifier, ModelLoadError

    try:
        classifier = MaskClassifier(args.model or default_model_path(), args.threads)
    except ModelLoadError as exc:
        print(f"maskmesh classify: {exc}", file=sys.stderr)
        return 2
    threshold = classifier.threshold if args.threshold is None else args.threshold

    failed = 0
    pending: list[tuple[str, np.ndarray]] = []

    def flush() -> None:
        if not pending:
            return
        preds = classifier.classify([img for _, img in pending])
        for (path, _), pred in zip(pending, preds, strict=True):
            print(json.dumps({"path": path, "label": pred.label,
                              "p_mask": round(pred.p_mask, 4),
                              "violation": pred.is_violation(threshold)}), flush=True)
        pending.clear()

    for path in args.paths:
        image = _read(path)
        if image is None:
            flush()  # keep output in input order
            failed += 1
            print(json.dumps({"path": path, "error": "unreadable or not an image"}), flush=True)
            continue
        pending.append((path, image))
        if len(pending) >= BATCH_SIZE:
            flush()
    flush()
    return 1 if failed else 0
