"""Readers: odd files are counted, never fatal; empty classes and bad boxes are handled."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from training.data import (
    DatasetError,
    ReadReport,
    clip_box,
    load_crops,
    name_stem,
    read_folder_dataset,
    read_voc_dataset,
)


def _face(seed: int, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, (size, size, 3), dtype=np.uint8)


def _folder_set(root: Path) -> Path:
    ds = root / "folderset"
    (ds / "with_mask").mkdir(parents=True)
    (ds / "without_mask").mkdir()
    cv2.imwrite(str(ds / "with_mask" / "a.jpg"), _face(1))
    # PNG bytes under a misleading, quoted extension: decoded by content.
    ok, png = cv2.imencode(".png", _face(2))
    assert ok
    (ds / "with_mask" / 'b.png"').write_bytes(png.tobytes())
    (ds / "with_mask" / "c.jpg_1088Wx1632H").write_bytes(png.tobytes())
    (ds / "with_mask" / "broken.jpg").write_bytes(b"not an image at all")
    (ds / "with_mask" / "empty.jpg").write_bytes(b"")
    cv2.imwrite(str(ds / "without_mask" / "d.jpg"), _face(3))
    return ds


def test_folder_reader_counts_unreadable_and_decodes_by_content(tmp_path: Path) -> None:
    ds = _folder_set(tmp_path)
    samples, report = read_folder_dataset(ds, "folderset")
    assert len(samples) == 6
    images, kept = load_crops(tmp_path, samples, 32, 0.2, report)
    assert images.shape == (4, 32, 32, 3)
    assert sorted(report.unreadable) == ["with_mask/broken.jpg", "with_mask/empty.jpg"]
    assert report.kept == {"mask": 3, "no_mask": 1}
    assert {s.path for s in kept} >= {'with_mask/b.png"', "with_mask/c.jpg_1088Wx1632H"}


def test_empty_class_is_a_clear_error(tmp_path: Path) -> None:
    ds = tmp_path / "set"
    (ds / "with_mask").mkdir(parents=True)
    (ds / "without_mask").mkdir()
    cv2.imwrite(str(ds / "with_mask" / "a.jpg"), _face(1))
    with pytest.raises(DatasetError, match="without_mask.*empty"):
        read_folder_dataset(ds, "set")


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found"):
        read_folder_dataset(tmp_path / "nope", "nope")


VOC = """<annotation><filename>{name}</filename>
<size><width>200</width><height>100</height><depth>3</depth></size>
{objects}</annotation>"""
OBJ = ("<object><name>{label}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
       "<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox>file:/junk/after/box.xml\n</object>")


def test_voc_reader_clips_skips_and_maps_labels(tmp_path: Path) -> None:
    ds = tmp_path / "vocset"
    (ds / "images").mkdir(parents=True)
    (ds / "annotations").mkdir()
    cv2.imwrite(str(ds / "images" / "s1.jpg"), np.full((100, 200, 3), 128, np.uint8))
    objects = "".join(OBJ.format(label=lab, b=box) for lab, box in [
        ("with_mask", (10, 10, 60, 60)),
        ("mask_weared_incorrect", (150, 50, 260, 140)),  # sticks out: clipped
        ("without_mask", (300, 300, 340, 340)),  # wholly outside: skipped
        ("with_incorrect_mask", (5, 5, 20, 20)),  # 15 px wide: too small
        ("someone_else", (10, 10, 80, 80)),  # unknown label
    ])
    (ds / "annotations" / "s1.xml").write_text(VOC.format(name="s1.jpg", objects=objects))
    (ds / "annotations" / "bad.xml").write_text("<annotation><object>")
    (ds / "annotations" / "s2.xml").write_text(VOC.format(name="gone.jpg", objects=""))

    samples, report, _ = read_voc_dataset(ds, "vocset", min_face_px=32)
    assert [(s.label, s.box) for s in samples] == [("mask", (10, 10, 60, 60)),
                                                    ("incorrect", (150, 50, 200, 100))]
    assert report.boxes_clipped == 1
    assert report.boxes_outside == 1
    assert report.boxes_too_small == 1
    assert report.unknown_labels == {"someone_else": 1}
    assert len(report.bad_annotations) == 1
    assert report.unreadable == ["images/gone.jpg"] or report.unreadable == ["images/s2.jpg"]
    crops, _ = load_crops(tmp_path, samples, 48, 0.2, ReadReport("vocset"))
    assert crops.shape == (2, 48, 48, 3)


def test_clip_box_and_copy_names() -> None:
    assert clip_box((-5, -5, 50, 50), 40, 40) == ((0, 0, 40, 40), True)
    assert clip_box((50, 50, 60, 60), 40, 40) == (None, True)
    assert name_stem("with_mask/0_0_0 copy 2.jpg") == name_stem('with_mask/0_0_0 copy 2.png"')
    assert name_stem("a/x (1).jpg") != name_stem("a/x (2).jpg")
