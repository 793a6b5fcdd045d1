"""ONNX export: parity with PyTorch, metadata, and the classifier reading it back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from training.export import ExportError, build_metadata, check_parity, export_onnx


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


@pytest.fixture
def tiny_onnx(tmp_path: Path) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    model = Tiny().eval()
    path = tmp_path / "tiny.onnx"
    meta = build_metadata("tiny-test", "tiny", ["mask", "no_mask", "incorrect"], False, 0.2)
    export_onnx(model, path, meta)
    return model, path


def test_export_parity_dynamic_batch_and_metadata(tiny_onnx: tuple[nn.Module, Path]) -> None:
    import onnx

    model, path = tiny_onnx
    for n in (1, 5):
        batch = np.random.default_rng(n).standard_normal((n, 3, 224, 224)).astype(np.float32)
        assert check_parity(model, path, batch) < 1e-4
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    meta = json.loads(props["maskmesh"])
    assert meta["class_names"] == ["mask", "no_mask", "incorrect"]
    assert meta["input_name"] == "image" and meta["output_name"] == "probs"
    assert meta["resize"] == 256 and meta["input_size"] == 224 and meta["threshold"] == 0.8


def test_parity_failure_raises(tiny_onnx: tuple[nn.Module, Path]) -> None:
    model, path = tiny_onnx
    with torch.no_grad():
        model.fc.bias[0] += 1.0  # the graph no longer matches the module
    batch = np.zeros((2, 3, 224, 224), np.float32)
    with pytest.raises(ExportError, match="differ"):
        check_parity(model, path, batch)


def test_classifier_reads_exported_model(tiny_onnx: tuple[nn.Module, Path]) -> None:
    from services.inference.classifier import MaskClassifier, Prediction

    model, path = tiny_onnx
    clf = MaskClassifier(path)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in ((90, 70), (300, 400))]
    batch = clf.preprocess(images)
    assert batch.shape == (2, 3, 224, 224) and batch.dtype == np.float32
    assert batch.flags["C_CONTIGUOUS"]
    preds = clf.predict(batch)
    assert all(isinstance(p, Prediction) for p in preds)
    assert abs(sum(preds[0].probs.values()) - 1) < 1e-5
    assert preds[0].p_mask == preds[0].probs["mask"]
    with torch.no_grad():
        expected = torch.softmax(model(torch.from_numpy(batch)), 1).numpy()
    assert np.abs(clf.predict_probs(batch) - expected).max() < 1e-5


def test_classifier_preprocess_matches_training_transform(
        tiny_onnx: tuple[nn.Module, Path]) -> None:
    """The service's numpy preprocessing equals the training cache + centre-crop path."""
    import cv2

    from services.inference.classifier import MaskClassifier
    from training.data import to_square
    from training.export import normalised_batch

    clf = MaskClassifier(tiny_onnx[1])
    image = np.random.default_rng(1).integers(0, 255, (180, 150, 3), dtype=np.uint8)
    cached = cv2.cvtColor(to_square(image, 256), cv2.COLOR_BGR2RGB)[None]
    assert np.abs(clf.preprocess([image]) - normalised_batch(cached, False)).max() < 1e-5


def test_classifier_errors_name_the_file(tmp_path: Path) -> None:
    import onnx

    from services.inference.classifier import MaskClassifier, ModelLoadError

    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a model")
    with pytest.raises(ModelLoadError, match="junk.onnx"):
        MaskClassifier(junk)
    with pytest.raises(ModelLoadError, match="not found"):
        MaskClassifier(tmp_path / "missing.onnx")

    bare = tmp_path / "bare.onnx"
    torch.onnx.export(Tiny().eval(), (torch.zeros(1, 3, 224, 224),), str(bare),
                      input_names=["image"], output_names=["probs"], dynamo=False)
    with pytest.raises(ModelLoadError, match="bare.onnx.*no 'maskmesh'"):
        MaskClassifier(bare)
    model = onnx.load(str(bare))
    entry = model.metadata_props.add()
    entry.key, entry.value = "maskmesh", "{not json"
    onnx.save(model, str(bare))
    with pytest.raises(ModelLoadError, match="not JSON"):
        MaskClassifier(bare)


def test_classifier_whose_metadata_does_not_fit_its_graph_fails_at_load(
        tiny_onnx: tuple[nn.Module, Path], tmp_path: Path) -> None:
    import json

    import onnx

    from services.inference.classifier import MaskClassifier, ModelLoadError
    from training.export import attach_metadata

    _, path = tiny_onnx
    meta = json.loads(onnx.load(str(path)).metadata_props[0].value)
    MaskClassifier(path)  # as exported: loads
    cases = {"input_name": ({"input_name": "nope"}, "metadata names input 'nope'"),
             "output_name": ({"output_name": "nope"}, "output 'nope'"),
             "input_size": ({"input_size": 300, "resize": 320}, "does not take one 300x300"),
             "classes": ({"class_names": ["mask", "no_mask"], "mask_class": "mask"},
                         r"returns shape \[1, 3\] for one face, not \[1, 2\]")}
    for name, (change, message) in cases.items():
        broken = tmp_path / f"{name}.onnx"
        broken.write_bytes(path.read_bytes())
        attach_metadata(broken, {**meta, **change})
        with pytest.raises(ModelLoadError, match=message):
            MaskClassifier(broken)


def test_init_from_exported_onnx_restores_the_weights(tiny_onnx: tuple[nn.Module, Path]) -> None:
    from training.models import load_partial

    model, path = tiny_onnx
    fresh = Tiny()
    report = load_partial(fresh, path)
    assert sorted(report["loaded"]) == ["conv.bias", "conv.weight", "fc.bias", "fc.weight"]
    assert report["missing"] == []
    for name, tensor in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name


def test_init_from_onnx_refuses_a_model_it_only_partly_covers(
        tiny_onnx: tuple[nn.Module, Path]) -> None:
    from training.models import InitError, load_partial

    _, path = tiny_onnx
    bigger = Tiny()
    bigger.extra = nn.Linear(3, 3)  # a parameter the export does not hold
    with pytest.raises(InitError, match="lacks 2 of the model's parameters"):
        load_partial(bigger, path)


def test_efficientnet_lite2_exports_with_parity_and_loads_in_the_service(tmp_path: Path) -> None:
    pytest.importorskip("efficientnet_lite_pytorch")
    from services.inference.classifier import MaskClassifier
    from training.models import build_model

    torch.manual_seed(0)
    model = build_model("efficientnet_lite2", 3, pretrained=False).eval()
    path = tmp_path / "lite2.onnx"
    meta = build_metadata("lite2-test", "efficientnet_lite2",
                          ["mask", "no_mask", "incorrect"], False, 0.2)
    export_onnx(model, path, meta)

    batch = np.random.default_rng(2).standard_normal((3, 3, 224, 224)).astype(np.float32)
    assert check_parity(model, path, batch) < 1e-4
    classifier = MaskClassifier(path)
    assert classifier.model_id == "lite2-test"
