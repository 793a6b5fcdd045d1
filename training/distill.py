"""Knowledge distillation: a student learns from a teacher model's soft predictions.

Hinton et al.'s recipe: the loss blends the cross-entropy on the labels with the
Kullback-Leibler divergence between the teacher's and the student's class distributions,
both softened by a temperature ``T`` and the divergence scaled by ``T**2`` so its gradients
keep their size as ``T`` changes. The teacher is an ONNX file exported by
``maskmesh export``, run by ONNX Runtime on the very batch the student sees, augmentation
included. Its use: passing what a stronger network learnt (the EfficientNet-Lite0 default)
to the design's AlexNet, which has no ImageNet weights here.

Limitation: the teacher runs on every training batch, so an epoch costs one teacher
forward pass more (for the EfficientNet-Lite0 teacher on 2 cores, about 40 s); its outputs
cannot be cached, since each batch is augmented afresh.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from training.card import sha256
from training.export import build_metadata

if TYPE_CHECKING:
    from services.inference.classifier import ModelInfo

logger = logging.getLogger(__name__)


class TeacherError(ValueError):
    """The teacher file cannot be read or does not see faces the way the student does."""


@dataclass(frozen=True)
class TeacherInfo:
    """What a checkpoint records of its teacher.

    Args:
        model_id: the teacher's model id (its metadata).
        sha256: the first 16 hex digits of the teacher file's sha256.
    """

    model_id: str
    sha256: str


# The temperatures ``--distill-temperature`` accepts: outside, T**2 or the softened
# distributions overflow or flatten to nothing in float32.
TEMPERATURE_RANGE = (0.05, 100.0)
# How far a teacher's output row may sum away from 1 and still count as probabilities.
_SUM_TOLERANCE = 1e-3


def check_distill_settings(weight: float, temperature: float) -> None:
    """Raise ValueError unless the weight is in (0, 1] and the temperature in range.

    A weight of 0 would run the teacher on every batch for nothing and record a teacher
    that had no effect, so it is refused: train without ``--teacher`` instead.
    """
    if not 0.0 < weight <= 1.0:  # False for NaN too
        raise ValueError(f"distill weight must lie in (0, 1], not {weight} (train without "
                         "a teacher for 0)")
    low, high = TEMPERATURE_RANGE
    if not low <= temperature <= high:
        raise ValueError(f"distill temperature must lie in [{low}, {high}], not {temperature}")


class OnnxTeacher:
    """Class probabilities of an exported model on normalised training batches.

    Args:
        path: the teacher's ``.onnx`` file (fp32 or int8), weights inside the file.
        class_names: the student's classes, in its order; the teacher must have the same.
        grayscale: whether the student trains on grey-scale input.
        face_margin: the margin the student's face crops were cut with.
        threads: ONNX Runtime intra-op threads.
    """

    def __init__(self, path: Path, class_names: tuple[str, ...] | list[str], grayscale: bool,
                 face_margin: float, threads: int = 2) -> None:
        # Imported here: training may use the services' classifier, never the reverse.
        from services.inference.classifier import MaskClassifier, ModelLoadError

        if not path.exists():
            raise TeacherError(f"teacher model not found: {path}")
        if not path.is_file():
            raise TeacherError(f"teacher {path}: is not a regular file")
        _refuse_external_data(path)
        try:
            # The services' loader: it parses the metadata and checks the graph against it.
            self._model = MaskClassifier(path, intra_op_threads=threads)
        except ModelLoadError as exc:
            raise TeacherError(f"teacher {exc}") from exc
        meta = self._model.info
        self.path = path
        self._classes = len(class_names)
        # The student will be exported with this metadata: the teacher must match it.
        student = build_metadata("student", "student", list(class_names), grayscale,
                                 face_margin)
        self._input_size = int(student["input_size"])
        self._check_preprocessing(meta, student)
        self._manifest_digest = meta.extra.get("manifest_digest")
        # One face went through at load; two more, as the graph must take any batch size
        # the student trains with; check_batch_sizes tries the run's own sizes later.
        self.check_batch_sizes([2])
        self.info = TeacherInfo(model_id=meta.model_id, sha256=sha256(path)[:16])
        logger.info("teacher %s (%s) from %s", meta.model_id, meta.arch, path)

    def warn_if_other_split(self, manifest_digest: str) -> None:
        """Warn when the teacher was trained on another split than the student's.

        Allowed, since a teacher may come from elsewhere, but such a teacher may have
        trained on the student's validation faces, which then flatter the student.
        """
        if self._manifest_digest not in (None, manifest_digest):
            logger.warning("teacher %s was trained on another split (manifest digest %s, the "
                           "student's %s): it may have seen the student's validation faces",
                           self.path, self._manifest_digest, manifest_digest)

    def _check_preprocessing(self, meta: ModelInfo, student: dict[str, Any]) -> None:
        """The teacher is fed the student's batch, so it must expect the same tensor."""
        for key in ("class_names", "input_size", "resize", "color_order", "grayscale", "mean",
                    "std", "scale", "face_margin"):
            got, wanted = getattr(meta, key), student[key]
            if key in ("mean", "std", "scale", "face_margin"):
                same = bool(np.allclose(got, wanted, rtol=1e-6, atol=1e-6))
            else:
                same = tuple(got) == tuple(wanted) if key == "class_names" else got == wanted
            if not same:
                raise TeacherError(f"teacher {self.path}: its {key} is {got!r}, the student's "
                                   f"is {wanted!r}; a teacher must see faces cut and normalised "
                                   "as the student's and name the same classes in the same "
                                   "order")

    def check_batch_sizes(self, sizes: list[int]) -> None:
        """Run the teacher once on zero batches of these sizes; raises TeacherError."""
        for n in sorted(set(sizes)):
            if n > 0:
                self.probs(torch.zeros(n, 3, self._input_size, self._input_size))

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher class probabilities for a normalised ``N x 3 x S x S`` batch.

        Raises TeacherError when the graph fails or does not return one probability row
        per face: soft targets that are not probabilities would train the student silently
        wrong (a NaN one turns every weight NaN).
        """
        batch = np.ascontiguousarray(x.detach().numpy(), dtype=np.float32)
        try:
            out = self._model.predict_probs(batch)
        except Exception as exc:  # ORT's errors share no base class worth naming
            raise TeacherError(f"teacher {self.path}: failed on a batch of shape "
                               f"{list(batch.shape)}: {exc}") from exc
        out = np.asarray(out, dtype=np.float32)
        if out.shape != (len(batch), self._classes):
            raise TeacherError(f"teacher {self.path}: returned shape {list(out.shape)} for "
                               f"{len(batch)} faces, not {[len(batch), self._classes]}")
        if not np.isfinite(out).all():
            raise TeacherError(f"teacher {self.path}: returned non-finite probabilities")
        sums = out.sum(axis=1)
        if (out < 0).any() or np.abs(sums - 1).max() > _SUM_TOLERANCE:
            raise TeacherError(f"teacher {self.path}: its output is not probabilities (rows "
                               f"sum to {sums.min():.4g}..{sums.max():.4g}, minimum "
                               f"{out.min():.4g}); export it with `maskmesh export`")
        return torch.from_numpy(out)


def _graph_tensors(graph: onnx.GraphProto) -> list[onnx.TensorProto]:
    """Every tensor a graph holds: initialisers, sparse ones, and node attributes, with
    the subgraphs of control-flow nodes walked as well."""
    tensors = list(graph.initializer)
    for sparse in graph.sparse_initializer:
        tensors += [sparse.values, sparse.indices]
    for node in graph.node:
        for attr in node.attribute:
            tensors += ([attr.t] if attr.HasField("t") else []) + list(attr.tensors)
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                tensors += _graph_tensors(sub)
    return tensors


def _refuse_external_data(path: Path) -> None:
    """A teacher's weights must sit in its file: only the file's digest is recorded."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf decode errors have no common public type
        raise TeacherError(f"teacher {path}: not a loadable ONNX model: {exc}") from exc
    external = [t.name or "(unnamed)" for t in _graph_tensors(model.graph)
                if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise TeacherError(f"teacher {path}: keeps {len(external)} tensors in external data "
                           f"files (e.g. {external[0]!r}); save it as one file, since a resumed "
                           "run checks only the file's digest")


def distillation_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """``T**2 * KL(teacher_T || student_T)``, batch mean, both softened by ``T``.

    The teacher gives probabilities, not logits; ``log p`` differs from its logits by a
    constant per face, which a softmax ignores, so ``softmax(log p / T)`` is the teacher's
    softened distribution.
    """
    log_teacher = torch.log(teacher_probs.clamp_min(1e-8)) / temperature
    target = torch.softmax(log_teacher, dim=1)
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    return F.kl_div(log_student, target, reduction="batchmean") * temperature ** 2


class DistillationCriterion(nn.Module):
    """``(1 - weight) * label loss + weight * distillation loss``.

    Args:
        label_criterion: the loss on the labels (the class-weighted cross-entropy).
        teacher: gives the soft targets for each batch.
        weight: share of the distillation term, in [0, 1].
        temperature: softening temperature, > 0.
    """

    def __init__(self, label_criterion: nn.Module, teacher: OnnxTeacher, weight: float,
                 temperature: float) -> None:
        super().__init__()
        self.label_criterion = label_criterion
        self.teacher = teacher
        self.weight = weight
        self.temperature = temperature

    def forward(self, logits: torch.Tensor, labels: torch.Tensor,
                x: torch.Tensor) -> torch.Tensor:
        """The blended loss of one batch; ``x`` is the batch the student saw."""
        hard = self.label_criterion(logits, labels)
        soft = distillation_loss(logits, self.teacher.probs(x), self.temperature)
        return (1 - self.weight) * hard + self.weight * soft
