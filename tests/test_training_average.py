"""Weight averaging of a run's last epochs (training/average.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from training.average import (  # noqa: E402
    AverageError,
    average_state_dicts,
    epoch_paths,
    pick_checkpoint,
    refresh_batch_norm,
)

REPO = Path(__file__).resolve().parents[1]


def test_mean_of_float_tensors_and_last_of_counts() -> None:
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(7)}
    c = {"w": torch.tensor([5.0, 1.0]), "n": torch.tensor(9)}
    out = average_state_dicts([a, b, c])
    assert torch.equal(out["w"], torch.tensor([3.0, 3.0]))  # (1+3+5)/3, (2+6+1)/3
    assert int(out["n"]) == 9


def test_different_tensors_refused() -> None:
    with pytest.raises(AverageError, match="different tensors"):
        average_state_dicts([{"w": torch.zeros(1)}, {"v": torch.zeros(1)}])
    with pytest.raises(AverageError, match="no weights"):
        average_state_dicts([])


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.BatchNorm1d(2)
        self.trained = nn.BatchNorm1d(2)
        self.drop = nn.Dropout(0.9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.trained(self.frozen(x)))


def test_batch_norm_refresh_is_the_plain_mean_and_leaves_frozen_layers() -> None:
    model = _Tiny()
    # The frozen layer normalises with fixed statistics: mean 1, variance 4 -> (x - 1) / 2.
    model.frozen.running_mean.fill_(1.0)
    model.frozen.running_var.fill_(4.0)
    model.trained.running_mean.fill_(123.0)
    batches = [torch.tensor([[1.0, 3.0], [5.0, 7.0]]), torch.tensor([[9.0, 11.0], [13.0, 15.0]])]
    assert refresh_batch_norm(model, iter(batches), [model.frozen]) == 1
    # The trained layer sees (x - 1) / 2: columns [0, 2, 4, 6] and [1, 3, 5, 7] (eps aside),
    # so its cumulative means are 3 and 4; with momentum None each batch weighs the same.
    assert torch.allclose(model.trained.running_mean, torch.tensor([3.0, 4.0]), atol=1e-3)
    assert torch.equal(model.frozen.running_mean, torch.tensor([1.0, 1.0]))
    assert torch.equal(model.frozen.running_var, torch.tensor([4.0, 4.0]))
    assert model.trained.momentum == 0.1 and not model.training


def test_pick_by_accuracy_then_loss() -> None:
    assert pick_checkpoint({"a": (0.98, 0.05), "b": (0.99, 0.20)}) == "b"
    assert pick_checkpoint({"a": (0.99, 0.05), "b": (0.99, 0.04)}) == "b"
    assert pick_checkpoint({"a": (0.99, 0.04), "b": (0.99, 0.04)}) == "a"  # full tie: first
    with pytest.raises(AverageError):
        pick_checkpoint({})
    with pytest.raises(AverageError, match="no validation score for b"):
        pick_checkpoint({"a": (0.9, 0.1), "b": (float("nan"), 0.1)})


def test_too_few_epochs(tmp_path: Path) -> None:
    (tmp_path / "epochs").mkdir()
    torch.save({}, tmp_path / "epochs" / "epoch-01.pt")
    with pytest.raises(AverageError, match="holds 1 epoch files, 2 asked for"):
        epoch_paths(tmp_path, 2)
    with pytest.raises(AverageError, match="at least 2"):
        epoch_paths(tmp_path, 1)
    with pytest.raises(AverageError, match="does not exist"):
        epoch_paths(tmp_path / "missing", 2)


def test_epoch_files_in_numeric_order(tmp_path: Path) -> None:
    (tmp_path / "epochs").mkdir()
    for name in ("epoch-99.pt", "epoch-100.pt", "epoch-101.pt", "epoch-100-copy.pt"):
        torch.save({}, tmp_path / "epochs" / name)
    assert [p.name for p in epoch_paths(tmp_path, 2)] == ["epoch-100.pt", "epoch-101.pt"]


@pytest.mark.slow
def test_average_across_a_resume_then_export(shared: Path, tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    from tests.test_training_smoke import MANIFEST, _small_manifest
    from training.cli import average_main, export_main, train_main

    if not MANIFEST.is_file():
        pytest.skip(f"split manifest {MANIFEST} not committed")
    data = ["--data-root", str(shared / "datasets"), "--runs", str(tmp_path / "runs"),
            "--split-manifest", str(_small_manifest(tmp_path))]
    run = tmp_path / "run"
    recipe = ["--epochs", "3", "--batch-size", "8", "--max-steps", "2", "--keep-epochs",
              "--out", str(run)]
    # A tiny time budget stops the run after its first epoch; the resume, with another
    # thread count (a setting a resume may change), trains epochs 2 and 3.
    assert train_main([*data, *recipe, "--time-budget-min", "0.0001"]) == 0
    assert [p.name for p in (run / "epochs").glob("*.pt")] == ["epoch-01.pt"]
    assert train_main([*data, *recipe, "--resume", "--threads", "1"]) == 0
    kept = sorted((run / "epochs").glob("*.pt"))[-2:]
    assert [p.name for p in kept] == ["epoch-02.pt", "epoch-03.pt"]

    assert average_main([*data, "--run", str(run), "--last", "4"]) == 1  # only 3 kept
    for own in ("best.pt", "last.pt", "epochs/epoch-09.pt"):
        caplog.clear()
        assert average_main([*data, "--run", str(run), "--last", "2",
                             "--out", str(run / own)]) == 1
        assert "would replace one of the run's own checkpoints" in caplog.text
    before = (run / "best.pt").read_bytes()
    assert average_main([*data, "--run", str(run), "--last", "3"]) == 0  # across the resume
    # Without --split-manifest the run's own manifest is used.
    no_manifest = data[:-2]
    assert average_main([*no_manifest, "--run", str(run), "--last", "2"]) == 0
    assert (run / "best.pt").read_bytes() == before
    # An existing file that is not an average is never replaced.
    other = tmp_path / "other.pt"
    other.write_bytes(b"someone's file")
    caplog.clear()
    assert average_main([*data, "--run", str(run), "--last", "2", "--out", str(other)]) == 1
    assert "exists and is not an average checkpoint" in caplog.text
    assert other.read_bytes() == b"someone's file"
    assert (run / "average-last3.pt").is_file()

    avg = torch.load(run / "average-last2.pt", map_location="cpu", weights_only=False)
    first, second = (torch.load(p, map_location="cpu", weights_only=False)["model"] for p in kept)
    # AlexNet has no batch norm, so the average is exactly the mean of the two epochs.
    for key, value in avg["model"].items():
        assert torch.allclose(value, (first[key] + second[key]) / 2), key
    assert avg["meta"]["averaged_epochs"] == [2, 3] and avg["epoch"] == 3
    assert 0.0 <= avg["val_acc"] <= 1.0

    onnx_path = tmp_path / "avg.onnx"
    assert export_main([*data, "--checkpoint", str(run / "average-last2.pt"),
                        "--out", str(onnx_path), "--parity-images", "8"]) == 0
    import onnx

    props = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    assert json.loads(props["maskmesh"])["averaged_epochs"] == [2, 3]

    # An epoch file whose weights are not last.pt's (here epoch 2's, renumbered as 3) is
    # refused even though its recipe and number fit.
    forged = torch.load(run / "epochs" / "epoch-02.pt", map_location="cpu", weights_only=False)
    torch.save(dict(forged, epoch=3), run / "epochs" / "epoch-03.pt")
    caplog.clear()
    assert average_main([*data, "--run", str(run), "--last", "2"]) == 1
    assert "does not hold the weights of" in caplog.text

    # A damaged epoch file is named, not a traceback.
    (run / "epochs" / "epoch-03.pt").write_bytes(b"not a checkpoint")
    caplog.clear()
    assert average_main([*data, "--run", str(run), "--last", "2"]) == 1
    assert "epoch-03.pt is not a readable checkpoint" in caplog.text

    # A fresh run into the same folder (stopped after one epoch) removes the old run's
    # epoch files first, so epochs 2 and 3 of the old run cannot be mixed in; files that
    # are not epoch files stay.
    (run / "epochs" / "epoch-02-backup.pt").write_bytes(b"kept")
    assert train_main([*data, *recipe, "--time-budget-min", "0.0001"]) == 0
    assert sorted(p.name for p in (run / "epochs").glob("*.pt")) == ["epoch-01.pt",
                                                                     "epoch-02-backup.pt"]
    # So does a fresh run that keeps no epochs: nothing of the old run is left to average.
    assert train_main([*data, *recipe[:-3], "--out", str(run), "--time-budget-min",
                       "0.0001"]) == 0
    assert [p.name for p in (run / "epochs").glob("*.pt")] == ["epoch-02-backup.pt"]


def test_freeze_backbone_only_where_there_is_one() -> None:
    from training.cli import train_main

    with pytest.raises(SystemExit) as exc:
        train_main(["--arch", "alexnet", "--freeze-backbone"])
    assert exc.value.code == 2
