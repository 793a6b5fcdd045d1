"""Grouped split: near-duplicates and mirror copies never straddle splits; classes stratified."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from training.split import (
    SPLIT_FRACTIONS,
    check_no_leak,
    group_items,
    grouped_stratified_split,
    image_hashes,
)


def _scene(seed: int) -> np.ndarray:
    """A smooth random picture (pHash needs low-frequency structure, not pixel noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)
    return cv2.resize(small, (96, 96), interpolation=cv2.INTER_CUBIC)


def test_flipped_and_resaved_copies_share_a_group() -> None:
    base = [_scene(i) for i in range(40)]
    images = list(base)
    images.append(base[0][:, ::-1].copy())  # mirror of 0
    ok, jpg = cv2.imencode(".jpg", base[1], [cv2.IMWRITE_JPEG_QUALITY, 60])
    assert ok
    images.append(cv2.imdecode(jpg, cv2.IMREAD_COLOR))  # re-encoded 1
    images.append(cv2.resize(base[2], (80, 80)))  # rescaled 2
    groups = group_items([image_hashes(im) for im in images], None, max_distance=6)
    assert groups[40] == groups[0]
    assert groups[41] == groups[1]
    assert groups[42] == groups[2]
    assert len(set(groups[:40])) == 40, "distinct pictures must not merge"


def test_name_copies_share_a_group() -> None:
    hashes = [(i * 0x0F0F0F0F0F0F0F0F % (1 << 64), i) for i in range(1, 4)]
    groups = group_items(hashes, ["a", "b", "a"], max_distance=0)
    assert groups[0] == groups[2] != groups[1]


def test_split_keeps_groups_whole_and_is_stratified() -> None:
    rng = np.random.default_rng(0)
    labels, groups = [], []
    gid = 0
    for cls, n_groups in (("mask", 300), ("no_mask", 250), ("incorrect", 40)):
        for _ in range(n_groups):
            size = int(rng.integers(1, 5))
            labels += [cls] * size
            groups += [gid] * size
            gid += 1
    splits = grouped_stratified_split(labels, groups, seed=0)
    check_no_leak(groups, splits)
    totals = Counter(labels)
    for cls in totals:
        counts = Counter(s for s, lab in zip(splits, labels, strict=True) if lab == cls)
        for split, frac in SPLIT_FRACTIONS.items():
            assert abs(counts[split] / totals[cls] - frac) < 0.05, (cls, split, counts)
    assert splits == grouped_stratified_split(labels, groups, seed=0), "split must repeat"


def test_shipped_manifest_has_no_leak(shared) -> None:  # noqa: ANN001 - pytest fixture
    """The committed manifest: no file in two splits, andrewmvd never in a training split."""
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "models" / "splits"
    manifests = sorted(path.glob("split-*.json"))
    if not manifests:
        import pytest

        pytest.skip("no committed split manifest")
    manifest = json.loads(manifests[0].read_text())
    for ds, splits in manifest["datasets"].items():
        seen: dict[str, str] = {}
        group_split: dict[int, str] = {}
        for split, entries in splits.items():
            for path_, _, _, group in entries:
                assert seen.setdefault(path_, split) == split, (ds, path_)
                assert group_split.setdefault(group, split) == split, (ds, group)
    assert set(manifest["datasets"]["andrewmvd"]) == {"cross"}
    excluded = set(manifest["excluded"]["ilc2021_overlapping_andrewmvd"])
    ilc_train = {e[0] for e in manifest["datasets"]["ilc2021"]["train"]}
    assert not excluded & ilc_train


@pytest.mark.parametrize("content", ["[]", "{}", "not json", '{"datasets": {}}',
                                     '{"datasets": {"chandrikadeb7": []}}'])
def test_a_malformed_manifest_is_named_not_a_traceback(content: str, tmp_path: Path) -> None:
    from training.data import DatasetError
    from training.prepare import PrepareConfig, load_or_build_manifest

    path = tmp_path / "split.json"
    path.write_text(content)
    cfg = PrepareConfig(data_root=tmp_path, run_root=tmp_path, manifest=path)
    with pytest.raises(DatasetError, match=f"split manifest {path}"):
        load_or_build_manifest(cfg)
