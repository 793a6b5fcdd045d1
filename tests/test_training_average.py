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
    with pytest.raises(AverageError):
        pick_checkpoint({})


def test_too_few_epochs(tmp_path: Path) -> None:
    (tmp_path / "epochs").mkdir()
    torch.save({}, tmp_path / "epochs" / "epoch-01.pt")
    with pytest.raises(AverageError, match="holds 1 epoch files, 2 asked for"):
        epoch_paths(tmp_path, 2)
    with pytest.raises(AverageError, match="at least 2"):
        epoch_paths(tmp_path, 1)


@pytest.mark.slow
def test_average_two_epochs_then_export(shared: Path, tmp_path: Path) -> None:
    from tests.test_training_smoke import MANIFEST, _small_manifest
    from training.cli import average_main, export_main, train_main

    if not MANIFEST.is_file():
        pytest.skip(f"split manifest {MANIFEST} not committed")
    data = ["--data-root", str(shared / "datasets"), "--runs", str(tmp_path / "runs"),
            "--split-manifest", str(_small_manifest(tmp_path))]
    run = tmp_path / "run"
    assert train_main([*data, "--epochs", "2", "--batch-size", "8", "--max-steps", "2",
                       "--keep-epochs", "--out", str(run)]) == 0
    kept = sorted((run / "epochs").glob("*.pt"))
    assert [p.name for p in kept] == ["epoch-01.pt", "epoch-02.pt"]
    assert average_main([*data, "--run", str(run), "--last", "3"]) == 1  # only 2 kept
    assert average_main([*data, "--run", str(run), "--last", "2"]) == 0

    avg = torch.load(run / "average.pt", map_location="cpu", weights_only=False)
    first, second = (torch.load(p, map_location="cpu", weights_only=False)["model"] for p in kept)
    # AlexNet has no batch norm, so the average is exactly the mean of the two epochs.
    for key, value in avg["model"].items():
        assert torch.allclose(value, (first[key] + second[key]) / 2), key
    assert avg["meta"]["averaged_epochs"] == [1, 2] and avg["epoch"] == 2
    assert 0.0 <= avg["val_acc"] <= 1.0

    onnx_path = tmp_path / "avg.onnx"
    assert export_main([*data, "--checkpoint", str(run / "average.pt"), "--out", str(onnx_path),
                        "--parity-images", "8"]) == 0
    import onnx

    props = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    assert json.loads(props["maskmesh"])["averaged_epochs"] == [1, 2]
