"""Mask / no-mask classification of face crops with an ONNX model.

The model file carries everything preprocessing needs in its ``maskmesh`` metadata entry
(input size, resize, mean/std, colour order, class names), so a new model never needs a
code change here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnxruntime as ort

logger = logging.getLogger(__name__)

METADATA_KEY = "maskmesh"
REQUIRED_FIELDS = ("model_id", "class_names", "mask_class", "input_size", "resize", "mean",
                   "std", "color_order", "scale", "input_name", "output_name")
# ITU-R BT.601 luma, the weights the training grey-scale option uses.
_GREY_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class ModelLoadError(RuntimeError):
    """The model file is missing, not an ONNX model, or lacks valid ``maskmesh`` metadata."""


@dataclass(frozen=True)
class Prediction:
    """One face's verdict.

    Args:
        label: most probable class (``mask``, ``no_mask`` or ``incorrect``).
        p_mask: probability of the mask class.
        probs: probability per class name.
    """

    label: str
    p_mask: float
    probs: dict[str, float]

    def is_violation(self, threshold: float) -> bool:
        """A face violates the rule when it is not confidently masked."""
        return self.p_mask < threshold


@dataclass(frozen=True)
class ModelInfo:
    """The parsed ``maskmesh`` metadata of a model file."""

    model_id: str
    arch: str
    class_names: tuple[str, ...]
    mask_class: str
    input_size: int
    resize: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    color_order: str
    scale: float
    grayscale: bool
    face_margin: float
    threshold: float
    input_name: str
    output_name: str
    extra: dict[str, Any]


def _per_channel(values: object, name: str) -> tuple[float, float, float]:
    """Three floats, one per colour channel; raises ValueError naming the field."""
    if not isinstance(values, list | tuple) or len(values) != 3:
        raise ValueError(f"{name} needs 3 values, one per colour channel, not {values!r}")
    return float(values[0]), float(values[1]), float(values[2])


def parse_metadata(path: Path, raw: str | None) -> ModelInfo:
    """Parse and check a model file's ``maskmesh`` metadata JSON; raises ModelLoadError."""
    if raw is None:
        raise ModelLoadError(f"{path}: no '{METADATA_KEY}' metadata entry; export it with "
                             "`maskmesh export`")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path}: '{METADATA_KEY}' metadata is not JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise ModelLoadError(f"{path}: '{METADATA_KEY}' metadata is not a JSON object")
    missing = [k for k in REQUIRED_FIELDS if k not in meta]
    if missing:
        raise ModelLoadError(f"{path}: metadata lacks {', '.join(missing)}")
    if not isinstance(meta.get("grayscale", False), bool):
        # bool("false") is True: a string here would flip the preprocessing silently.
        raise ModelLoadError(f"{path}: metadata grayscale must be true or false, not "
                             f"{meta['grayscale']!r}")
    try:
        info = ModelInfo(
            model_id=str(meta["model_id"]), arch=str(meta.get("arch", "")),
            class_names=tuple(str(c) for c in meta["class_names"]),
            mask_class=str(meta["mask_class"]), input_size=int(meta["input_size"]),
            resize=int(meta["resize"]), mean=_per_channel(meta["mean"], "mean"),
            std=_per_channel(meta["std"], "std"), color_order=str(meta["color_order"]),
            scale=float(meta["scale"]), grayscale=bool(meta.get("grayscale", False)),
            face_margin=float(meta.get("face_margin", 0.0)),
            threshold=float(meta.get("threshold", 0.8)), input_name=str(meta["input_name"]),
            output_name=str(meta["output_name"]),
            extra={k: v for k, v in meta.items() if k not in ModelInfo.__dataclass_fields__},
        )
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"{path}: malformed metadata: {exc}") from exc
    if info.mask_class not in info.class_names:
        raise ModelLoadError(f"{path}: mask_class {info.mask_class!r} not in class_names")
    if info.color_order not in ("RGB", "BGR"):
        raise ModelLoadError(f"{path}: color_order must be RGB or BGR, not "
                             f"{info.color_order!r}")
    if info.resize < info.input_size:
        raise ModelLoadError(f"{path}: resize {info.resize} is below input_size")
    return info


