"""Knowledge distillation from an ONNX teacher (training/distill.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

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
                  grayscale: bool = False, face_margin: float = 0.2, softmax: bool = True,
                  times: float | None = None, batch: int | str = "batch") -> Path:
    """A file with the exported interface: channel means -> linear map -> softmax.

    ``softmax=False`` leaves logits in the output, ``times`` multiplies it by a constant
    (NaN, say), ``batch`` fixes the batch size.
    """
    classes = weights.shape[1]
    nodes = [
        helper.make_node("ReduceMean", ["image"], ["pooled"], axes=[2, 3], keepdims=0),
        helper.make_node("MatMul", ["pooled", "w"], ["logits"]),
    ]
    last = "logits"
    if softmax:
        nodes.append(helper.make_node("Softmax", [last], ["soft"], axis=1))
        last = "soft"
    init = [numpy_helper.from_array(weights.astype(np.float32), "w")]
    if times is not None:
        init.append(helper.make_tensor("k", TensorProto.FLOAT, [], [times]))
        nodes.append(helper.make_node("Mul", [last, "k"], ["scaled"]))
        last = "scaled"
    nodes.append(helper.make_node("Identity", [last], ["probs"]))
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 3, 224, 224])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [batch, classes])], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    attach_metadata(path, build_metadata("tiny-teacher", "tiny", list(class_names), grayscale,
                                         face_margin))
    return path


def _open(path: Path, **kwargs) -> OnnxTeacher:
    return OnnxTeacher(path, CLASS_NAMES, **{"grayscale": False, "face_margin": 0.2,
                                             "threads": 1, **kwargs})


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
    teacher = _open(_tiny_teacher(tmp_path / "t.onnx", w))
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
        _open(_tiny_teacher(tmp_path / "a.onnx", w, class_names=swapped))
    with pytest.raises(TeacherError, match="grayscale"):
        _open(_tiny_teacher(tmp_path / "b.onnx", w, grayscale=True))
    with pytest.raises(TeacherError, match="face_margin is 0.6"):
        _open(_tiny_teacher(tmp_path / "c.onnx", w, face_margin=0.6))
    with pytest.raises(TeacherError, match="not found"):
        _open(tmp_path / "missing.onnx")
    with pytest.raises(TeacherError, match="not a regular file"):
        _open(tmp_path)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(TeacherError, match="not a loadable ONNX model"):
        _open(junk)
    bare = tmp_path / "bare.onnx"
    _tiny_teacher(bare, w)
    model = onnx.load(str(bare))
    del model.metadata_props[:]
    onnx.save(model, str(bare))
    with pytest.raises(TeacherError, match="no 'maskmesh' metadata"):
        _open(bare)


def test_teacher_that_gives_no_probabilities_is_refused_at_once(tmp_path: Path) -> None:
    w = np.eye(3)
    with pytest.raises(TeacherError, match="non-finite"):
        _open(_tiny_teacher(tmp_path / "nan.onnx", w, times=float("nan")))
    with pytest.raises(TeacherError, match="not probabilities"):
        _open(_tiny_teacher(tmp_path / "logits.onnx", 20 * w - 10, softmax=False))
    with pytest.raises(TeacherError, match="not probabilities"):
        _open(_tiny_teacher(tmp_path / "zeros.onnx", w, times=0.0))
    # Two probabilities for three class names: the loader's own check finds it.
    with pytest.raises(TeacherError, match=r"returns shape \[1, 2\] for one face"):
        _open(_tiny_teacher(tmp_path / "two.onnx", np.ones((3, 2))))
    with pytest.raises(TeacherError, match=r"does not take one 224x224 face"):
        _open(_tiny_teacher(tmp_path / "fixed2.onnx", w, batch=2))
    # Fixed at one face: passes the loader's probe, fails on the teacher's batch of two.
    with pytest.raises(TeacherError, match=r"failed on a batch of shape \[2, 3, 224, 224\]"):
        _open(_tiny_teacher(tmp_path / "one.onnx", w, batch=1))


def test_teacher_with_external_weights_is_refused(tmp_path: Path) -> None:
    inline = _tiny_teacher(tmp_path / "inline.onnx", np.eye(3))
    model = onnx.load(str(inline))
    onnx.save(model, str(tmp_path / "ext.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="ext.data", size_threshold=0)
    with pytest.raises(TeacherError, match="external data"):
        _open(tmp_path / "ext.onnx")
    # The same weights as a Constant node's attribute, stored outside the file.
    model = onnx.load(str(inline))
    weight = model.graph.initializer[0]
    model.graph.node.insert(0, helper.make_node("Constant", [], [weight.name], value=weight))
    del model.graph.initializer[:]
    onnx.save(model, str(tmp_path / "const.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="const.data", size_threshold=0,
              convert_attribute=True)
    with pytest.raises(TeacherError, match="external data"):
        _open(tmp_path / "const.onnx")


def test_string_grayscale_metadata_is_refused(tmp_path: Path) -> None:
    from services.inference.classifier import ModelLoadError, parse_metadata

    meta = build_metadata("m", "tiny", list(CLASS_NAMES), False, 0.2)
    with pytest.raises(ModelLoadError, match="grayscale must be true or false"):
        parse_metadata(tmp_path, json.dumps({**meta, "grayscale": "false"}))
    assert parse_metadata(tmp_path, json.dumps(meta)).grayscale is False


def test_criterion_blends_the_two_terms(tmp_path: Path) -> None:
    teacher = _open(_tiny_teacher(tmp_path / "t.onnx", np.zeros((3, 3))))
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
                 ["--teacher", "t.onnx", "--distill-weight", "nan"],
                 ["--teacher", "t.onnx", "--distill-weight", "0"],   # the teacher unused
                 ["--teacher", "t.onnx", "--distill-temperature", "0"],
                 ["--teacher", "t.onnx", "--distill-temperature", "inf"],
                 ["--distill-weight", "0.5"],          # no teacher to distil from
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
    assert "trained with teacher sha256" in caplog.text
    assert torch.load(run / "last.pt", map_location="cpu", weights_only=False)["epoch"] == 1
    # Resuming without any teacher is refused as well.
    caplog.clear()
    assert train_main([*recipe[:-2], "--resume"]) == 1
    assert "this run is without a teacher" in caplog.text

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

    caplog.clear()
    torch.save({"meta": "damaged"}, run / "last.pt")
    assert train_main([*recipe[:-1], str(moved), "--epochs", "3", "--resume"]) == 1
    assert "is not a maskmesh training checkpoint" in caplog.text


class _NanNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w * float("nan") + x.mean((2, 3))


def test_a_non_finite_loss_stops_the_run() -> None:
    from training.prepare import SplitData
    from training.train import TrainConfig, train_one_epoch

    model = _NanNet()
    data = SplitData(np.zeros((4, 256, 256, 3), np.uint8), np.array([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="epoch 1, step 1: the loss is nan"):
        train_one_epoch(model, data, torch.optim.Adam(model.parameters()),
                        torch.nn.CrossEntropyLoss(), TrainConfig(batch_size=2),
                        torch.Generator().manual_seed(0), 1)


def test_parity_fails_on_nan(tmp_path: Path) -> None:
    from training.export import ExportError, check_parity

    path = _tiny_teacher(tmp_path / "t.onnx", np.eye(3))
    batch = np.zeros((2, 3, 224, 224), np.float32)
    with pytest.raises(ExportError, match="differ from PyTorch by nan"):
        check_parity(_NanNet().eval(), path, batch)
