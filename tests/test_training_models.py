"""Architectures: shapes, parameter counts, and loading torchvision-style AlexNet weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.models import AlexNet, MobileNetV2, count_parameters, load_partial


def test_alexnet_shape_and_size() -> None:
    model = AlexNet(3).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 224, 224)).shape == (2, 3)
    # 2.47 M conv + 2.43 M head parameters: about 19.6 MB in fp32.
    assert count_parameters(model) == 4_895_811


def test_mobilenetv2_shape() -> None:
    with torch.no_grad():
        assert MobileNetV2(3).eval()(torch.zeros(1, 3, 224, 224)).shape == (1, 3)


def test_init_loads_imagenet_convs_and_skips_the_wide_head(tmp_path: Path) -> None:
    """A state dict shaped like torchvision's alexnet-owt file: convs load, head is skipped."""
    reference = AlexNet(3)
    state = {k: torch.randn_like(v) for k, v in reference.state_dict().items()
             if k.startswith("features.")}
    state.update({"classifier.1.weight": torch.zeros(4096, 9216),
                  "classifier.1.bias": torch.zeros(4096),
                  "classifier.4.weight": torch.zeros(4096, 4096),
                  "classifier.4.bias": torch.zeros(4096),
                  "classifier.6.weight": torch.zeros(1000, 4096),
                  "classifier.6.bias": torch.zeros(1000)})
    path = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save(state, path)
    model = AlexNet(3)
    report = load_partial(model, path)
    assert set(report["loaded"]) == {f"features.{i}.{p}" for i in (0, 3, 6, 8, 10)
                                     for p in ("weight", "bias")}
    assert len(report["skipped_shape"]) == 6
    assert torch.equal(model.features[0].weight, state["features.0.weight"])


def test_init_refuses_a_checkpoint_of_another_arch(tmp_path: Path) -> None:
    # The EfficientNet-Lite widths share tensor names and some shapes, so a name-and-shape
    # match alone would load a Lite0 block into a Lite2 block of another stage.
    pytest.importorskip("efficientnet_lite_pytorch")
    from training.models import InitError, build_model

    lite0 = build_model("efficientnet_lite0", 3, pretrained=False)
    path = tmp_path / "best.pt"
    torch.save({"model": lite0.state_dict(), "epoch": 1,
                "meta": {"arch": "efficientnet_lite0"}}, path)
    lite2 = build_model("efficientnet_lite2", 3, pretrained=False)
    with pytest.raises(InitError, match="efficientnet_lite0 checkpoint; this run trains "
                                        "efficientnet_lite2"):
        load_partial(lite2, path, "efficientnet_lite2")
    assert load_partial(lite0, path, "efficientnet_lite0")["loaded"]
