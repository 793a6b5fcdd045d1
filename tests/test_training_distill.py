"""Knowledge distillation from an ONNX teacher (training/distill.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from onnx import TensorProto, helper  # noqa: E402

from training.data import CLASS_NAMES  # noqa: E402
from training.distill import (  # noqa: E402
    DistillationCriterion,
    OnnxTeacher,
    TeacherError,
    distillation_loss,
)
from training.export import attach_metadata, build_metadata  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "models" / "splits" / "split-seed0-m0.2-w32-d6.json"


def _tiny_teacher(path: Path, weights: np.ndarray, *, class_names=CLASS_NAMES,
                  grayscale: bool = False) -> Path:
    """A file with the exported interface: channel means -> 3x3 linear map -> softmax."""
    nodes = [
        helper.make_node("ReduceMean", ["image"], ["pooled"], axes=[2, 3], keepdims=0),
        helper.make_node("MatMul", ["pooled", "w"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor("w", TensorProto.FLOAT, [3, 3], weights.astype(np.float32).ravel())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    attach_metadata(path, build_metadata("tiny-teacher", "tiny", list(class_names), grayscale,
                                         0.2))
    return path


def test_distillation_loss_worked_values() -> None:
    teacher = torch.tensor([[0.5, 0.25, 0.25]])
    student = torch.log(torch.tensor([[0.25, 0.5, 0.25]]))
    # T = 1: KL = 0.5 ln(0.5/0.25) + 0.25 ln(0.25/0.5) + 0 = 0.25 ln 2.
    assert float(distillation_loss(student, teacher, 1.0)) == pytest.approx(
        0.25 * math.log(2), abs=1e-6)
    # T = 2: softening takes square roots, so the teacher becomes (r, 1/2, 1/2) / z and the
    # student (1/2, r, 1/2) / z, with r = sqrt(1/2) and z = r + 1; then
    # KL = (r - 1/2) ln(2r) / z, and the divergence is scaled by T^2 = 4.
    r = math.sqrt(0.5)
    expected = 4 * (r - 0.5) * math.log(2 * r) / (r + 1)
    assert float(distillation_loss(student, teacher, 2.0)) == pytest.approx(expected, abs=1e-6)
    # A student that already matches the teacher owes nothing, at any temperature.
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    for t in (1.0, 4.0):
        assert float(distillation_loss(torch.log(probs), probs, t)) == pytest.approx(0, abs=1e-6)


def test_teacher_probs_are_the_files_output(tmp_path: Path) -> None:
    w = np.array([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 3.0]])
    teacher = OnnxTeacher(_tiny_teacher(tmp_path / "t.onnx", w), CLASS_NAMES, grayscale=False,
                          threads=1)
    x = torch.zeros(2, 3, 224, 224)
    x[0, 0] = 1.0           # channel means (1, 0, 0) -> logits (2, 0, -1)
    x[1, 2] = 0.5           # channel means (0, 0, 0.5) -> logits (-0.5, 0, 1.5)
    logits = np.array([[2.0, 0.0, -1.0], [-0.5, 0.0, 1.5]])
    expected = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(teacher.probs(x).numpy(), expected, atol=1e-5)
    # Channels-last batches (the EfficientNet recipe) give the same answer.
    cl = x.contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(teacher.probs(cl).numpy(), expected, atol=1e-5)
    assert teacher.info.model_id == "tiny-teacher" and len(teacher.info.sha256) == 16


def test_teacher_that_sees_faces_differently_is_refused(tmp_path: Path) -> None:
    w = np.eye(3)
    swapped = (CLASS_NAMES[1], CLASS_NAMES[0], CLASS_NAMES[2])
    with pytest.raises(TeacherError, match="class_names"):
        OnnxTeacher(_tiny_teacher(tmp_path / "a.onnx", w, class_names=swapped), CLASS_NAMES,
                    grayscale=False)
    with pytest.raises(TeacherError, match="grayscale"):
        OnnxTeacher(_tiny_teacher(tmp_path / "b.onnx", w, grayscale=True), CLASS_NAMES,
                    grayscale=False)
    with pytest.raises(TeacherError, match="not found"):
        OnnxTeacher(tmp_path / "missing.onnx", CLASS_NAMES, grayscale=False)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(TeacherError, match="not a loadable ONNX model"):
        OnnxTeacher(junk, CLASS_NAMES, grayscale=False)
    bare = tmp_path / "bare.onnx"
    _tiny_teacher(bare, w)
    model = onnx.load(str(bare))
    del model.metadata_props[:]
    onnx.save(model, str(bare))
    with pytest.raises(TeacherError, match="no 'maskmesh' metadata"):
        OnnxTeacher(bare, CLASS_NAMES, grayscale=False)


def test_criterion_blends_the_two_terms(tmp_path: Path) -> None:
    teacher = OnnxTeacher(_tiny_teacher(tmp_path / "t.onnx", np.zeros((3, 3))), CLASS_NAMES,
                          grayscale=False, threads=1)
    hard = torch.nn.CrossEntropyLoss()
    logits = torch.tensor([[1.0, 0.0, 0.0]])
    labels = torch.tensor([0])
    x = torch.zeros(1, 3, 224, 224)
    # The zero teacher is uniform: its term is T^2 * KL(uniform || softmax(logits / T)).
    soft = float(distillation_loss(logits, torch.full((1, 3), 1 / 3), 2.0))
    for weight in (0.0, 0.7, 1.0):
        got = float(DistillationCriterion(hard, teacher, weight, 2.0)(logits, labels, x))
        want = (1 - weight) * float(hard(logits, labels)) + weight * soft
        assert got == pytest.approx(want, abs=1e-6)


def test_bad_distillation_settings_are_refused_before_any_data() -> None:
    from training.cli import train_main

    for argv in (["--teacher", "t.onnx", "--distill-weight", "1.5"],
                 ["--teacher", "t.onnx", "--distill-temperature", "0"],
                 ["--arch", "efficientnet_lite0", "--freeze-backbone", "--teacher", "t.onnx"]):
        with pytest.raises(SystemExit) as exc:
            train_main(argv)
        assert exc.value.code == 2


@pytest.mark.slow
def test_distilled_run_records_its_teacher_and_resumes_only_with_it(
        shared: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from tests.test_training_smoke import _small_manifest
    from training.cli import export_main, train_main

    if not MANIFEST.is_file():
        pytest.skip(f"split manifest {MANIFEST} not committed")
    teacher = _tiny_teacher(tmp_path / "teacher.onnx", np.eye(3))
    data = ["--data-root", str(shared / "datasets"), "--runs", str(tmp_path / "runs"),
            "--split-manifest", str(_small_manifest(tmp_path))]
    run = tmp_path / "run"
    recipe = [*data, "--epochs", "2", "--batch-size", "8", "--max-steps", "2",
              "--out", str(run), "--teacher", str(teacher)]
    assert train_main([*recipe, "--time-budget-min", "0.0001"]) == 0   # stops after epoch 1
    state = torch.load(run / "last.pt", map_location="cpu", weights_only=False)
    assert state["epoch"] == 1
    assert state["meta"]["teacher"]["model_id"] == "tiny-teacher"

    # Another file under the same name: the run's soft targets would change mid-way.
    _tiny_teacher(teacher, 2 * np.eye(3))
    assert train_main([*recipe, "--resume"]) == 1
    assert "resume with the same teacher file" in caplog.text
    assert torch.load(run / "last.pt", map_location="cpu", weights_only=False)["epoch"] == 1
    # Resuming without any teacher is refused as well.
    caplog.clear()
    assert train_main([*recipe[:-2], "--resume"]) == 1
    assert "this run's is None" in caplog.text

    _tiny_teacher(teacher, np.eye(3))
    moved = tmp_path / "moved-teacher.onnx"
    teacher.rename(moved)
    assert train_main([*recipe[:-1], str(moved), "--resume"]) == 0   # same content, new path
    assert torch.load(run / "last.pt", map_location="cpu", weights_only=False)["epoch"] == 2

    out = tmp_path / "student.onnx"
    assert export_main([*data, "--checkpoint", str(run / "best.pt"), "--out", str(out),
                        "--parity-images", "8"]) == 0
    model = onnx.load(str(out))
    meta = json.loads(next(p.value for p in model.metadata_props if p.key == "maskmesh"))
    assert meta["teacher"]["model_id"] == "tiny-teacher"
