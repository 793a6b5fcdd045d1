"""The classifier alone: ONNX Runtime fp32 and int8, and PyTorch eager on the same weights.

The FLOPs come from the ONNX graph itself (shape inference, then multiply-accumulates of
every Conv and Gemm), so the figure follows the model file, not a hand count. torch and
the ``training`` package are imported here only, and only when this section runs.
"""

from __future__ import annotations

import logging
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from services.bench.images import decode_jpeg
from services.bench.machine import CpuInfo
from services.inference.classifier import MaskClassifier

logger = logging.getLogger(__name__)


def model_macs(path: Path, batch: int = 1) -> dict[str, Any]:
    """Multiply-accumulates per image of every Conv and Gemm node, from graph shapes."""
    import onnx
    from onnx import shape_inference

    model = onnx.load(str(path))
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = batch
    # data_prop follows constant pads (EfficientNet's "same" padding) into the shapes.
    inferred = shape_inference.infer_shapes(model, data_prop=True)
    shapes: dict[str, list[int]] = {}
    for value in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value for d in dims]
    weights = {init.name: list(init.dims) for init in model.graph.initializer}
    wanted = [n.output[0] for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    if any(not all(shapes.get(name, [0])) for name in wanted):
        shapes.update(_run_shapes(model, wanted, batch))

    layers: list[dict[str, Any]] = []
    for node in model.graph.node:
        if node.op_type == "Conv":
            w = weights.get(node.input[1])
            out = shapes.get(node.output[0])
            if not w or not out:
                continue
            # Each output element takes Cin/groups x kh x kw multiply-adds.
            macs = int(np.prod(out)) * int(np.prod(w[1:]))
        elif node.op_type == "Gemm":
            w = weights.get(node.input[1])
            out = shapes.get(node.output[0])
            if not w or not out:
                continue
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            k = w[1] if trans_b else w[0]
            macs = int(np.prod(out)) * int(k)
        else:
            continue
        layers.append({"node": node.name or node.output[0], "op": node.op_type,
                       "macs": macs // batch})
    total = sum(layer["macs"] for layer in layers)
    params = sum(int(np.prod(d)) for d in weights.values())
    return {"macs_per_image": total, "gflops_per_image": round(2 * total / 1e9, 4),
            "parameters": params, "layers": layers}


def _run_shapes(model: Any, names: list[str], batch: int) -> dict[str, list[int]]:
    """Output shapes of the named nodes from one run on zeros.

    Static inference cannot follow pads computed inside the graph (EfficientNet's "same"
    padding), so the layers' shapes come from running the model once.
    """
    import onnx

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for name in names:
        if name not in known:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {}
    for value in session.get_inputs():
        dims = [d if isinstance(d, int) else batch for d in value.shape]
        feeds[value.name] = np.zeros(dims, np.float32)
    outputs = session.run(names, feeds)
    return {name: list(out.shape) for name, out in zip(names, outputs, strict=True)}


def ort_session(path: Path, threads: int) -> ort.InferenceSession:
    """A CPU session configured as the inference worker configures its own."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def time_calls(call: Callable[[], object], batch: int, min_s: float,
               min_calls: int = 3, warmup: int = 2) -> dict[str, Any]:
    """Call repeatedly (after warm-up) for at least min_s and min_calls; rates per image."""
    for _ in range(warmup):
        call()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - started < min_s:
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    total = sum(times)
    return {
        "batch": batch,
        "calls": len(times),
        "images_per_s": round(batch * len(times) / total, 2),
        "ms_per_image": round(1000.0 * total / (batch * len(times)), 3),
        "call_ms_p50": round(1000.0 * statistics.median(times), 3),
    }


def ort_throughput(path: Path, batch_size: int, threads: int, min_s: float,
                   images: np.ndarray | None = None, rounds: int = 3) -> dict[str, Any]:
    """Raw ONNX Runtime rate of one model at one batch size and thread count.

    The best of ``rounds`` rounds of ``min_s / rounds`` each: on a machine shared with
    other jobs, the fastest round is the one least disturbed by them.
    """
    session = ort_session(path, threads)
    name = session.get_inputs()[0].name
    batch = _batch_of(images, batch_size)
    results = [time_calls(partial(session.run, None, {name: batch}), batch_size,
                          min_s / rounds) for _ in range(rounds)]
    result = max(results, key=lambda r: r["images_per_s"])
    result["rounds_images_per_s"] = [r["images_per_s"] for r in results]
    result["threads"] = threads
    return result


def _batch_of(images: np.ndarray | None, size: int) -> np.ndarray:
    if images is None or len(images) == 0:
        rng = np.random.default_rng(0)
        return rng.standard_normal((size, 3, 224, 224)).astype(np.float32)
    reps = -(-size // len(images))
    return np.ascontiguousarray(np.concatenate([images] * reps)[:size])


def preprocessed_crops(model: Path, crops: list[bytes]) -> np.ndarray:
    """The benchmark crops decoded and preprocessed exactly as the worker does."""
    classifier = MaskClassifier(model, intra_op_threads=1)
    return classifier.preprocess([decode_jpeg(c) for c in crops])


def make_int8(fp32: Path, out_dir: Path, calibration: np.ndarray, quick: bool,
              unsigned_activations: bool = False) -> tuple[Path, str]:
    """An int8 copy of the model, quantised the way ``maskmesh export --int8`` does.

    Static QDQ with per-channel int8 weights and int8 activations, calibrated on the
    benchmark crops; ``unsigned_activations`` takes uint8 activations instead (the u8 x s8
    kernels of AVX2); ``quick`` takes dynamic quantisation, which needs no calibration.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    kind = "u8s8" if unsigned_activations else "s8s8"
    out = out_dir / (fp32.stem + f"-int8-{kind}-bench.onnx")
    if quick:
        quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8)
        return out, "dynamic int8 weights (quick run; made by the benchmark)"
    pre = out_dir / (fp32.stem + "-pre.onnx")
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    batches = iter({"image": calibration[i:i + 16]} for i in range(0, len(calibration), 16))

    class Reader:
        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(batches, None)

    quantize_static(str(pre), str(out), Reader(),  # type: ignore[arg-type]
                    quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8 if unsigned_activations else QuantType.QInt8,
                    weight_type=QuantType.QInt8)
    if unsigned_activations:
        return out, "static QDQ, per-channel int8 weights, uint8 activations (for comparison)"
    return out, ("static QDQ, per-channel int8 weights, int8 activations, MinMax calibration "
                 f"on {len(calibration)} benchmark crops (made by the benchmark, as "
                 "`maskmesh export --int8` makes it)")


def torch_eager(path: Path) -> Any:
    """The project's AlexNet with the ONNX file's weights, softmax on top, in eval mode."""
    import torch

    from training.models import AlexNet, onnx_weights

    state = onnx_weights(path)
    if "classifier.6.weight" not in state:
        # Other architectures fold batch norms at export; their weights do not map back.
        raise ValueError(f"{path.name} is not an AlexNet export; the PyTorch rows need one")
    classes = state["classifier.6.weight"].shape[0]
    hidden = state["classifier.1.weight"].shape[0]
    net = AlexNet(num_classes=classes, hidden=hidden)
    net.load_state_dict(state, strict=True)
    return torch.nn.Sequential(net, torch.nn.Softmax(dim=1)).eval()


def accuracy_from_card(model: Path) -> dict[str, Any]:
    """fp32 and int8 accuracy per evaluation set from ``docs/model-report``, if evaluated."""
    import json

    report = model.parent.parent / "docs" / "model-report"
    fp32_file = report / f"{model.stem}-metrics.json"
    int8_file = report / f"{model.stem}-int8-metrics.json"
    if not fp32_file.is_file() or not int8_file.is_file():
        return {"available": False,
                "reason": f"no {fp32_file.name} and {int8_file.name} under {report} yet"}
    fp32 = json.loads(fp32_file.read_text())
    int8 = json.loads(int8_file.read_text())
    sets: dict[str, Any] = {}
    for key, metrics in fp32.get("sets", {}).items():
        other = int8.get("sets", {}).get(key)
        if other is None:
            continue
        sets[key] = {
            "n": metrics.get("n"),
            "fp32_accuracy": metrics["accuracy"],
            "int8_accuracy": other["accuracy"],
            "points_lost": round(100.0 * (metrics["accuracy"] - other["accuracy"]), 3),
        }
    worst = max((s["points_lost"] for s in sets.values()), default=None)
    faces = sum(s["n"] or 0 for s in sets.values())
    pooled = None
    if faces:
        # Over every test face of every set: one face more or less on a 220-face set
        # is 0.45 points on its own.
        pooled = round(100.0 * sum((s["n"] or 0) * (s["fp32_accuracy"] - s["int8_accuracy"])
                                   for s in sets.values()) / faces, 3)
    return {"available": bool(sets), "source": str(report.resolve()),
            "model_id": fp32.get("model_id"), "sets": sets, "faces": faces,
            "pooled_points_lost": pooled, "worst_points_lost": worst}


def run(model: Path, int8_model: Path | None, crops: list[bytes], cpu: CpuInfo,
        quick: bool) -> dict[str, Any]:
    """The model section: FLOPs, ORT fp32/int8 and torch eager at batch 1, 8, 32."""
    batches = (1, 2) if quick else (1, 8, 32)
    min_s = 0.2 if quick else 4.0
    thread_counts = sorted({cpu.cores, 1}, reverse=True) if not quick else [cpu.cores]
    macs = model_macs(model)
    gflop = 2 * macs["macs_per_image"] / 1e9
    images = preprocessed_crops(model, crops)

    tmp = Path(tempfile.mkdtemp(prefix="maskmesh-bench-int8-"))
    if int8_model is not None and int8_model.is_file():
        method = MaskClassifier(int8_model).info.extra.get("quantization", "not stated")
        int8_path, int8_method = int8_model, f"shipped file ({method})"
    else:
        started = time.perf_counter()
        int8_path, int8_method = make_int8(model, tmp, images[:64], quick)
        int8_method += f"; quantised in {time.perf_counter() - started:.1f} s"
    logger.info("int8 model: %s (%s)", int8_path, int8_method)

    engines = [("ort-fp32", model), ("ort-int8", int8_path)]
    if not quick:
        engines.append(("ort-int8-u8s8", make_int8(model, tmp, images[:64], False, True)[0]))
    rows: list[dict[str, Any]] = []
    for engine, path in engines:
        for threads in thread_counts:
            session = ort_session(path, threads)
            name = session.get_inputs()[0].name
            for size in batches:
                batch = _batch_of(images, size)
                row = time_calls(partial(session.run, None, {name: batch}), size, min_s)
                rows.append({"engine": engine, "threads": threads, **row})
    try:
        rows += _torch_rows(model, images, batches, thread_counts, min_s)
        torch_error = None
    except Exception as exc:  # noqa: BLE001 - torch is optional for the services
        torch_error = f"{exc.__class__.__name__}: {exc}"
        logger.warning("PyTorch eager skipped: %s", torch_error)

    for row in rows:
        achieved = gflop * row["images_per_s"]
        row["gflops"] = round(achieved, 2)
        peak = cpu.peak_fp32_gflops(row["threads"])
        row["fraction_of_peak"] = round(achieved / max(1e-9, peak), 4)
    _speedups(rows)

    agreement = _agreement(model, int8_path, images)
    shutil.rmtree(tmp, ignore_errors=True)
    return {
        "model": str(model),
        "model_id": MaskClassifier(model).model_id,
        "int8_model": str(int8_path),
        "int8_method": int8_method,
        "flops": {k: v for k, v in macs.items() if k != "layers"},
        "layers": macs["layers"],
        "rows": rows,
        "torch_error": torch_error,
        "int8_agreement": agreement,
        "accuracy": accuracy_from_card(model),
        "input_crops": len(images),
    }


def _torch_rows(model: Path, images: np.ndarray, batches: tuple[int, ...],
                thread_counts: list[int], min_s: float) -> list[dict[str, Any]]:
    import torch

    net = torch_eager(model)
    rows = []
    with torch.inference_mode():
        check = torch.from_numpy(_batch_of(images, 4))
        session = ort_session(model, 1)
        expected = session.run(None, {session.get_inputs()[0].name: check.numpy()})[0]
        parity = float(np.abs(net(check).numpy() - expected).max())
        for threads in thread_counts:
            torch.set_num_threads(threads)
            for size in batches:
                batch = torch.from_numpy(_batch_of(images, size))
                row = time_calls(partial(net, batch), size, min_s)
                rows.append({"engine": "torch-eager", "threads": threads,
                             "max_abs_diff_vs_ort": float(f"{parity:.3g}"), **row})
    return rows


def _speedups(rows: list[dict[str, Any]]) -> None:
    fp32 = {(r["threads"], r["batch"]): r["images_per_s"]
            for r in rows if r["engine"] == "ort-fp32"}
    for row in rows:
        base = fp32.get((row["threads"], row["batch"]))
        if base:
            row["vs_ort_fp32"] = round(row["images_per_s"] / base, 3)


def _agreement(fp32: Path, int8: Path, images: np.ndarray) -> dict[str, Any]:
    """How often int8 and fp32 agree on the benchmark crops (not an accuracy figure)."""
    a = ort_session(fp32, 2)
    b = ort_session(int8, 2)
    name = a.get_inputs()[0].name
    pa = a.run(None, {name: images})[0]
    pb = b.run(None, {name: images})[0]
    return {
        "crops": len(images),
        "top1_agreement": round(float((pa.argmax(1) == pb.argmax(1)).mean()), 4),
        "max_abs_diff_p_mask": round(float(np.abs(pa[:, 0] - pb[:, 0]).max()), 4),
    }
