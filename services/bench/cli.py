"""``maskmesh bench [--quick] [--out results.json] [--sections ...]``.

Runs the sections in order (model, service, cameras, capture, memory), prints one table
per section and writes everything, with the machine and its load, as JSON. ``--quick``
runs each section on tiny sizes in well under a minute: a smoke run whose figures mean
nothing. Figures taken while a training run shares the cores are marked as such.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from maskmesh.logs import configure_logging
from services.bench import machine
from services.bench.images import face_images, shared_dir
from services.inference.settings import DEFAULT_MODEL

logger = logging.getLogger("maskmesh.bench")

SECTIONS = ("model", "service", "cameras", "capture", "memory")


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="maskmesh bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--out", type=Path, default=Path("bench-results.json"),
                        help="JSON report (default bench-results.json)")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="fp32 ONNX model")
    parser.add_argument("--int8-model", type=Path, default=None,
                        help="int8 ONNX model (default: the --model file's -int8 sibling); "
                             "quantised into a temp dir when absent")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--work-dir", type=Path, help="keep broker configs and logs here")
    parser.add_argument("--markdown", type=Path, help="also write the tables as Markdown here")
    parser.add_argument("--wait-ms", type=float, action="append", default=[],
                        help="also run 1 worker with this micro-batch wait (repeatable)")
    args = parser.parse_args(list(argv))
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    if not args.model.is_file():
        parser.error(f"model file {args.model} does not exist")
    # The services it starts run in other working directories: paths must not be relative.
    args.model = args.model.resolve()
    if args.int8_model is None:
        # Pair the model with its own int8 file, never with the default model's.
        args.int8_model = args.model.with_name(args.model.stem + "-int8.onnx")
    args.int8_model = args.int8_model.resolve()
    return args


def table(title: str, headers: list[str], rows: list[list[Any]], md: bool = False) -> str:
    """A table with a title line: plain text, or Markdown when ``md``."""
    cells = [[_cell(v) for v in row] for row in rows]
    if md:
        out = [f"**{title}**", "", "| " + " | ".join(headers) + " |",
               "|" + "---|" * len(headers)]
        out += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in cells]
        return "\n".join(out) + "\n"
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [title, line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(out) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def main(argv: Sequence[str]) -> int:
    """Run the benchmarks; 0 when every section ran, 1 when one failed."""
    args = _parse(argv)
    configure_logging("INFO")
    cpu = machine.cpu_info()
    report: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "sections": args.sections,
        "machine": machine.machine_report(),
        "load": {"start": machine.load_snapshot()},
        "errors": {},
    }
    if report["load"]["start"]["training_running"]:
        logger.warning("a training run shares the cores: figures are taken under load")
    work = (args.work_dir.resolve() if args.work_dir
            else Path(tempfile.mkdtemp(prefix="maskmesh-bench-")))
    work.mkdir(parents=True, exist_ok=True)
    images = face_images(8 if args.quick else 64)
    report["images"] = {"source": images.source, "crops": len(images.crops),
                        "mean_crop_bytes": round(images.mean_crop_bytes),
                        "mean_context_bytes": round(images.mean_context_bytes)}
    try:
        _run_sections(args, report, images, cpu, work)
    finally:
        report["load"]["end"] = machine.load_snapshot()
        report["under_load"] = any(
            snap.get("training_running") for snap in _snapshots(report))
        report["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        report["targets"] = targets(report)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(render(report))
    if args.markdown is not None:
        args.markdown.write_text(render(report, md=True), encoding="utf-8")
    print(f"JSON report: {args.out}")
    return 1 if report["errors"] else 0


def _run_sections(args: argparse.Namespace, report: dict[str, Any], images: Any,
                  cpu: machine.CpuInfo, work: Path) -> None:
    from services.bench import service as service_bench

    durations = service_bench.Durations.for_run(args.quick)
    guess: float | None = None
    sustained: float | None = None
    for name in args.sections:
        started = time.monotonic()
        logger.info("section %s", name)
        try:
            if name == "model":
                from services.bench import model as model_bench

                result = model_bench.run(args.model, args.int8_model, images.crops, cpu,
                                         args.quick)
                guess = _ort_rate(result, cpu.cores, 32)
            elif name == "service":
                if guess is None:
                    guess = _quick_guess(args.model, cpu.cores)
                configs = [service_bench.WorkerConfig("1 worker")]
                if not args.quick:
                    configs += [service_bench.WorkerConfig("2 workers", workers=2),
                                service_bench.WorkerConfig("2 workers x 1 thread", workers=2,
                                                           threads=1)]
                configs += [service_bench.WorkerConfig(f"1 worker, wait {ms:g} ms",
                                                       max_wait_ms=ms) for ms in args.wait_ms]
                result = service_bench.run(args.model, images, work, cpu.cores, durations,
                                           configs, guess)
                sustained = result["configs"][0].get("sustained_rate")
            elif name == "cameras":
                base = sustained or 0.8 * (guess or _quick_guess(args.model, cpu.cores))
                result = service_bench.run_cameras(args.model, images, work, base, durations)
            elif name == "capture":
                from services.bench import capture as capture_bench

                result = capture_bench.run(work, shared_dir(), args.quick)
            else:
                from services.bench import mesh as mesh_bench

                result = mesh_bench.run(args.model, work, args.quick)
        except Exception as exc:  # noqa: BLE001 - one failed section must not lose the rest
            logger.exception("section %s failed", name)
            report["errors"][name] = f"{exc.__class__.__name__}: {exc}"
            continue
        result["seconds"] = round(time.monotonic() - started, 1)
        result["load_at_end"] = machine.load_snapshot()
        report[name] = result


def _ort_rate(model_result: dict[str, Any], threads: int, batch: int) -> float | None:
    rows = [r for r in model_result["rows"] if r["engine"] == "ort-fp32"
            and r["threads"] == threads]
    best = max(rows, key=lambda r: r["batch"], default=None)
    exact = next((r for r in rows if r["batch"] == batch), best)
    return exact["images_per_s"] if exact else None


def _quick_guess(model: Path, cores: int) -> float:
    from services.bench import model as model_bench

    return float(model_bench.ort_throughput(model, 8, cores, 0.5)["images_per_s"])


def _snapshots(report: dict[str, Any]) -> list[dict[str, Any]]:
    snaps = list(report["load"].values())
    for name in SECTIONS:
        section = report.get(name)
        if isinstance(section, dict) and "load_at_end" in section:
            snaps.append(section["load_at_end"])
    return snaps


# -- targets --------------------------------------------------------------------------


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each stated target with the measured figure and whether it is met."""
    out: list[dict[str, Any]] = []
    service = report.get("service", {}).get("configs", [])
    first = service[0] if service else {}
    ratio = first.get("service_vs_raw_ort")
    out.append({"target": "service >= 85 % of raw ORT throughput at the same batch (1 worker)",
                "value": ratio, "met": None if ratio is None else ratio >= 0.85})

    model = report.get("model", {})
    rows = model.get("rows", [])
    cores = report["machine"]["cpu"]["cores"]
    speed = [r.get("vs_ort_fp32") for r in rows
             if r["engine"] == "ort-int8" and r["threads"] == cores]
    best = max((s for s in speed if s is not None), default=None)
    accuracy = model.get("accuracy", {})
    lost = accuracy.get("pooled_points_lost") if accuracy.get("available") else None
    met = None if best is None else best >= 1.8 and (lost is not None and lost <= 0.3)
    out.append({"target": "int8 >= 1.8x fp32 with <= 0.3 accuracy points lost",
                "value": {"best_speedup": best, "pooled_points_lost": lost,
                          "worst_set_points_lost": accuracy.get("worst_points_lost"),
                          "accuracy_source": accuracy.get("source") or accuracy.get("reason")},
                "met": met if not (best is not None and best < 1.8) else False})

    half = next((lv for lv in first.get("levels", []) if lv["fraction_of_sustained"] == 0.5),
                None)
    p99 = half["latency_ms"]["p99"] if half else None
    out.append({"target": "end-to-end p99 < 100 ms at half the sustained rate (1 worker)",
                "value": p99, "met": None if p99 is None else p99 < 100})

    capture = report.get("capture", {}).get("rows", [])
    vga = next((r for r in capture if r["detector"] == "res10" and r["width"] == 640), None)
    fps = vga["fps"] if vga else None
    out.append({"target": "capture >= 25 fps at 640x480 on one core (res10)",
                "value": fps, "met": None if fps is None else fps >= 25})
    return out


