"""Regenerating a district's broker files, e.g. to add a camera, keeps the passwords.

Without ``--secrets-dir`` the plain passwords live only in ``OUT/credentials.json``;
a second run wrote new ones for every user, so each running service was locked out at
the broker's next restart.
"""

from __future__ import annotations

import json
from pathlib import Path

from maskmesh.brokerconf import main


def test_a_second_run_into_the_same_folder_keeps_every_password(tmp_path: Path) -> None:
    out = tmp_path / "broker"
    assert main(["--district", "d1", "--camera", "cam1", "--out", str(out)]) == 0
    before = json.loads((out / "credentials.json").read_text(encoding="utf-8"))
    assert main(["--district", "d1", "--camera", "cam1,cam2", "--out", str(out)]) == 0
    after = json.loads((out / "credentials.json").read_text(encoding="utf-8"))
    assert {user: after[user] for user in before} == before
    assert "capture-cam2" in after and after["capture-cam2"] not in before.values()


def test_with_a_secrets_folder_a_deleted_secret_is_still_rotated(tmp_path: Path) -> None:
    out, secrets = tmp_path / "broker", tmp_path / "secrets"
    argv = ["--district", "d1", "--camera", "cam1", "--out", str(out),
            "--secrets-dir", str(secrets)]
    assert main(argv) == 0
    before = json.loads((out / "credentials.json").read_text(encoding="utf-8"))
    (secrets / "broker-notifier").unlink()
    assert main(argv) == 0
    after = json.loads((out / "credentials.json").read_text(encoding="utf-8"))
    assert after["notifier"] != before["notifier"]
    assert after["inference"] == before["inference"]
