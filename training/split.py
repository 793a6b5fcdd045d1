"""Grouped, stratified train/test/validation splits that keep near-duplicates together.

Two images fall in one group when their perceptual hashes (or the hash of one and of the
other's mirror image) are within ``max_distance`` bits, or when they share a file name up
to the extension; groups are the connected components (union-find). A whole group goes
to one split, so a flipped or re-saved copy of a test face is never trained on.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import cv2
import imagehash
import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

SPLIT_FRACTIONS: dict[str, float] = {"train": 0.80, "test": 0.15, "validation": 0.05}
DEFAULT_MAX_DISTANCE = 6
HASH_SIZE = 8


def image_hashes(image_bgr: np.ndarray) -> tuple[int, int]:
    """64-bit pHash of an image and of its horizontal mirror, as ints."""
    small = cv2.resize(image_bgr, (128, 128), interpolation=cv2.INTER_AREA)
    pil = Image.fromarray(cv2.cvtColor(small, cv2.COLOR_BGR2RGB))
    plain = imagehash.phash(pil, hash_size=HASH_SIZE)
    mirror = imagehash.phash(pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT), hash_size=HASH_SIZE)
    return int(str(plain), 16), int(str(mirror), 16)


class UnionFind:
    """Disjoint sets over ``0..n-1`` with path halving."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        """Root of ``i``'s set."""
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        """Merge the sets of ``a`` and ``b`` (the smaller root wins, so results are stable)."""
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _popcount(values: np.ndarray) -> np.ndarray:
    as_bytes = values.view(np.uint8).reshape(values.shape + (8,))
    return np.unpackbits(as_bytes, axis=-1).sum(axis=-1)


def near_pairs(
    hashes: np.ndarray, mirrors: np.ndarray, max_distance: int, chunk: int = 512
) -> Iterable[tuple[int, int]]:
    """Yield index pairs ``i < j`` whose hashes (plain or mirrored) are within the distance."""
    n = len(hashes)
    for start in range(0, n, chunk):
        block = hashes[start:start + chunk, None]
        dist = np.minimum(_popcount(block ^ hashes[None, :]), _popcount(block ^ mirrors[None, :]))
        rows, cols = np.nonzero(dist <= max_distance)
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            i = start + r
            if i < c:
                yield i, c


def group_items(
    hashes: Sequence[tuple[int, int]], names: Sequence[str] | None, max_distance: int
) -> list[int]:
    """Group id (the smallest member index) for every item."""
    plain = np.array([h for h, _ in hashes], dtype=np.uint64)
    mirror = np.array([m for _, m in hashes], dtype=np.uint64)
    uf = UnionFind(len(hashes))
    for i, j in near_pairs(plain, mirror, max_distance):
        uf.union(i, j)
    if names is not None:
        first: dict[str, int] = {}
        for i, name in enumerate(names):
            uf.union(first.setdefault(name, i), i)
    return [uf.find(i) for i in range(len(hashes))]


def grouped_stratified_split(
    labels: Sequence[str], groups: Sequence[int], seed: int,
    fractions: dict[str, float] | None = None,
) -> list[str]:
    """Assign each item a split name; every group lands whole in one split.

    Groups are placed largest first (shuffled within a size, seeded) into the split whose
    per-class quota is least filled, weighted by the group's class mix.
    """
    fractions = fractions or SPLIT_FRACTIONS
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    totals = Counter(labels)
    filled: dict[str, Counter[str]] = {s: Counter() for s in fractions}
    order = list(members)
    random.Random(seed).shuffle(order)
    order.sort(key=lambda g: -len(members[g]))
    assignment = [""] * len(labels)
    for g in order:
        mix = Counter(labels[i] for i in members[g])

        def need(split: str, mix: Counter[str] = mix) -> float:
            score = 0.0
            for cls, n in mix.items():
                quota = fractions[split] * totals[cls]
                score += n * (quota - filled[split][cls]) / max(quota, 1e-9)
            return score

        best = max(fractions, key=need)
        filled[best].update(mix)
        for i in members[g]:
            assignment[i] = best
    return assignment


def check_no_leak(groups: Sequence[int], splits: Sequence[str]) -> None:
    """Raise ``AssertionError`` if any group is in two splits."""
    seen: dict[int, str] = {}
    for g, s in zip(groups, splits, strict=True):
        if seen.setdefault(g, s) != s:
            raise AssertionError(f"group {g} is in both {seen[g]} and {s}")


def write_manifest(path: Path, manifest: dict) -> None:
    """Write a split manifest as pretty JSON (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n")
    logger.info("wrote split manifest %s", path)


def read_manifest(path: Path) -> dict:
    """Read a split manifest written by :func:`write_manifest`."""
    return json.loads(path.read_text())
