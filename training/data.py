"""Data set readers: folder-per-class face crops and PASCAL VOC scenes cut into face crops.

Every image is decoded by content (``cv2.imdecode``), never trusted by its extension, so
odd names (``x.png"``, ``y.jpg_1088Wx1632H``, WebP bytes under ``.jpg``) still load and a
file that does not decode is counted and reported instead of stopping a run.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

logger = logging.getLogger(__name__)

CLASS_NAMES: tuple[str, ...] = ("mask", "no_mask", "incorrect")
MASK_CLASS = "mask"

# Source label -> canonical class; the two VOC sets spell "worn incorrectly" differently.
LABEL_MAP: dict[str, str] = {
    "with_mask": "mask",
    "without_mask": "no_mask",
    "mask_weared_incorrect": "incorrect",
    "with_incorrect_mask": "incorrect",
    "mask": "mask",
    "no_mask": "no_mask",
    "incorrect": "incorrect",
}

DEFAULT_FACE_MARGIN = 0.2
DEFAULT_MIN_FACE_PX = 32


class DatasetError(RuntimeError):
    """A data set cannot be used as given (missing folder, empty class, no readable file)."""


@dataclass(frozen=True)
class Sample:
    """One face image: a whole file (folder sets) or a box cut from a scene (VOC sets).

    Args:
        dataset: short name of the data set (e.g. ``chandrikadeb7``).
        path: image path relative to the data set root, POSIX separators.
        label: canonical class name, one of ``CLASS_NAMES``.
        box: ``(xmin, ymin, xmax, ymax)`` in pixels for a VOC face, ``None`` for a crop file.
    """

    dataset: str
    path: str
    label: str
    box: tuple[int, int, int, int] | None = None

    @property
    def key(self) -> str:
        """Stable identity used by caches and split manifests."""
        if self.box is None:
            return f"{self.dataset}/{self.path}"
        return f"{self.dataset}/{self.path}#{','.join(str(v) for v in self.box)}"


@dataclass
class ReadReport:
    """Counts of what a reader kept and why it dropped the rest."""

    dataset: str
    kept: Counter[str] = field(default_factory=Counter)
    unreadable: list[str] = field(default_factory=list)
    unknown_labels: Counter[str] = field(default_factory=Counter)
    boxes_clipped: int = 0
    boxes_outside: int = 0
    boxes_too_small: int = 0
    bad_annotations: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly summary."""
        return {
            "dataset": self.dataset,
            "kept_per_class": dict(self.kept),
            "unreadable": len(self.unreadable),
            "unreadable_files": self.unreadable[:50],
            "unknown_labels": dict(self.unknown_labels),
            "boxes_clipped": self.boxes_clipped,
            "boxes_outside_skipped": self.boxes_outside,
            "boxes_too_small_skipped": self.boxes_too_small,
            "bad_annotations": self.bad_annotations[:50],
        }

    def log(self) -> None:
        """Write the summary to the log once, at INFO, and trouble at WARNING."""
        logger.info("%s: kept %s", self.dataset, dict(self.kept))
        if self.unreadable:
            logger.warning("%s: %d unreadable files skipped (e.g. %s)", self.dataset,
                           len(self.unreadable), self.unreadable[:3])
        if self.boxes_clipped or self.boxes_outside or self.boxes_too_small:
            logger.info("%s: boxes clipped %d, outside skipped %d, too small skipped %d",
                        self.dataset, self.boxes_clipped, self.boxes_outside,
                        self.boxes_too_small)
        if self.bad_annotations:
            logger.warning("%s: %d annotations could not be parsed", self.dataset,
                           len(self.bad_annotations))


def decode_image(path: Path) -> np.ndarray | None:
    """Decode an image file by its content; ``None`` when it is not a decodable image."""
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError:
        return None
    if data.size == 0:
        return None
    image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if image is None or image.ndim != 3 or min(image.shape[:2]) < 2:
        return None
    return image


def crop_face(image: np.ndarray, box: tuple[int, int, int, int], margin: float) -> np.ndarray:
    """Cut a box grown by ``margin`` of its width/height on each side, clipped to the image.

    The capture service crops detector boxes the same way, so the margin travels in the
    model metadata as ``face_margin``.
    """
    height, width = image.shape[:2]
    xmin, ymin, xmax, ymax = box
    dx, dy = (xmax - xmin) * margin, (ymax - ymin) * margin
    x0, y0 = max(0, int(round(xmin - dx))), max(0, int(round(ymin - dy)))
    x1, y1 = min(width, int(round(xmax + dx))), min(height, int(round(ymax + dy)))
    return image[y0:y1, x0:x1]


def to_square(image: np.ndarray, size: int) -> np.ndarray:
    """Resize to ``size`` x ``size`` (aspect not kept), the way the classifier does it."""
    interp = cv2.INTER_AREA if min(image.shape[:2]) > size else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interp)


def _list_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def read_folder_dataset(root: Path, name: str) -> tuple[list[Sample], ReadReport]:
    """List a folder-per-class set (``with_mask/``, ``without_mask/``, ...).

    Files are only listed here; decoding happens once in :func:`load_crops`, which drops
    and counts what does not decode. An empty class folder is an error.
    """
    if not root.is_dir():
        raise DatasetError(f"data set folder not found: {root}")
    report = ReadReport(dataset=name)
    samples: list[Sample] = []
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DatasetError(f"no class folders in {root}")
    for class_dir in class_dirs:
        label = LABEL_MAP.get(class_dir.name)
        if label is None:
            report.unknown_labels[class_dir.name] += 1
            logger.warning("%s: folder %s is not a known class, skipped", name, class_dir.name)
            continue
        files = _list_files(class_dir)
        if not files:
            raise DatasetError(f"class folder {class_dir} is empty")
        samples += [Sample(name, f.relative_to(root).as_posix(), label) for f in files]
    if not samples:
        raise DatasetError(f"no images found in {root}")
    return samples, report


