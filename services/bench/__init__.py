"""``maskmesh bench``: measure the model, the inference service, capture and the mesh.

Benchmarks print tables and write a JSON report; they are measurements, not tests.
"""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str]) -> int:
    """``maskmesh bench``; see ``services.bench.cli``."""
    from services.bench.cli import main as bench_main

    return bench_main(argv)


__all__ = ["main"]
