"""``maskmesh up`` end to end: broker, capture, inference, notifier and mail, as processes.

Expected figures are worked out from the input: the bundled sample has five scenes with
one face each, two of them bare (01 and 04) and three masked; the shared scenes are one
bare face and one masked face from the andrewmvd set, which the model never trained on.
"""

from __future__ import annotations

import email
import json
import subprocess
import sys
from email.message import Message
from pathlib import Path

import cv2
import numpy as np
import pytest

from services.inference.classifier import MaskClassifier
from services.inference.settings import DEFAULT_MODEL

MODEL = DEFAULT_MODEL


def _run_up(tmp_path: Path, *extra: str) -> tuple[dict[str, int], list[Message]]:
    if not MODEL.is_file():
        pytest.skip(f"no shipped model at {MODEL}")
    mail_dir = tmp_path / "mail"
    result = subprocess.run(
        [sys.executable, "-m", "maskmesh.cli", "up", "--mail-dir", str(mail_dir), *extra],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    mails = [email.message_from_bytes(p.read_bytes()) for p in sorted(mail_dir.glob("*.eml"))]
    return summary, mails


def _jpeg_parts(mail: Message) -> list[np.ndarray]:
    images = []
    for part in mail.walk():
        if part.get_content_type() == "image/jpeg":
            data = np.frombuffer(part.get_payload(decode=True), np.uint8)
            image = cv2.imdecode(data, cv2.IMREAD_COLOR)
            assert image is not None and image.size > 0
            images.append(image)
    return images


def test_up_on_the_bundled_sample(tmp_path: Path) -> None:
    summary, mails = _run_up(tmp_path)
    assert summary == {
        "frames": 5,
        "faces": 5,
        "verdicts": 5,
        "violations": 2,
        # The first bare face is mailed at once; the second comes within the camera's
        # cool-down, so it is held and sent as a digest: two mails, neither lost.
        "mails": 2,
        "dead_letters": 0,
        # The model that gave the verdicts, as its file names itself.
        "model": MaskClassifier(MODEL).model_id,
    }
    assert len(mails) == 2
    for mail in mails:
        assert mail["Subject"].startswith("[maskmesh]")
        assert _jpeg_parts(mail), "every alert carries the photo"


def test_up_on_shared_scenes_mails_the_bare_face_only(tmp_path: Path, shared: Path) -> None:
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    images = shared / "datasets" / "andrewmvd" / "images"
    # A man without a mask, and a woman wearing one (each the only face in the photo).
    (scenes / "1-bare.jpg").symlink_to(images / "maksssksksss343.jpg")
    (scenes / "2-masked.jpg").symlink_to(images / "maksssksksss446.jpg")

    summary, mails = _run_up(tmp_path, "--source", str(scenes))

    assert summary["frames"] == 2
    assert summary["faces"] == 2
    assert summary["verdicts"] == 2
    assert summary["violations"] == 1
    assert summary["mails"] == 1
    assert summary["dead_letters"] == 0
    assert len(mails) == 1 and len(_jpeg_parts(mails[0])) >= 1
