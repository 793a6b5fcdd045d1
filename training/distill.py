"""Knowledge distillation: a student learns from a teacher model's soft predictions.

Hinton et al.'s recipe: the loss blends the cross-entropy on the labels with the
Kullback-Leibler divergence between the teacher's and the student's class distributions,
both softened by a temperature ``T`` and the divergence scaled by ``T**2`` so its gradients
keep their size as ``T`` changes. The teacher is an ONNX file exported by
``maskmesh export``, run by ONNX Runtime on the very batch the student sees, augmentation
included. Its use: passing what a stronger network learnt (the EfficientNet-Lite0 default)
to the design's AlexNet, which has no ImageNet weights here.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

from training.augment import IMAGENET_MEAN, IMAGENET_STD
from training.card import sha256

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


class OnnxTeacher:
    """Class probabilities of an exported model on normalised training batches.

    Args:
        path: the teacher's ``.onnx`` file (fp32 or int8).
        class_names: the student's classes, in its order; the teacher must have the same.
        grayscale: whether the student trains on grey-scale input.
        input_size: the student's input side in pixels.
        threads: ONNX Runtime intra-op threads.
    """

    def __init__(self, path: Path, class_names: tuple[str, ...] | list[str], grayscale: bool,
                 input_size: int = 224, threads: int = 2) -> None:
        # Imported here: training may read the services' metadata parser, never the reverse.
        from services.inference.classifier import METADATA_KEY, ModelLoadError, parse_metadata

        if not path.is_file():
            raise TeacherError(f"teacher model not found: {path}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        try:
            self._session = ort.InferenceSession(str(path), opts,
                                                 providers=["CPUExecutionProvider"])
            raw = self._session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
            meta = parse_metadata(path, raw)
        except ModelLoadError as exc:
            raise TeacherError(f"teacher {exc}") from exc
        except Exception as exc:  # ORT raises several unrelated types for a bad file
            raise TeacherError(f"teacher {path}: not a loadable ONNX model: {exc}") from exc
        self._check_preprocessing(path, meta, tuple(class_names), grayscale, input_size)
        self._input, self._output = meta.input_name, meta.output_name
        self.info = TeacherInfo(model_id=meta.model_id, sha256=sha256(path)[:16])
        logger.info("teacher %s (%s) from %s", meta.model_id, meta.arch, path)

    @staticmethod
    def _check_preprocessing(path: Path, meta: ModelInfo, class_names: tuple[str, ...],
                             grayscale: bool, input_size: int) -> None:
        """The teacher is fed the student's batch, so it must expect the same tensor."""
        wanted: dict[str, Any] = {"class_names": class_names, "input_size": input_size,
                  "color_order": "RGB", "grayscale": grayscale,
                  "mean": tuple(IMAGENET_MEAN), "std": tuple(IMAGENET_STD)}
        got: dict[str, Any] = {"class_names": meta.class_names, "input_size": meta.input_size,
               "color_order": meta.color_order, "grayscale": meta.grayscale,
               "mean": meta.mean, "std": meta.std}
        for key, value in wanted.items():
            same = (np.allclose(got[key], value, atol=1e-6) if key in ("mean", "std")
                    else got[key] == value)
            if not same:
                raise TeacherError(f"teacher {path}: its {key} is {got[key]!r}, the student's "
                                   f"is {value!r}; a teacher must take the same input and "
                                   "name the same classes in the same order")
        if not math.isclose(meta.scale, 1 / 255, rel_tol=1e-6):
            raise TeacherError(f"teacher {path}: its scale is {meta.scale!r}, the student's "
                               "is 1/255")

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher class probabilities for a normalised ``N x 3 x S x S`` batch."""
        batch = np.ascontiguousarray(x.detach().numpy(), dtype=np.float32)
        out = self._session.run([self._output], {self._input: batch})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32))


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
