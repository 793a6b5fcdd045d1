"""Build (or reload) the split manifest and the decoded-crop caches for a training run."""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from training.data import (
    CLASS_NAMES,
    DatasetError,
    ReadReport,
    Sample,
    load_crops,
    name_stem,
    read_folder_dataset,
    read_voc_dataset,
)
from training.split import (
    check_no_leak,
    group_items,
    grouped_stratified_split,
    image_hashes,
    read_manifest,
    write_manifest,
)

logger = logging.getLogger(__name__)

FOLDER_SET = "chandrikadeb7"
VOC_TRAIN_SET = "ilc2021"
VOC_CROSS_SET = "andrewmvd"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class PrepareConfig:
    """What decides the split and the crops.

    Args:
        data_root: folder holding the data set folders (``../shared/datasets``).
        run_root: folder for caches and manifests (``runs/``).
        seed: split seed.
        face_margin: fraction of the box width/height added on each side of a VOC face.
        min_face_px: narrowest VOC face box kept.
        cache_size: side of the square cached crops.
        max_distance: pHash Hamming distance that makes two images one group.
        manifest: manifest to reuse instead of building one (``None``: build or reuse the
            default one under ``run_root/splits``).
    """

    data_root: Path
    run_root: Path
    seed: int = 0
    face_margin: float = 0.2
    min_face_px: int = 32
    cache_size: int = 256
    max_distance: int = 6
    manifest: Path | None = None

    def tag(self) -> str:
        """Short name that changes whenever the split would change."""
        return (f"seed{self.seed}-m{self.face_margin:g}-w{self.min_face_px}"
                f"-d{self.max_distance}")


@dataclass
class SplitData:
    """Decoded crops of one (data set, split): RGB uint8 ``N x S x S x 3`` and class ids."""

    images: np.ndarray
    labels: np.ndarray
    samples: list[Sample] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)


def _entry(sample: Sample, group: int) -> list:
    return [sample.path, sample.label, list(sample.box) if sample.box else None, group]


def _sample(dataset: str, entry: list) -> Sample:
    path, label, box = entry[:3]
    return Sample(dataset, path, label, tuple(box) if box else None)


def _cache_paths(cfg: PrepareConfig, dataset: str) -> tuple[Path, Path]:
    stem = f"{dataset}-s{cfg.cache_size}-m{cfg.face_margin:g}"
    base = cfg.run_root / "cache"
    return base / f"{stem}.npy", base / f"{stem}.keys.json"


def _save_cache(cfg: PrepareConfig, dataset: str, images: np.ndarray,
                samples: list[Sample]) -> None:
    npy, keys = _cache_paths(cfg, dataset)
    npy.parent.mkdir(parents=True, exist_ok=True)
    np.save(npy, images)
    keys.write_text(json.dumps([s.key for s in samples]))


def _load_cached(cfg: PrepareConfig, dataset: str, samples: list[Sample]) -> np.ndarray:
    """Crops for ``samples``, from the cache when it holds them all, else decoded now."""
    npy, keys_path = _cache_paths(cfg, dataset)
    if npy.is_file() and keys_path.is_file():
        index = {k: i for i, k in enumerate(json.loads(keys_path.read_text()))}
        if all(s.key in index for s in samples):
            cached = np.load(npy, mmap_mode="r")
            return np.ascontiguousarray(cached[[index[s.key] for s in samples]])
    images, kept = load_crops(cfg.data_root, samples, cfg.cache_size, cfg.face_margin)
    if len(kept) != len(samples):
        raise DatasetError(f"{dataset}: {len(samples) - len(kept)} manifest files no longer "
                           "decode")
    return images


def _check_classes(report: ReadReport, needed: tuple[str, ...]) -> None:
    for cls in needed:
        if report.kept[cls] == 0:
            raise DatasetError(f"{report.dataset}: class {cls!r} has no readable image")


