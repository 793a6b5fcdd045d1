"""Face detectors on real annotated scenes, and the ``maskmesh detect`` command."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from services.capture.cli import detect_main
from services.capture.crops import context_photo, crop_face, margin_box, scale_box
from services.capture.detectors import Res10Detector, YuNetDetector, iou, make_detector
from services.capture.evaluate import Tally, load_dataset, score_image
from services.capture.sample import write_sample_images
from services.inference.settings import DEFAULT_MODEL

YUNET = "models/face_detection_yunet_2026may.onnx"


def _large_face_images(shared: Path, count: int, min_px: int = 60) -> list:
    """The first ``count`` andrewmvd scenes whose every face is clearly visible."""
    chosen = []
    for item in load_dataset(shared / "datasets" / "andrewmvd", limit=400):
        if item.faces and all(b[2] - b[0] >= min_px for b, _ in item.faces):
            chosen.append(item)
        if len(chosen) == count:
            break
    assert len(chosen) == count
    return chosen


@pytest.mark.parametrize("name", ["res10", "yunet"])
def test_detector_finds_the_faces_a_person_sees(shared: Path, name: str) -> None:
    model = shared / YUNET if name == "yunet" else None
    detector = make_detector(name, model)
    tally = Tally()
    for item in _large_face_images(shared, 12):
        image = cv2.imread(str(item.image))
        score_image(detector.detect(image), item.faces, tally, min_face_px=32, iou_threshold=0.5)
    # Measured: res10 finds 0.85 of these faces, YuNet 0.96 (DETECTORS.md has full sets).
    assert tally.recall() >= (0.7 if name == "res10" else 0.85), dict(tally.found)
    assert tally.precision() >= 0.8


def test_margin_crop_matches_training_rule() -> None:
    frame = np.zeros((100, 200, 3), np.uint8)
    assert margin_box((50, 20, 100, 70), 0.2, 200, 100) == (40, 10, 110, 80)
    assert margin_box((0, 0, 50, 50), 0.2, 200, 100) == (0, 0, 60, 60)  # clipped
    assert crop_face(frame, (150, 60, 200, 100), 0.2).shape == (48, 60, 3)
    # The same rule the classifier was trained with, on random boxes.
    from training.data import crop_face as training_crop

    rng = np.random.default_rng(0)
    scene = rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)
    for _ in range(50):
        x1, y1 = int(rng.integers(0, 150)), int(rng.integers(0, 110))
        box = (x1, y1, x1 + int(rng.integers(1, 60)), y1 + int(rng.integers(1, 60)))
        box = (box[0], box[1], min(box[2], 160), min(box[3], 120))
        assert np.array_equal(crop_face(scene, box, 0.2), training_crop(scene, box, 0.2))
    small, scale = context_photo(np.zeros((1080, 1920, 3), np.uint8))
    assert small.shape[:2] == (540, 960) and scale == 0.5
    assert scale_box((100, 200, 300, 400), 0.5, 960, 540) == (50, 100, 150, 200)


def test_res10_padding_keeps_boxes_in_frame_coordinates(tmp_path: Path) -> None:
    paths = write_sample_images(tmp_path)
    image = cv2.imread(str(paths[0]))
    plain = Res10Detector().detect(image)
    padded = Res10Detector(pad_ratio=0.25).detect(image)
    assert len(plain) == len(padded) == 1
    assert iou(plain[0].box, padded[0].box) > 0.7


def test_yunet_without_its_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="does not exist"):
        YuNetDetector(tmp_path / "missing.onnx")


def test_detect_json_lines_and_error_exit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = write_sample_images(tmp_path / "scenes")
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    status = detect_main(["--json", "--no-classify", str(tmp_path / "scenes"),
                          str(tmp_path / "bad.jpg")])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert status == 1
    assert [line["path"] for line in lines] == [str(p) for p in paths] + [str(tmp_path / "bad.jpg")]
    for line in lines[:-1]:
        assert len(line["faces"]) == 1
        face = line["faces"][0]
        assert face["score"] > 0.5 and face["label"] is None and face["violation"] is None
        x1, y1, x2, y2 = face["box"]
        assert x2 - x1 >= 32 and y2 > y1
    assert "error" in lines[-1] and "faces" not in lines[-1]


@pytest.mark.skipif(not DEFAULT_MODEL.is_file(), reason=f"{DEFAULT_MODEL} not built yet")
def test_a_classifier_given_as_the_detector_model_gets_a_hint(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    paths = write_sample_images(tmp_path / "scenes")
    for flag in ("--detector-model", "--model"):
        status = detect_main(["--detector", "yunet", flag, str(DEFAULT_MODEL), str(paths[0])])
        assert status == 2
        err = capfd.readouterr().err
        assert "a mask classifier goes in --classifier" in err
        assert len(err.strip().splitlines()) == 1, err   # one line, not OpenCV's log


@pytest.mark.skipif(not DEFAULT_MODEL.is_file(), reason=f"{DEFAULT_MODEL} not built yet")
def test_detect_classifies_the_sample_mask(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = write_sample_images(tmp_path)
    assert detect_main(["--json", *map(str, paths)]) == 0
    results = {Path(r["path"]).stem: r["faces"][0]
               for r in map(json.loads, capsys.readouterr().out.splitlines())}
    for stem, face in results.items():
        expected = "mask" if "-mask" in stem else "no_mask"
        assert face["label"] == expected, (stem, face)
        # The model's threshold (0.8): a bare face is a violation, a masked one is not.
        assert face["violation"] is (expected == "no_mask"), (stem, face)
        assert face["violation"] is (face["p_mask"] < 0.8)

    # No p_mask is below 0, so at that threshold no face is a violation.
    assert detect_main(["--json", "--threshold", "0", *map(str, paths)]) == 0
    faces = [r["faces"][0] for r in map(json.loads, capsys.readouterr().out.splitlines())]
    assert faces and not any(face["violation"] for face in faces)


@pytest.mark.parametrize("threshold", ["nan", "-0.1", "1.5", "inf", "high"])
def test_detect_and_classify_refuse_a_threshold_the_service_would(
        threshold: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from services.inference.cli import classify_main

    image = str(write_sample_images(tmp_path)[0])
    for main in (detect_main, classify_main):
        with pytest.raises(SystemExit) as exc:
            main(["--json", "--threshold", threshold, image])
        assert exc.value.code == 2
        assert "--threshold" in capsys.readouterr().err
