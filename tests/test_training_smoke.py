"""End to end on a small slice of the shared data: train one epoch, export, evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "models" / "splits" / "split-seed0-m0.2-w32-d6.json"


def _small_manifest(tmp_path: Path, per_split: int = 24) -> Path:
    manifest = json.loads(MANIFEST.read_text())
    for per in manifest["datasets"].values():
        for split, entries in per.items():
            # Keep every class represented: take the first few of each label.
            picked: list = []
            for label in ("mask", "no_mask", "incorrect"):
                picked += [e for e in entries if e[1] == label][:per_split // 3]
            per[split] = picked
    path = tmp_path / "small-split.json"
    path.write_text(json.dumps(manifest))
    return path


@pytest.mark.slow
def test_one_epoch_train_export_evaluate(shared: Path, tmp_path: Path) -> None:
    from training.cli import evaluate_main, export_main, train_main

    if not MANIFEST.is_file():
        pytest.skip(f"split manifest {MANIFEST} not committed")
    data = ["--data-root", str(shared / "datasets"), "--runs", str(tmp_path / "runs"),
            "--split-manifest", str(_small_manifest(tmp_path))]
    run = tmp_path / "run"
    assert train_main([*data, "--epochs", "1", "--batch-size", "8", "--out", str(run)]) == 0
    history = json.loads((run / "history.json").read_text())
    assert len(history) == 1 and history[0]["train_loss"] > 0

    onnx_path = tmp_path / "smoke.onnx"
    int8_path = tmp_path / "smoke-int8.onnx"
    assert export_main([*data, "--checkpoint", str(run / "best.pt"), "--out", str(onnx_path),
                        "--int8", str(int8_path), "--calibration-images", "16",
                        "--parity-images", "16"]) == 0
    assert onnx_path.is_file() and int8_path.is_file()

    report = tmp_path / "report"
    assert evaluate_main([*data, "--model", str(onnx_path), "--out", str(report),
                          "--history", str(run / "history.json"), "--no-latency"]) == 0
    metrics = json.loads((report / "smoke-metrics.json").read_text())
    assert set(metrics["sets"]) == {"chandrikadeb7-test", "ilc2021-test", "andrewmvd-cross"}
    assert (report / "smoke-report.md").read_text().startswith("# Evaluation")
    assert (report / "smoke-roc.png").is_file() and (report / "smoke-history.png").is_file()