def build_manifest(cfg: PrepareConfig) -> dict:
    """Read all three sets, group near-duplicates across them and split; fills the caches."""
    root = cfg.data_root
    folder_samples, folder_report = read_folder_dataset(root / FOLDER_SET, FOLDER_SET)
    folder_images, folder_samples = load_crops(
        root, folder_samples, cfg.cache_size, cfg.face_margin, folder_report)
    _check_classes(folder_report, ("mask", "no_mask"))
    _save_cache(cfg, FOLDER_SET, folder_images, folder_samples)

    # One hash list over every file of every set, so a group can span sets.
    hashes: list[tuple[int, int]] = []
    names: list[str] = []
    owners: list[tuple[str, str]] = []
    for sample, img in zip(folder_samples, folder_images, strict=True):
        hashes.append(image_hashes(cv2.cvtColor(img, cv2.COLOR_RGB2BGR)))
        names.append(f"{FOLDER_SET}:{name_stem(sample.path)}")
        owners.append((FOLDER_SET, sample.path))

    voc: dict[str, tuple[list[Sample], ReadReport]] = {}
    for dataset in (VOC_TRAIN_SET, VOC_CROSS_SET):
        def on_scene(rel: str, image: np.ndarray, dataset: str = dataset) -> None:
            hashes.append(image_hashes(image))
            names.append(f"{dataset}:{rel}")
            owners.append((dataset, rel))

        samples, report, _ = read_voc_dataset(root / dataset, dataset, cfg.min_face_px,
                                              on_scene)
        images, samples = load_crops(root, samples, cfg.cache_size, cfg.face_margin, report)
        _save_cache(cfg, dataset, images, samples)
        voc[dataset] = (samples, report)
    groups = group_items(hashes, names, cfg.max_distance)
    group_of = {owner: g for owner, g in zip(owners, groups, strict=True)}

    # An ilc2021 photo that matches any andrewmvd photo would leak the cross-dataset set.
    cross_groups = {g for (ds, _), g in group_of.items() if ds == VOC_CROSS_SET}
    ilc_samples = voc[VOC_TRAIN_SET][0]
    excluded_set = {s.path for s in ilc_samples
                    if group_of[(VOC_TRAIN_SET, s.path)] in cross_groups}
    excluded = sorted(excluded_set)
    ilc_kept = [s for s in ilc_samples if s.path not in excluded_set]

    items = [(FOLDER_SET, s) for s in folder_samples] + [(VOC_TRAIN_SET, s) for s in ilc_kept]
    item_groups = [group_of[(ds, s.path)] for ds, s in items]
    strata = [f"{ds}:{s.label}" for ds, s in items]
    splits = grouped_stratified_split(strata, item_groups, cfg.seed)
    check_no_leak(item_groups, splits)

    datasets: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    counts: dict[str, dict[str, Counter[str]]] = defaultdict(lambda: defaultdict(Counter))
    for (ds, s), split, g in zip(items, splits, item_groups, strict=True):
        datasets[ds][split].append(_entry(s, g))
        counts[ds][split][s.label] += 1
    for s in voc[VOC_CROSS_SET][0]:
        datasets[VOC_CROSS_SET]["cross"].append(_entry(s, group_of[(VOC_CROSS_SET, s.path)]))
        counts[VOC_CROSS_SET]["cross"][s.label] += 1

    group_sizes = Counter(Counter(item_groups).values())
    return {
        "version": MANIFEST_VERSION,
        "config": {"seed": cfg.seed, "face_margin": cfg.face_margin,
                   "min_face_px": cfg.min_face_px, "phash_bits": 64,
                   "phash_max_distance": cfg.max_distance, "mirror_hash": True,
                   "same_stem_grouping": True, "fractions": {"train": 0.8, "test": 0.15,
                                                             "validation": 0.05}},
        "groups": {"items": len(items), "groups": len(set(item_groups)),
                   "multi_member_groups": sum(n for size, n in group_sizes.items() if size > 1),
                   "largest_group": max(group_sizes) if group_sizes else 0},
        "counts": {ds: {sp: dict(c) for sp, c in per.items()} for ds, per in counts.items()},
        "excluded": {"ilc2021_overlapping_andrewmvd": excluded},
        "read_reports": {FOLDER_SET: folder_report.as_dict(),
                         **{ds: rep.as_dict() for ds, (_, rep) in voc.items()}},
        "datasets": {ds: dict(per) for ds, per in datasets.items()},
    }


def manifest_digest(manifest: dict) -> str:
    """sha256 of the split lists, to tie a model to its split."""
    lists = {ds: {sp: [e[:3] for e in entries] for sp, entries in per.items()}
             for ds, per in manifest["datasets"].items()}
    blob = json.dumps(lists, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _checked_manifest(path: Path) -> dict:
    """A manifest file read back, or a DatasetError naming the file and what is wrong."""
    try:
        manifest = read_manifest(path)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"split manifest {path} is not readable JSON: {exc}") from exc
    datasets = manifest.get("datasets") if isinstance(manifest, dict) else None
    if (not isinstance(datasets, dict) or not datasets
            or not all(isinstance(per, dict) and all(isinstance(e, list) for e in per.values())
                       for per in datasets.values())):
        raise DatasetError(f"split manifest {path} is not one written by maskmesh (expected "
                           "'datasets': data set -> split -> list of faces)")
    return manifest


def load_or_build_manifest(cfg: PrepareConfig) -> tuple[dict, Path]:
    """Reuse the given or default manifest if present, else build and write it."""
    path = cfg.manifest or cfg.run_root / "splits" / f"split-{cfg.tag()}.json"
    if path.is_file():
        logger.info("reusing split manifest %s", path)
        return _checked_manifest(path), path
    if cfg.manifest is not None:
        raise DatasetError(f"split manifest not found: {path}")
    manifest = build_manifest(cfg)
    write_manifest(path, manifest)
    return manifest, path


def split_data(cfg: PrepareConfig, manifest: dict, dataset: str, split: str,
               class_names: tuple[str, ...] = CLASS_NAMES) -> SplitData:
    """Crops and labels of one split of one data set."""
    entries = manifest["datasets"].get(dataset, {}).get(split, [])
    samples = [_sample(dataset, e) for e in entries]
    index = {c: i for i, c in enumerate(class_names)}
    if not samples:
        return SplitData(np.zeros((0, cfg.cache_size, cfg.cache_size, 3), np.uint8),
                         np.zeros(0, np.int64), [])
    images = _load_cached(cfg, dataset, samples)
    labels = np.array([index[s.label] for s in samples], dtype=np.int64)
    return SplitData(images, labels, samples)


def concat(parts: list[SplitData]) -> SplitData:
    """Join splits (e.g. two data sets' train parts)."""
    parts = [p for p in parts if len(p)]
    return SplitData(np.concatenate([p.images for p in parts]),
                     np.concatenate([p.labels for p in parts]),
                     [s for p in parts for s in p.samples])