class MaskClassifier:
    """Classifies BGR face crops with an ONNX model exported by ``maskmesh export``.

    Safe to share between threads: ``preprocess`` and ``predict`` keep no per-call state on
    the instance, and an ONNX Runtime session may be run from several threads.

    Args:
        model_path: the ``.onnx`` file.
        intra_op_threads: ONNX Runtime intra-op threads (0 lets it choose).
    """

    def __init__(self, model_path: str | Path, intra_op_threads: int = 1) -> None:
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise ModelLoadError(f"model file not found: {self.model_path}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = 1
        # Spinning intra-op threads wait busily after each call; on a small machine they
        # take the cores the worker's own threads (network, decoding) and the broker need,
        # which doubled the CPU per face and tripled p99 latency (docs/benchmarks.md).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(str(self.model_path), opts,
                                                 providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises several unrelated types for a bad file
            raise ModelLoadError(f"{self.model_path}: not a loadable ONNX model: {exc}") from exc
        raw = self._session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        self.info = parse_metadata(self.model_path, raw)
        self._mask_index = self.info.class_names.index(self.info.mask_class)
        self._check_graph()

        # Fold scale, mean and std into one multiply-add per channel.
        std = np.array(self.info.std, dtype=np.float32)
        self._mul = (self.info.scale / std).astype(np.float32)
        self._add = (-np.array(self.info.mean, dtype=np.float32) / std).astype(np.float32)
        # uint8 -> normalised float as one table per channel: the same float32 arithmetic
        # as (v * mul + add), done 256 times instead of once per pixel.
        levels = np.arange(256, dtype=np.float32)
        self._lut = [levels * self._mul[c] + self._add[c] for c in range(3)]
        self._offset = (self.info.resize - self.info.input_size) // 2
        logger.info("loaded model %s (%s, classes %s) from %s", self.info.model_id,
                    self.info.arch, ",".join(self.info.class_names), self.model_path)

    def _check_graph(self) -> None:
        """The graph takes and gives what the metadata says, checked on one blank face.

        Without this a file whose metadata does not fit its graph loads, and then every
        face fails in the worker and goes to the dead-letter topic.
        """
        inputs = [i.name for i in self._session.get_inputs()]
        outputs = [o.name for o in self._session.get_outputs()]
        if self.info.input_name not in inputs or self.info.output_name not in outputs:
            raise ModelLoadError(
                f"{self.model_path}: metadata names input {self.info.input_name!r} and output "
                f"{self.info.output_name!r}; the graph has inputs {inputs} and outputs {outputs}")
        n = self.info.input_size
        try:
            probs = self._session.run([self.info.output_name], {
                self.info.input_name: np.zeros((1, 3, n, n), np.float32)})[0]
        except Exception as exc:  # ORT's errors share no base class worth naming
            raise ModelLoadError(f"{self.model_path}: the graph does not take one "
                                 f"{n}x{n} face as its metadata says: {exc}") from exc
        classes = len(self.info.class_names)
        if np.shape(probs) != (1, classes):
            raise ModelLoadError(f"{self.model_path}: the graph returns shape "
                                 f"{list(np.shape(probs))} for one face, not [1, {classes}] "
                                 "(one probability per class name)")

    @property
    def model_id(self) -> str:
        """Identifier stored in the model file."""
        return self.info.model_id

    @property
    def threshold(self) -> float:
        """The model's default violation threshold on ``p_mask``."""
        return self.info.threshold

    def _square(self, image: np.ndarray) -> np.ndarray:
        if image.ndim == 2:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        elif image.shape[2] == 4:
            image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
        size = self.info.resize
        # Same rule as the training cache: area filter when shrinking, bilinear otherwise.
        interp = cv2.INTER_AREA if min(image.shape[:2]) > size else cv2.INTER_LINEAR
        resized = cv2.resize(image, (size, size), interpolation=interp)
        o, n = self._offset, self.info.input_size
        return resized[o:o + n, o:o + n]

    def preprocess(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """BGR uint8 crops of any size -> one contiguous ``N x 3 x S x S`` float32 batch.

        Each crop is resized to ``resize`` x ``resize`` (aspect not kept, as in training)
        and centre-cropped to ``input_size``.
        """
        n = self.info.input_size
        crops = np.empty((len(images), n, n, 3), dtype=np.uint8)
        for i, image in enumerate(images):
            if image is None or image.size == 0 or image.dtype != np.uint8:
                raise ValueError(f"image {i} is empty or not uint8")
            crops[i] = self._square(image)
        if not self.info.grayscale:
            # Straight into the NCHW batch: channel c of the model reads BGR plane src[c].
            src = (2, 1, 0) if self.info.color_order == "RGB" else (0, 1, 2)
            batch = np.empty((len(images), 3, n, n), dtype=np.float32)
            for c in range(3):
                batch[:, c] = self._lut[c][crops[..., src[c]]]
            return batch
        if self.info.color_order == "RGB":
            crops = crops[..., ::-1]
        x = crops.astype(np.float32)
        if self.info.grayscale:
            order = _GREY_WEIGHTS if self.info.color_order == "RGB" else _GREY_WEIGHTS[::-1]
            grey = x @ order
            x = np.repeat(grey[..., None], 3, axis=-1)
        x *= self._mul
        x += self._add
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def predict_probs(self, batch: np.ndarray) -> np.ndarray:
        """Raw ``N x C`` probabilities for a preprocessed batch."""
        if len(batch) == 0:
            return np.zeros((0, len(self.info.class_names)), dtype=np.float32)
        return self._session.run([self.info.output_name], {self.info.input_name: batch})[0]

    def predict(self, batch: np.ndarray) -> list[Prediction]:
        """One :class:`Prediction` per row of a preprocessed batch."""
        probs = self.predict_probs(batch)
        names = self.info.class_names
        return [
            Prediction(label=names[int(row.argmax())], p_mask=float(row[self._mask_index]),
                       probs={name: float(p) for name, p in zip(names, row, strict=True)})
            for row in probs
        ]

    def classify(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        """Preprocess and predict in one call."""
        return self.predict(self.preprocess(images))
