"""``maskmesh validate``: the validation score the shipping rules compare."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "maskmesh-efficientnet-lite0.onnx"
METRICS = REPO / "docs" / "model-report" / "maskmesh-efficientnet-lite0-metrics.json"
MANIFEST = REPO / "models" / "splits" / "split-seed0-m0.2-w32-d6.json"
AUDITS = ["--audit", str(REPO / "training/audits/chandrikadeb7-train.json"),
          "--audit", str(REPO / "training/audits/chandrikadeb7-validation.json")]


def _validate(shared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
              *extra: str) -> dict:
    from training.cli import validate_main

    assert validate_main(["--data-root", str(shared / "datasets"), "--runs", str(tmp_path),
                          "--split-manifest", str(MANIFEST), "--model", str(MODEL),
                          *AUDITS, *extra]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.slow
def test_the_default_scores_what_its_training_loop_recorded(
        shared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch")
    import onnx

    # The training loop scored the exported epoch on the same faces, from the checkpoint;
    # the ONNX file must give the same count and, to rounding, the same loss.
    props = {p.key: p.value for p in onnx.load(str(MODEL)).metadata_props}
    epoch = json.loads(props["maskmesh"])["epoch"]
    recorded = next(r for r in json.loads(METRICS.read_text())["history"]
                    if r["epoch"] == epoch)
    plain = _validate(shared, tmp_path, capsys)
    assert plain["faces"] == 281 and not plain["mirror"]
    assert plain["right"] == round(recorded["val_acc"] * 281)
    assert plain["loss"] == pytest.approx(recorded["val_loss"], abs=1e-3)

    mirrored = _validate(shared, tmp_path, capsys, "--mirror")
    assert mirrored["mirror"] and mirrored["faces"] == 281
    assert mirrored["loss"] != plain["loss"]   # the mirror images were really scored


def test_validate_refuses_a_missing_model(capsys: pytest.CaptureFixture[str]) -> None:
    from training.cli import validate_main

    with pytest.raises(SystemExit) as exc:
        validate_main(["--model", "no-such-model.onnx"])
    assert exc.value.code == 2
    assert "no-such-model.onnx: no such file" in capsys.readouterr().err


def test_validate_refuses_a_test_split_audit(capsys: pytest.CaptureFixture[str]) -> None:
    # It would leave the validation labels untouched and score them without a word.
    from training.cli import validate_main

    with pytest.raises(SystemExit) as exc:
        validate_main(["--model", str(MODEL), "--audit",
                       str(REPO / "training/audits/chandrikadeb7-test.json")])
    assert exc.value.code == 2
    assert "audits another split" in capsys.readouterr().err


@pytest.mark.parametrize("content", [b"junk", b""])
def test_validate_names_a_model_it_cannot_load_before_reading_data(
        content: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from training.cli import validate_main

    for suffix in (".onnx", ".pt"):
        bad = tmp_path / f"bad{suffix}"
        bad.write_bytes(content)
        # No data root exists here: the model must be refused before any face is read.
        assert validate_main(["--data-root", str(tmp_path / "none"), "--runs", str(tmp_path),
                              "--model", str(bad)]) == 2
        err = capsys.readouterr().err
        assert f"cannot load {bad}" in err and "Traceback" not in err
