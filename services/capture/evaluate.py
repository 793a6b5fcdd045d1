"""Measure face detectors on PASCAL VOC scene sets: recall per label, precision, speed.

``python -m services.capture.evaluate --dataset ../shared/datasets/andrewmvd`` prints one
Markdown table row per detector, the figures ``DETECTORS.md`` quotes.

Protocol: annotated faces at least ``--min-face-px`` wide are the ones counted; smaller
ones are "ignore" regions. Detections are matched greedily, best score first, to the
annotation of highest IoU (>= ``--iou``). A detection matched to an ignored face, or
unmatched and narrower than the size limit, counts neither way; any other unmatched
detection is a false positive.
"""

from __future__ import annotations

import argparse
import sys
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from services.capture.detectors import Box, Detection, Detector, iou, make_detector

# Both sets' label names mapped onto the classifier's three labels.
LABEL_MAP = {
    "with_mask": "mask",
    "without_mask": "no_mask",
    "mask_weared_incorrect": "incorrect",
    "with_incorrect_mask": "incorrect",
}


@dataclass(frozen=True)
class Annotated:
    """One VOC image: its path and its (box, label) faces."""

    image: Path
    faces: list[tuple[Box, str]]


@dataclass
class Tally:
    """Counts for one detector on one data set."""

    found: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    total: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    true_pos: int = 0
    false_pos: int = 0
    images: int = 0
    seconds: float = 0.0

    def recall(self, label: str | None = None) -> float:
        labels = [label] if label else list(self.total)
        total = sum(self.total[x] for x in labels)
        return sum(self.found[x] for x in labels) / total if total else float("nan")

    def precision(self) -> float:
        counted = self.true_pos + self.false_pos
        return self.true_pos / counted if counted else float("nan")


def read_voc(annotation: Path, images: Path) -> Annotated:
    """Parse one VOC file; labels are mapped with LABEL_MAP (unknown ones kept as is)."""
    root = ET.parse(annotation).getroot()
    name = root.findtext("filename") or f"{annotation.stem}.jpg"
    faces: list[tuple[Box, str]] = []
    for obj in root.iter("object"):
        label = (obj.findtext("name") or "").strip()
        bnd = obj.find("bndbox")
        if bnd is None:
            continue
        coords = [int(float((bnd.findtext(k) or "0").strip())) for k in
                  ("xmin", "ymin", "xmax", "ymax")]
        x1, y1, x2, y2 = coords
        if x2 > x1 and y2 > y1:
            faces.append(((x1, y1, x2, y2), LABEL_MAP.get(label, label)))
    return Annotated(images / name, faces)


def load_dataset(folder: Path, limit: int | None = None) -> list[Annotated]:
    """Every annotated image of a VOC folder (``annotations/``, ``images/``), sorted."""
    files = sorted((folder / "annotations").glob("*.xml"))
    if limit:
        files = files[:limit]
    return [read_voc(path, folder / "images") for path in files]


def score_image(
    detections: list[Detection],
    faces: list[tuple[Box, str]],
    tally: Tally,
    min_face_px: int,
    iou_threshold: float,
) -> None:
    """Add one image's matches to ``tally``."""
    counted = [(x2 - x1) >= min_face_px for (x1, _, x2, _), _ in faces]
    for (_, label), is_counted in zip(faces, counted, strict=True):
        if is_counted:
            tally.total[label] += 1
    taken = [False] * len(faces)
    for det in sorted(detections, key=lambda d: -d.score):
        best, best_iou = -1, iou_threshold
        for i, (box, _) in enumerate(faces):
            overlap = iou(det.box, box)
            if not taken[i] and overlap >= best_iou:
                best, best_iou = i, overlap
        if best < 0:
            if det.width >= min_face_px:
                tally.false_pos += 1
            continue
        taken[best] = True
        if counted[best]:
            tally.true_pos += 1
            tally.found[faces[best][1]] += 1


def evaluate(
    detector: Detector,
    dataset: list[Annotated],
    min_face_px: int = 32,
    iou_threshold: float = 0.5,
) -> Tally:
    """Run ``detector`` over every image and count matches."""
    tally = Tally()
    for item in dataset:
        image = cv2.imread(str(item.image), cv2.IMREAD_COLOR)
        if image is None:
            continue
        start = time.perf_counter()
        detections = detector.detect(image)
        tally.seconds += time.perf_counter() - start
        tally.images += 1
        score_image(detections, item.faces, tally, min_face_px, iou_threshold)
    return tally


def frames_per_second(detector: Detector, frame: np.ndarray, seconds: float = 3.0) -> float:
    """Detections per second on one 640x480 frame, after a warm-up call."""
    frame = cv2.resize(frame, (640, 480), interpolation=cv2.INTER_AREA)
    detector.detect(frame)
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        detector.detect(frame)
        runs += 1
    return runs / (time.perf_counter() - start)


def _fmt(value: float) -> str:
    return "-" if value != value else f"{value:.3f}"  # NaN when a label has no faces


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.capture.evaluate",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, action="append", required=True,
                        help="VOC folder with annotations/ and images/ (repeatable)")
    parser.add_argument("--detector", action="append", choices=["res10", "yunet"],
                        help="detector to measure (repeatable; default both)")
    parser.add_argument("--yunet-model", type=Path,
                        help="YuNet ONNX file (needed for yunet)")
    parser.add_argument("--score-threshold", type=float, action="append",
                        help="thresholds to try, one per --detector, in order")
    parser.add_argument("--min-face-px", type=int, default=32)
    parser.add_argument("--iou", type=float, default=0.5)
    parser.add_argument("--limit", type=int, help="first N images of each set only")
    args = parser.parse_args(argv)

    cv2.setNumThreads(1)  # figures for one core, as a capture node gets
    names = args.detector or ["res10", "yunet"]
    if len(args.score_threshold or []) > len(names):
        parser.error("more --score-threshold values than --detector values")
    # Detectors without a threshold of their own use their default.
    thresholds = list(args.score_threshold or []) + [None] * len(names)
    print("| set | detector | score >= | recall mask | no_mask | incorrect | all "
          "| precision | faces | fps 640x480 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for folder in args.dataset:
        data = load_dataset(folder, args.limit)
        sample = cv2.imread(str(data[0].image), cv2.IMREAD_COLOR)
        if sample is None:
            print(f"cannot read {data[0].image}", file=sys.stderr)
            return 1
        for name, threshold in zip(names, thresholds[: len(names)], strict=True):
            detector = make_detector(
                name,
                args.yunet_model if name == "yunet" else None,
                threshold,
                min_face_px=0,  # small detections are judged by the protocol, not dropped
            )
            tally = evaluate(detector, data, args.min_face_px, args.iou)
            fps = frames_per_second(detector, sample)
            shown = getattr(detector, "score_threshold", threshold)
            print(
                f"| {folder.name} | {name} | {shown:.2f} | {_fmt(tally.recall('mask'))} "
                f"| {_fmt(tally.recall('no_mask'))} | {_fmt(tally.recall('incorrect'))} "
                f"| {_fmt(tally.recall())} | {_fmt(tally.precision())} "
                f"| {sum(tally.total.values())} | {fps:.0f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