# -- printing -------------------------------------------------------------------------


def render(report: dict[str, Any], md: bool = False) -> str:
    """Every table of the report, as plain text or Markdown."""
    parts = [_header(report, md)]
    if "model" in report:
        parts.append(_model_tables(report["model"], md))
    if "service" in report:
        parts.append(_service_tables(report["service"], md))
    if "cameras" in report:
        parts.append(_camera_table(report["cameras"], md))
    if "capture" in report:
        parts.append(_capture_table(report["capture"], md))
    if "memory" in report:
        parts.append(_memory_table(report, md))
    parts.append(table("Targets", ["target", "value", "met"],
                       [[t["target"], json.dumps(t["value"]) if isinstance(t["value"], dict)
                         else t["value"], t["met"]] for t in report["targets"]], md))
    for name, error in report["errors"].items():
        parts.append(f"section {name} FAILED: {error}\n")
    return "\n".join(parts)


def _header(report: dict[str, Any], md: bool = False) -> str:
    m = report["machine"]
    start, end = report["load"]["start"], report["load"].get("end", {})
    lines = [
        f"maskmesh bench {'(quick: smoke run, figures mean nothing)' if report['quick'] else ''}",
        f"CPU {m['cpu']['model']}, {m['cpu']['cores']} cores at {m['cpu']['ghz']} GHz, "
        f"AVX2 {m['cpu']['avx2']}, FMA {m['cpu']['fma']}, AVX-512 {m['cpu']['avx512']}, "
        f"VNNI {m['cpu']['vnni']}; peak fp32 {m['peak_fp32_gflops']} GFLOP/s",
        f"load average at start {start['loadavg']}, at end {end.get('loadavg')}; "
        + ("TAKEN UNDER LOAD (a training run shared the cores)" if report.get("under_load")
           else "no training run during the benchmark"),
        f"images: {report['images']['source']}, crops {report['images']['mean_crop_bytes']} B, "
        f"context photos {report['images']['mean_context_bytes']} B on average",
    ]
    return ("\n\n" if md else "\n").join(lines) + "\n"


