"""``maskmesh classify`` on real face crops, and its handling of unreadable files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.inference.cli import DEFAULT_MODEL, classify_main

# Held-out (test split) chandrikadeb7 crops, looked at by eye: the label a person gives.
EXPECTED = {
    "with_mask/0417.jpg": "mask",  # woman, dark red cloth mask, shop background
    "with_mask/0_0_6f3feedbly1g35rq7j549j20xc0m877l.jpg": "mask",  # black mask, close-up
    "with_mask/143.jpg": "mask",  # man in cap, patterned mask
    "without_mask/0_0_cengyongti_0087.jpg": "no_mask",  # smiling woman, bare face
    "without_mask/0_0_jianailiang_0024.jpg": "no_mask",  # young man, hand on head
}


def _run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, list[dict]]:
    code = classify_main(argv)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line]
    return code, lines


SHIPPED = [DEFAULT_MODEL.parent / f"{name}.onnx"
           for name in ("maskmesh-alexnet", "maskmesh-efficientnet-lite0")]


@pytest.mark.parametrize("model", SHIPPED, ids=lambda p: p.stem)
def test_shipped_model_gives_human_labels(model: Path, shared: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    if not model.is_file():
        pytest.skip(f"{model} not exported yet")
    root = shared / "datasets" / "chandrikadeb7"
    paths = [str(root / rel) for rel in EXPECTED]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    code, lines = _run(capsys, ["--json", "--model", str(model), *paths, str(broken)])
    assert code == 1, "an unreadable file must give a non-zero exit"
    assert lines[-1] == {"path": str(broken), "error": "unreadable or not an image"}
    for line, (rel, label) in zip(lines, EXPECTED.items(), strict=False):
        assert line["path"].endswith(rel)
        assert line["label"] == label, line
        assert 0.0 <= line["p_mask"] <= 1.0
        assert line["violation"] == (line["p_mask"] < 0.8)
        if label == "no_mask":
            assert line["violation"]


def test_env_model_override_and_missing_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    import cv2
    import numpy as np
    from torch import nn

    from training.export import build_metadata, export_onnx

    model = nn.Sequential(nn.Conv2d(3, 3, 8, stride=8), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    path = tmp_path / "tiny.onnx"
    export_onnx(model.eval(), path, build_metadata("tiny", "tiny", ["mask", "no_mask",
                                                                    "incorrect"], False, 0.2))
    image = tmp_path / "face.png"
    cv2.imwrite(str(image), np.full((50, 40, 3), 200, np.uint8))
    monkeypatch.setenv("MASKMESH_MODEL", str(path))
    code, lines = _run(capsys, ["--json", "--threshold", "0", str(image)])
    assert code == 0
    assert lines[0]["label"] in ("mask", "no_mask", "incorrect")
    assert lines[0]["violation"] is False  # no p_mask is below 0

    monkeypatch.setenv("MASKMESH_MODEL", str(tmp_path / "nope.onnx"))
    assert classify_main(["--json", str(image)]) == 2
    assert "nope.onnx" in capsys.readouterr().err