def _int_text(node: ET.Element, tag: str) -> int:
    text = node.findtext(tag)
    if text is None:
        raise ValueError(f"missing <{tag}>")
    return int(round(float(text.strip())))


def parse_voc(xml_path: Path) -> tuple[str, tuple[int, int] | None, list[tuple[str, tuple]]]:
    """Parse one VOC annotation: (file name, (width, height) or None, [(name, box)]).

    Text after ``</bndbox>`` (as some andrewmvd files carry) is XML tail text and ignored.
    """
    root = ET.parse(xml_path).getroot()
    filename = (root.findtext("filename") or "").strip()
    size_node = root.find("size")
    size = None
    if size_node is not None:
        try:
            size = (_int_text(size_node, "width"), _int_text(size_node, "height"))
        except ValueError:
            size = None
    objects = []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        bnd = obj.find("bndbox")
        if bnd is None:
            continue
        box = tuple(_int_text(bnd, t) for t in ("xmin", "ymin", "xmax", "ymax"))
        objects.append((name, box))
    return filename, size, objects


def clip_box(
    box: tuple[int, ...], width: int, height: int
) -> tuple[tuple[int, int, int, int] | None, bool]:
    """Clip a box to the image; returns (box or None when nothing is left, was_clipped)."""
    xmin, ymin, xmax, ymax = box
    cx0, cy0 = max(0, min(xmin, xmax)), max(0, min(ymin, ymax))
    cx1, cy1 = min(width, max(xmin, xmax)), min(height, max(ymin, ymax))
    if cx1 - cx0 < 2 or cy1 - cy0 < 2:
        return None, True
    clipped = (cx0, cy0, cx1, cy1) != (xmin, ymin, xmax, ymax)
    return (cx0, cy0, cx1, cy1), clipped


def read_voc_dataset(
    root: Path, name: str, min_face_px: int = DEFAULT_MIN_FACE_PX,
    on_scene: Callable[[str, np.ndarray], None] | None = None,
) -> tuple[list[Sample], ReadReport, dict[str, tuple[int, int]]]:
    """List the face boxes of a VOC set (``images/``, ``annotations/``).

    Boxes are checked against the real image size (the file is decoded here), clipped when
    they stick out and skipped when nothing is left or the face is narrower than
    ``min_face_px``. Returns the samples, the report and each scene's (width, height).
    ``on_scene(rel_path, image_bgr)`` sees every decoded scene (used for hashing).
    """
    images_dir, ann_dir = root / "images", root / "annotations"
    if not images_dir.is_dir() or not ann_dir.is_dir():
        raise DatasetError(f"{root} lacks images/ or annotations/")
    report = ReadReport(dataset=name)
    samples: list[Sample] = []
    sizes: dict[str, tuple[int, int]] = {}
    for xml_path in sorted(ann_dir.glob("*.xml")):
        try:
            filename, _, objects = parse_voc(xml_path)
        except (ET.ParseError, ValueError) as exc:
            report.bad_annotations.append(f"{xml_path.name}: {exc}")
            continue
        image_path = images_dir / (filename or xml_path.with_suffix(".jpg").name)
        if not image_path.is_file():
            image_path = images_dir / xml_path.with_suffix(".jpg").name
        image = decode_image(image_path)
        rel = image_path.relative_to(root).as_posix()
        if image is None:
            report.unreadable.append(rel)
            continue
        height, width = image.shape[:2]
        sizes[rel] = (width, height)
        if on_scene is not None:
            on_scene(rel, image)
        for label_name, raw_box in objects:
            label = LABEL_MAP.get(label_name)
            if label is None:
                report.unknown_labels[label_name] += 1
                continue
            box, clipped = clip_box(raw_box, width, height)
            if box is None:
                report.boxes_outside += 1
                continue
            report.boxes_clipped += int(clipped)
            if box[2] - box[0] < min_face_px:
                report.boxes_too_small += 1
                continue
            samples.append(Sample(name, rel, label, box))
    return samples, report, sizes


def name_stem(path: str) -> str:
    """Folder and file name up to the first dot: ``x.jpg`` and ``x.png"`` are one picture.

    Names like ``0_0_0 copy 17`` or ``Screenshot (251)`` are *not* folded together: in the
    chandrikadeb7 set they are distinct faces, and near-copies are left to the pHash.
    """
    return f"{Path(path).parent.as_posix()}/{Path(path).name.split('.')[0]}"


def load_crops(
    data_root: Path, samples: list[Sample], size: int, margin: float,
    report: ReadReport | None = None,
) -> tuple[np.ndarray, list[Sample]]:
    """Decode every sample once into an ``N x size x size x 3`` RGB uint8 array.

    Files that do not decode are dropped (and listed in ``report``); each scene file is
    decoded once however many faces it holds.
    """
    out: list[np.ndarray] = []
    kept: list[Sample] = []
    last_path: str | None = None
    scene: np.ndarray | None = None
    for sample in samples:
        full = f"{sample.dataset}/{sample.path}"
        if full != last_path:
            scene = decode_image(data_root / sample.dataset / sample.path)
            last_path = full
        if scene is None:
            if report is not None and sample.path not in report.unreadable:
                report.unreadable.append(sample.path)
            continue
        face = scene if sample.box is None else crop_face(scene, sample.box, margin)
        out.append(cv2.cvtColor(to_square(face, size), cv2.COLOR_BGR2RGB))
        kept.append(sample)
        if report is not None:
            report.kept[sample.label] += 1
    if not out:
        return np.zeros((0, size, size, 3), np.uint8), kept
    return np.stack(out), kept
