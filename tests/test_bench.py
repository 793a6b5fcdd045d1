"""``maskmesh bench``: a quick run end to end, and the pieces its figures rest on."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from maskmesh.messages import FaceCrop, decode
from services.bench import cli, load, machine
from services.inference.settings import DEFAULT_MODEL

MODEL = DEFAULT_MODEL
ALEXNET = DEFAULT_MODEL.parent / "maskmesh-alexnet.onnx"


def test_quick_run_writes_a_well_formed_report(tmp_path: Path) -> None:
    if shutil.which("mosquitto") is None:
        pytest.skip("mosquitto is not installed")
    if not MODEL.is_file():
        pytest.skip(f"{MODEL} is not there")
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, "-m", "maskmesh.cli", "bench", "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["quick"] is True
    assert report["errors"] == {}
    assert set(cli.SECTIONS) <= set(report)
    assert report["load"]["start"]["loadavg"] and "training_running" in report["load"]["end"]

    engines = {row["engine"] for row in report["model"]["rows"]}
    assert {"ort-fp32", "ort-int8"} <= engines
    assert report["model"]["flops"]["macs_per_image"] > 0

    service = report["service"]["configs"][0]
    assert service["sustained_rate"] and service["sustained_rate"] > 0
    assert service["levels"][0]["latency_ms"]["p99"] is not None
    assert service["memory"]["inference-1"]["peak_rss_mb"] > 0

    assert [row["cameras"] for row in report["cameras"]["rows"]] == [1, 2]
    assert report["capture"]["rows"][0]["fps"] > 0
    memory = report["memory"]["memory"]
    assert {"broker", "inference-1", "notifier", "capture-cam1"} <= set(memory)
    assert all(m["peak_rss_mb"] > 0 for m in memory.values())
    assert len(report["targets"]) == 4
    assert "Targets" in done.stdout


def test_face_crop_templates_stay_valid_after_substitution() -> None:
    crop = b"\xff\xd8\xff" + b"\x00" * 100
    payload = load.templates("bench", "cam3", [crop], [crop])[0]
    now = datetime.now(UTC)
    real = payload.replace(load._ID_PLACEHOLDER.encode(), load.face_id(7, 42).encode())
    real = real.replace(load._TIME_PLACEHOLDER, now.strftime(load._TIME_FORMAT).encode())
    face = decode(FaceCrop, real)
    assert load.phase_of(face.face_id) == 7
    assert abs((face.captured_at - now).total_seconds()) < 1e-3


def test_latency_slope_sees_a_growing_backlog() -> None:
    def arrivals(growth: float) -> list[load.Arrival]:
        return [load.Arrival(t, t, t + 0.05 + growth * t, "w1") for t in range(20)]

    assert abs(load.latency_slope(arrivals(0.0))) < 1e-9
    assert load.latency_slope(arrivals(0.2)) == pytest.approx(0.2)
    assert load.percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert load.percentile([], 99) is None


def test_peak_follows_cores_clock_and_vector_width(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    block = "model name\t: AMD EPYC\ncpu MHz\t\t: 2500.000\nflags\t\t: fpu avx2 fma\n\n"
    cpuinfo.write_text(block * 2)
    info = machine.cpu_info(cpuinfo)
    assert (info.model, info.ghz, info.avx2, info.avx512, info.vnni) == (
        "AMD EPYC", 2.5, True, False, False)
    assert info.peak_fp32_gflops(2) == pytest.approx(2 * 2 * 8 * 2 * 2.5)


def test_model_macs_count_alexnet_convolutions_and_gemms() -> None:
    pytest.importorskip("onnx")
    if not ALEXNET.is_file():
        pytest.skip(f"{ALEXNET} is not there")
    from services.bench.model import model_macs

    macs = model_macs(ALEXNET)
    ops = [layer["op"] for layer in macs["layers"]]
    assert ops.count("Conv") == 5 and ops.count("Gemm") == 3
    # First conv: 64 x 55 x 55 outputs, 3 x 11 x 11 multiply-adds each.
    assert macs["layers"][0]["macs"] == 64 * 55 * 55 * 3 * 11 * 11
    assert 0.6e9 < macs["macs_per_image"] < 0.7e9


def test_targets_read_met_and_missing_figures() -> None:
    report = {
        "machine": {"cpu": {"cores": 2}},
        "service": {"configs": [{"service_vs_raw_ort": 0.9, "levels": [
            {"fraction_of_sustained": 0.5, "latency_ms": {"p99": 120.0}}]}]},
        "model": {"rows": [{"engine": "ort-int8", "threads": 2, "vs_ort_fp32": 0.4}],
                  "accuracy": {"available": False, "reason": "no card"}},
        "capture": {"rows": []},
    }
    met = {t["target"].split()[0]: t["met"] for t in cli.targets(report)}
    assert met == {"service": True, "int8": False, "end-to-end": False, "capture": None}
    text = cli.table("T", ["a", "b"], [[1, None], [2.345, "x"]])
    assert "2.35" in text and "-" in text


def test_model_macs_follow_padding_computed_in_the_graph() -> None:
    """EfficientNet's "same" pads are computed at run time; the count must still see them.

    The reference is an independent count: forward hooks on the PyTorch network's
    convolutions and linear layers, from their actual output shapes.
    """
    torch = pytest.importorskip("torch")
    pytest.importorskip("efficientnet_lite_pytorch")
    model_file = DEFAULT_MODEL.parent / "maskmesh-efficientnet-lite0.onnx"
    if not model_file.is_file():
        pytest.skip(f"{model_file} is not there")
    from services.bench.model import model_macs
    from training.models import EfficientNetLite

    net = EfficientNetLite("efficientnet_lite0", 3, pretrained=False).eval()
    counted: list[int] = []

    def hook(module: torch.nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        if isinstance(module, torch.nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * (
                module.kernel_size[1])
        else:
            per_output = module.in_features
        counted.append(output.numel() * per_output)

    for module in net.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            module.register_forward_hook(hook)
    with torch.no_grad():
        net(torch.zeros(1, 3, 224, 224))

    macs = model_macs(model_file)
    assert macs["macs_per_image"] == sum(counted)


def test_int8_file_follows_the_model_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    model = tmp_path / "other.onnx"
    model.write_bytes(b"only its name matters here")
    monkeypatch.chdir(tmp_path)
    args = cli._parse(["--model", "other.onnx", "--work-dir", "rel"])
    assert args.model == model.resolve()
    assert args.int8_model == tmp_path / "other-int8.onnx"
    explicit = cli._parse(["--model", "other.onnx", "--int8-model", "q.onnx"])
    assert explicit.int8_model == tmp_path / "q.onnx"