def _model_tables(model: dict[str, Any], md: bool = False) -> str:
    flops = model["flops"]
    rows = [[r["engine"], r["threads"], r["batch"], r["images_per_s"], r["ms_per_image"],
             r["gflops"], f"{100 * r['fraction_of_peak']:.1f} %", r.get("vs_ort_fp32")]
            for r in model["rows"]]
    title = (f"Model alone: {model['model_id']}, {flops['gflops_per_image']} GFLOP/image "
             f"({flops['macs_per_image'] / 1e6:.0f} M MACs), int8: {model['int8_method']}")
    text = table(title, ["engine", "threads", "batch", "images/s", "ms/image", "GFLOP/s",
                         "of peak", "vs fp32"], rows, md)
    agree = model["int8_agreement"]
    text += "\n" if md else ""
    text += (f"int8 vs fp32 on {agree['crops']} crops: top-1 agreement "
             f"{100 * agree['top1_agreement']:.1f} %, "
             f"max |dp_mask| {agree['max_abs_diff_p_mask']}\n" + ("\n" if md else ""))
    acc = model["accuracy"]
    text += ("accuracy (model card): " + (
        ", ".join(f"{k} fp32 {100 * v['fp32_accuracy']:.2f} % int8 {100 * v['int8_accuracy']:.2f} %"
                  for k, v in acc["sets"].items()) if acc.get("available")
        else acc.get("reason", "not available")) + "\n")
    return text


