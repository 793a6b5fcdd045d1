"""Export a checkpoint to ONNX (softmax in the graph, metadata attached) and to int8."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader
from torch import nn

from training.augment import IMAGENET_MEAN, IMAGENET_STD, eval_batch
from training.data import MASK_CLASS
from training.models import build_model

logger = logging.getLogger(__name__)

OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAME = "probs"
PARITY_TOLERANCE = 1e-4


class ExportError(RuntimeError):
    """The exported graph does not reproduce the PyTorch model."""


class WithSoftmax(nn.Module):
    """Wraps a logits model so the exported graph returns probabilities."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities."""
        return torch.softmax(self.model(x), dim=1)


def build_metadata(model_id: str, arch: str, class_names: list[str], grayscale: bool,
                   face_margin: float, threshold: float = 0.8, **extra: object) -> dict:
    """The ``maskmesh`` metadata the classifier reads to preprocess and label."""
    meta = {
        "model_id": model_id, "arch": arch, "class_names": list(class_names),
        "mask_class": MASK_CLASS, "input_size": 224, "resize": 256,
        "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "color_order": "RGB",
        "scale": 1 / 255, "grayscale": grayscale, "face_margin": face_margin,
        "threshold": threshold, "input_name": INPUT_NAME, "output_name": OUTPUT_NAME,
    }
    meta.update(extra)
    return meta


def attach_metadata(path: Path, metadata: dict) -> None:
    """Store ``metadata`` as JSON under the ``maskmesh`` key of the model's metadata_props."""
    model = onnx.load(str(path))
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = "maskmesh", json.dumps(metadata)
    onnx.save(model, str(path))


def load_checkpoint_model(checkpoint: Path) -> tuple[nn.Module, dict]:
    """Rebuild the model of a training checkpoint; returns (model in eval mode, meta)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    meta = state["meta"]
    model = build_model(meta["arch"], len(meta["class_names"]), pretrained=False)
    model.load_state_dict(state["model"])
    model.eval()
    meta = dict(meta, epoch=state.get("epoch"))
    return model, meta


def export_onnx(model: nn.Module, path: Path, metadata: dict) -> None:
    """Trace to ONNX opset 17 with a dynamic batch axis and attach the metadata."""
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapped = WithSoftmax(model).eval()
    dummy = torch.zeros(1, 3, 224, 224)
    torch.onnx.export(
        wrapped, (dummy,), str(path), opset_version=OPSET, input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: {0: "batch"},
                                                  OUTPUT_NAME: {0: "batch"}},
        dynamo=False,
    )
    onnx.checker.check_model(str(path))
    attach_metadata(path, metadata)
    logger.info("exported %s (%.1f MB)", path, path.stat().st_size / 1e6)


def onnx_probs(path: Path, batch: np.ndarray, threads: int = 2) -> np.ndarray:
    """Run an ONNX file on a normalised batch."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    out: list[np.ndarray] = []
    for start in range(0, len(batch), 64):
        out.append(session.run([OUTPUT_NAME], {INPUT_NAME: batch[start:start + 64]})[0])
    return np.concatenate(out)


def check_parity(model: nn.Module, path: Path, batch: np.ndarray,
                 tolerance: float = PARITY_TOLERANCE) -> float:
    """Max abs difference of probabilities between PyTorch and ONNX Runtime; raises if high."""
    with torch.no_grad():
        expected = torch.softmax(model(torch.from_numpy(batch)), 1).numpy()
    got = onnx_probs(path, batch)
    diff = float(np.abs(expected - got).max())
    if not diff < tolerance:  # NaN fails too
        raise ExportError(f"{path}: ONNX probabilities differ from PyTorch by {diff:.2e} "
                          f"(limit {tolerance:.0e})")
    logger.info("parity %s: max abs diff %.2e on %d images", path.name, diff, len(batch))
    return diff


def normalised_batch(images_u8: np.ndarray, grayscale: bool) -> np.ndarray:
    """Cached uint8 crops -> the normalised float32 batch the ONNX model takes."""
    return eval_batch(torch.from_numpy(np.ascontiguousarray(images_u8)), grayscale).numpy()


class _Calibration(CalibrationDataReader):
    """Feeds normalised training crops to onnxruntime's static quantisation."""

    def __init__(self, batch: np.ndarray, batch_size: int = 16) -> None:
        self._iter: Iterator[dict[str, np.ndarray]] = iter(
            {INPUT_NAME: batch[i:i + batch_size]} for i in range(0, len(batch), batch_size))

    def get_next(self) -> dict[str, np.ndarray] | None:
        """Next calibration batch, ``None`` when done."""
        return next(self._iter, None)


def quantize_int8(fp32_path: Path, int8_path: Path, calibration: np.ndarray,
                  metadata: dict) -> str:
    """Static QDQ int8 (per-channel weights) calibrated on training crops; dynamic fallback.

    Returns the method used.
    """
    from onnxruntime.quantization import (
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = int8_path.with_suffix(".pre.onnx")
    try:
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        source = pre
    except Exception as exc:  # noqa: BLE001 - pre-processing is an optimisation only
        logger.warning("quantisation pre-processing failed (%s); using the raw graph", exc)
        source = fp32_path
    # Probabilities stay float: an int8 softmax output would be coarse (steps of ~1/255)
    # right where the 0.8 threshold is applied.
    softmax = [n.name for n in onnx.load(str(source)).graph.node if n.op_type == "Softmax"]
    try:
        quantize_static(str(source), str(int8_path), _Calibration(calibration),
                        nodes_to_exclude=softmax,
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
        method = ("static QDQ, per-channel int8 weights, int8 activations (MinMax "
                  "calibration), softmax in float")
    except Exception as exc:  # noqa: BLE001 - fall back rather than ship nothing
        logger.warning("static quantisation failed (%s); using dynamic", exc)
        quantize_dynamic(str(source), str(int8_path), weight_type=QuantType.QInt8)
        method = "dynamic int8 weights"
    pre.unlink(missing_ok=True)
    attach_metadata(int8_path, dict(metadata, model_id=metadata["model_id"] + "-int8",
                                    quantization=method))
    logger.info("int8 %s (%.1f MB): %s", int8_path, int8_path.stat().st_size / 1e6, method)
    return method
