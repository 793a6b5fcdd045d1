"""What the benchmark ran on: CPU, its peak arithmetic rate, and how busy it was."""

from __future__ import annotations

import os
import platform
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Lanes of one AVX2 register of float32, FMA units per Zen 3 core, flops per FMA.
FP32_LANES_AVX2 = 8
FMA_UNITS_PER_CORE = 2
FLOPS_PER_FMA = 2
# Command lines that mean another heavy job (a training run) shares the cores.
_BUSY_PATTERNS = (re.compile(r"maskmesh(\.cli)? train\b"), re.compile(r"\btraining\.(cli|train)\b"))


@dataclass(frozen=True)
class CpuInfo:
    """The CPU as /proc/cpuinfo describes it.

    model: the model name.
    cores: cores this process may run on.
    ghz: the mean ``cpu MHz`` of those cores, in GHz (a guest sees the nominal clock).
    avx2, fma, avx512, vnni: instruction-set flags that decide the kernels used.
    """

    model: str
    cores: int
    ghz: float
    avx2: bool
    fma: bool
    avx512: bool
    vnni: bool

    def peak_fp32_gflops(self, cores: int | None = None) -> float:
        """cores x 2 FMA units x 8 float32 lanes x 2 flops x GHz (AVX2, no AVX-512)."""
        lanes = 16 if self.avx512 else FP32_LANES_AVX2
        n = self.cores if cores is None else cores
        return n * FMA_UNITS_PER_CORE * lanes * FLOPS_PER_FMA * self.ghz


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def cpu_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> CpuInfo:
    """Parse /proc/cpuinfo; on another system, what platform knows (clock unknown: 0)."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return CpuInfo(platform.processor() or "unknown", available_cores(), 0.0,
                       False, False, False, False)
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    mhz = [float(v) for v in re.findall(r"^cpu MHz\s*:\s*([\d.]+)$", text, re.M)]
    flags_line = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    flags = set(flags_line.group(1).split()) if flags_line else set()
    return CpuInfo(
        model=model.group(1).strip() if model else "unknown",
        cores=available_cores(),
        ghz=round(sum(mhz) / len(mhz) / 1000.0, 3) if mhz else 0.0,
        avx2="avx2" in flags,
        fma="fma" in flags,
        avx512="avx512f" in flags,
        vnni=bool(flags & {"avx512_vnni", "avx_vnni", "avx_vnni_int8"}),
    )


def busy_processes() -> list[str]:
    """Command lines of other heavy jobs (training runs) running now."""
    found: list[str] = []
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        line = raw.replace(b"\0", b" ").decode("utf-8", errors="replace").strip()
        if any(p.search(line) for p in _BUSY_PATTERNS):
            found.append(f"{entry.name}: {line[:160]}")
    return found


def _cpu_ticks() -> tuple[int, int] | None:
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    values = [int(v) for v in fields]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values), idle


def busy_cores(sample_s: float = 0.5) -> float | None:
    """Cores kept busy machine-wide over a short sample (between sections: by others)."""
    first = _cpu_ticks()
    time.sleep(sample_s)
    second = _cpu_ticks()
    if first is None or second is None or second[0] == first[0]:
        return None
    total, idle = second[0] - first[0], second[1] - first[1]
    return round(available_cores() * (total - idle) / total, 2)


def load_snapshot() -> dict[str, Any]:
    """The load average, the busy cores now and any training run: are the figures clean?"""
    one, five, fifteen = os.getloadavg()
    busy = busy_processes()
    return {"loadavg": [round(one, 2), round(five, 2), round(fifteen, 2)],
            "busy_cores": busy_cores(), "training_running": bool(busy),
            "busy_processes": busy}


def machine_report() -> dict[str, Any]:
    info = cpu_info()
    return {
        "cpu": asdict(info),
        "peak_fp32_gflops": round(info.peak_fp32_gflops(), 1),
        "peak_fp32_gflops_per_core": round(info.peak_fp32_gflops(1), 1),
        "peak_assumption": (
            f"{info.cores} cores x {FMA_UNITS_PER_CORE} FMA units x "
            f"{16 if info.avx512 else FP32_LANES_AVX2} fp32 lanes x {FLOPS_PER_FMA} flops x "
            f"{info.ghz} GHz (the 'cpu MHz' of /proc/cpuinfo, taken as the sustained clock; "
            "a KVM guest shows the nominal clock, boost is not counted)"
        ),
        "python": platform.python_version(),
    }