def _service_tables(service: dict[str, Any], md: bool = False) -> str:
    parts = []
    summary = []
    for c in service["configs"]:
        summary.append([c["name"], c.get("capacity_under_overload"), c.get("sustained_rate"),
                        c.get("service_batch"), c.get("raw_ort_at_service_batch"),
                        None if c.get("service_vs_raw_ort") is None
                        else f"{100 * c['service_vs_raw_ort']:.1f} %",
                        (c.get("pipeline") or {}).get("faces_per_s_ceiling")])
    parts.append(table("Inference service through the broker (faces/s)",
                       ["config", "overload", "sustained", "batch", "raw ORT", "service/raw",
                        "in-process ceiling"], summary, md))
    levels = []
    for c in service["configs"]:
        for lv in c.get("levels", []):
            lat = lv["latency_ms"]
            levels.append([c["name"], f"{int(100 * lv['fraction_of_sustained'])} %",
                           lv["offered_rate"], lv["delivered_rate"], lv["mean_batch"],
                           lat["p50"], lat["p95"], lat["p99"],
                           round(sum(v for k, v in lv["cpu_cores"].items()
                                     if k.startswith("inference")), 3),
                           lv["cpu_cores"].get("broker")])
    parts.append(table("Latency capture -> verdict (ms)",
                       ["config", "load", "offered/s", "delivered/s", "batch", "p50", "p95",
                        "p99", "worker cores", "broker cores"], levels, md))
    steps = []
    for c in service["configs"]:
        p = c.get("pipeline")
        if p:
            steps.append([c["name"], p["batch"], *p["ms_per_face"].values(),
                          p["total_ms_per_face"], f"{100 * p['model_share']:.0f} %"])
    if steps:
        names = list(service["configs"][0]["pipeline"]["ms_per_face"])
        parts.append(table("Worker steps in one process (ms per face)",
                           ["config", "batch", *names, "total", "model share"], steps, md))
    return "\n".join(parts)


def _camera_table(cameras: dict[str, Any], md: bool = False) -> str:
    rows = []
    for r in cameras["rows"]:
        s = r["steady"]
        cores = s["cpu_cores"]
        per_face = {k: v / max(1e-9, s["offered_rate"]) * 1000 for k, v in cores.items()}
        rows.append([r["cameras"], s["offered_rate"], s["delivered_rate"], s["latency_ms"]["p50"],
                     s["latency_ms"]["p99"], per_face.get("inference-1"), per_face.get("broker"),
                     per_face.get("notifier"), r["overload_delivered_rate"], r["broker_rss_mb"]])
    title = f"Cost growth with cameras ({cameras['per_camera_rate']} faces/s each, notifier on)"
    return table(title,
                 ["cameras", "offered/s", "delivered/s", "p50 ms", "p99 ms", "worker CPU ms/face",
                  "broker CPU ms/face", "notifier CPU ms/face", "max faces/s", "broker RSS MB"],
                 rows, md)


def _capture_table(capture: dict[str, Any], md: bool = False) -> str:
    rows = [[r["detector"], f"{r['width']}x{r['height']}", r["fps"], r["detect_only_fps"],
             r["detections_per_frame"], r["faces_published"], r["cpu_cores"], r["peak_rss_mb"]]
            for r in capture["rows"]]
    text = table("Capture on one core (detect + track + crop + publish)",
                 ["detector", "frame", "fps", "detect-only fps", "faces/frame", "published",
                  "cores used", "RSS MB"], rows, md)
    return text + "".join(f"skipped: {s}\n" for s in capture["skipped"])


def _memory_table(report: dict[str, Any], md: bool = False) -> str:
    rows = []
    for name, mem in report["memory"]["memory"].items():
        rows.append(["mesh run (real capture)", name, mem["peak_rss_mb"]])
    for c in report.get("service", {}).get("configs", []):
        for name, mem in c.get("memory", {}).items():
            rows.append([f"service: {c['name']}", name, mem["peak_rss_mb"]])
    for name, mem in report.get("cameras", {}).get("memory", {}).items():
        rows.append(["cameras (notifier on)", name, mem["peak_rss_mb"]])
    lat = report["memory"].get("latency_ms", {})
    return table(f"Peak RSS (VmHWM, MB); real capture -> verdict latency p50 {lat.get('p50')} "
                 f"p99 {lat.get('p99')} ms", ["run", "process", "VmHWM MB"], rows, md)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
