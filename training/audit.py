"""Blind relabelling of a split of a folder data set against the project's class definitions.

The public folder sets label a face ``with_mask`` whenever a mask is on it, even when it
sits under the nose; the design counts that as a violation. An audit looks at the faces of
one split again, without the file names and without any model's prediction:

1. ``sheets`` draws the split's images in a seeded random order onto numbered contact
   sheets in ``DIR/sheets/``, with ``RATERS.md`` (the label definitions and how to read
   the sheets) and ``ratings-template.json``, and writes the private key ``DIR/key.json``
   (number -> file). Hand the raters ``DIR/sheets/`` only. The seed and the manifest
   rebuild the key, so pick a seed the raters do not know (the key records it).
   ``--only-label mask`` draws only the faces the data set labels ``mask`` (the audit's
   scope), as for the training and validation audits; an evaluation split is best drawn
   whole, so that the raters cannot know any face's label either.
2. Each rater fills a copy of the template: ``{"<number>": "<label>"}``, a label from
   ``RATER_LABELS`` for every number.
3. ``merge`` joins the key and at least two raters' files into an audit file (committed
   under ``training/audits/``). A face takes a new label only when every rater gave the
   same label, not ``unclear``, and it differs from the data set's; in every other case the
   data set's label stays.

``maskmesh evaluate --audit FILE`` then reports the split against both label sets (the
audit can lower a model's score as well as raise it), and ``maskmesh train --audit FILE``
trains on the audited labels.

Usage, from the repository root after ``scripts/setup test`` (``. .venv/bin/activate``);
the images are read from ``$MASKMESH_SHARED/datasets`` (default ``../shared``) or
``--data-root``::

    python -m training.audit sheets --manifest M --dataset chandrikadeb7 --split test \\
        --out DIR [--seed 0] [--only-label mask]
    python -m training.audit merge --manifest M --dataset chandrikadeb7 --split test \\
        --key DIR/key.json --ratings A.json B.json --out training/audits/FILE.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np

from training.card import sha256
from training.data import CLASS_NAMES, Sample
from training.prepare import SplitData, manifest_digest

RATER_LABELS = (*CLASS_NAMES, "unclear")
DEFINITION = {
    "mask": "a mask or cloth covering covers both the nose and the mouth",
    "no_mask": "nothing covers the nose and the mouth (a hand in front of the face is not a "
               "covering)",
    "incorrect": "a mask is worn but leaves the nose or the mouth (or both) bare: under the "
                 "nose (its top edge leaves the nose tip or the nostrils bare), on the chin, "
                 "hanging from one ear",
    "unclear": "the rater cannot tell (too small, too blurred, not a face)",
}


class AuditError(ValueError):
    """An audit, key or rating file that cannot be used as given."""


def _tile(image: np.ndarray, size: int) -> np.ndarray:
    """The image scaled to fit a ``size`` square, aspect kept, on a grey background."""
    import cv2

    h, w = image.shape[:2]
    scale = size / max(h, w)
    resized = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))),
                         interpolation=cv2.INTER_AREA)
    out = np.full((size, size, 3), 128, np.uint8)
    y, x = (size - resized.shape[0]) // 2, (size - resized.shape[1]) // 2
    out[y:y + resized.shape[0], x:x + resized.shape[1]] = resized
    return out


SHEET_COLS, SHEET_ROWS = 5, 4


def make_sheets(paths: list[str], data_root: Path, out_dir: Path, seed: int = 0,
                cols: int = SHEET_COLS, rows: int = SHEET_ROWS, tile: int = 224,
                force: bool = False
                ) -> dict[str, str]:
    """Numbered contact sheets of ``paths`` (relative to ``data_root``) in ``out_dir``.

    Returns the key, number -> path. An ``out_dir`` that already holds sheets is refused
    unless ``force``: ratings made on the old sheets would no longer match. Nothing is
    written unless every image reads.
    """
    import shutil

    import cv2

    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise AuditError(f"{out_dir}: already holds sheets; ratings made on them would "
                         "not match new ones (choose another --out, or --force)")
    order = list(paths)
    random.Random(seed).shuffle(order)
    band = 28
    per_sheet = cols * rows
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        for start in range(0, len(order), per_sheet):
            sheet = np.full((rows * (tile + band), cols * tile, 3), 255, np.uint8)
            for k, rel in enumerate(order[start:start + per_sheet]):
                file = data_root / rel
                image = cv2.imread(str(file), cv2.IMREAD_COLOR) if file.is_file() else None
                if image is None:
                    why = "not a readable image" if file.is_file() else "no such file"
                    raise AuditError(f"{file}: {why}")
                r, c = divmod(k, cols)
                y, x = r * (tile + band), c * tile
                sheet[y + band:y + band + tile, x:x + tile] = _tile(image, tile)
                cv2.putText(sheet, str(start + k + 1), (x + 6, y + band - 7),
                            cv2.FONT_HERSHEY_SIMPLEX, 0.8, (0, 0, 0), 2, cv2.LINE_AA)
            cv2.imwrite(str(tmp / f"sheet-{start // per_sheet + 1:02d}.png"), sheet)
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.replace(out_dir)
    except OSError as exc:
        raise AuditError(f"{out_dir}: cannot write the sheets ({exc})") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {str(i + 1): p for i, p in enumerate(order)}


def _unique_pairs(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ValueError(f"keys given more than once: {repeated[:10]}")
    return dict(pairs)


def _read_json(path: Path, what: str) -> object:
    try:
        return json.loads(path.read_text(), object_pairs_hook=_unique_pairs)
    except (OSError, ValueError) as exc:
        raise AuditError(f"{path}: not a readable {what} ({exc})") from exc


def read_key(path: Path) -> dict:
    """A key written by ``sheets``: its header and ``faces`` (number -> path)."""
    key = _read_json(path, "key file")
    faces = key.get("faces") if isinstance(key, dict) else None
    if (not isinstance(key, dict) or not isinstance(faces, dict) or not faces
            or not all(k.isdigit() and isinstance(v, str) for k, v in faces.items())
            or not all(f in key for f in ("dataset", "split", "scope", "seed"))):
        raise AuditError(f"{path}: not a key written by 'sheets' (expected dataset, split, "
                         "scope, seed and faces: an object of number -> image path)")
    if len(set(faces.values())) != len(faces):
        raise AuditError(f"{path}: gives one face more than one number")
    return key


def read_ratings(path: Path, numbers: set[str]) -> dict[str, str]:
    """A rater's ``{"number": label}``; every number rated once, every label known."""
    ratings = _read_json(path, "JSON file of ratings")
    if not isinstance(ratings, dict):
        raise AuditError(f"{path}: expected an object of number -> label")
    missing = sorted(numbers - ratings.keys(), key=int)
    extra = sorted(ratings.keys() - numbers)
    bad = {k: v for k, v in ratings.items() if v not in RATER_LABELS}
    problems = []
    if missing:
        problems.append(f"{len(missing)} numbers not rated, e.g. {missing[:10]}")
    if extra:
        problems.append(f"{len(extra)} numbers not on the sheets, e.g. {extra[:10]}")
    if bad:
        problems.append(f"{len(bad)} labels not in {RATER_LABELS}, e.g. "
                        f"{dict(list(bad.items())[:10])}")
    if problems:
        raise AuditError(f"{path}: " + "; ".join(problems))
    return ratings


def merge(key: dict[str, str], labels: dict[str, str], ratings: list[dict[str, str]],
          dataset: str, split: str, manifest_name: str,
          scope: list[str] | None = None) -> dict:
    """The audit document: every face, its data set label, the ratings, the audited label.

    ``scope`` names the data set labels whose faces were all drawn (default: those in
    ``labels``); faces with other labels keep them without being looked at.
    """
    items = []
    for number in sorted(key, key=int):
        path = key[number]
        given = [r[number] for r in ratings]
        audited = labels[path]
        if len(set(given)) == 1 and given[0] != "unclear":
            audited = given[0]
        items.append({"path": path, "dataset_label": labels[path], "ratings": given,
                      "audited_label": audited})
    changed: dict[str, int] = {}
    for item in items:
        if item["audited_label"] != item["dataset_label"]:
            move = f"{item['dataset_label']} -> {item['audited_label']}"
            changed[move] = changed.get(move, 0) + 1
    agree = sum(len(set(i["ratings"])) == 1 for i in items)
    return {
        "dataset": dataset, "split": split, "split_manifest": manifest_name,
        "scope": sorted(scope or set(labels.values())), "raters": len(ratings),
        "definition": DEFINITION,
        "rule": "a face takes the raters' label only when all raters gave the same label, "
                "not 'unclear', and it differs from the data set's; otherwise the data "
                "set's label stays",
        "faces": len(items), "raters_agree": agree, "changed": changed,
        "items": sorted(items, key=lambda i: i["path"]),
    }


def load_audit(path: Path) -> dict:
    """An audit file, checked for the fields ``evaluate`` and ``train`` need."""
    audit = _read_json(path, "audit file")
    if not isinstance(audit, dict):
        raise AuditError(f"{path}: not an audit file (expected a JSON object)")
    missing = [f for f in ("dataset", "split", "items") if f not in audit]
    items = audit.get("items")
    if missing or not isinstance(items, list) or not all(
            isinstance(i, dict) and isinstance(i.get("path"), str) and "audited_label" in i
            for i in items):
        raise AuditError(f"{path}: not an audit file (needs dataset, split and items: a list "
                         f"of objects with path and audited_label; missing {missing})")
    labels = {i["path"]: i["audited_label"] for i in items}
    if len(items) != len(labels):
        raise AuditError(f"{path}: {len(items) - len(labels)} faces are listed more than once")
    scope = audit.get("scope", list(CLASS_NAMES))
    bad = {p: v for p, v in labels.items() if v not in CLASS_NAMES}
    if bad or not isinstance(scope, list) or not set(scope) <= set(CLASS_NAMES):
        raise AuditError(f"{path}: audited labels or scope not in {CLASS_NAMES}: "
                         f"{dict(list(bad.items())[:5])}, scope {scope}")
    return {"dataset": audit["dataset"], "split": audit["split"], "labels": labels,
            "scope": scope, "path": path, "manifest_digest": audit.get("manifest_digest")}


def audited_labels(audit: dict, samples: list[Sample],
                   class_names: tuple[str, ...] = CLASS_NAMES) -> np.ndarray:
    """Class ids of a split's samples under the audit.

    The audit must cover exactly the samples whose data set label is in its scope; the
    others keep their label.
    """
    if any(s.box is not None for s in samples):
        raise AuditError(f"{audit['path']}: the {audit['dataset']} faces are boxes cut from "
                         "scenes, several to a file; audits cover folder sets only")
    labels = audit["labels"]
    in_scope = {s.path for s in samples if s.label in audit["scope"]}
    if in_scope != set(labels):
        missing = sorted(in_scope - set(labels))
        extra = sorted(set(labels) - in_scope)
        raise AuditError(f"{audit['path']}: does not cover the {audit['dataset']} "
                         f"{audit['split']} split of this manifest ({len(missing)} faces "
                         f"labelled {audit['scope']} not audited, e.g. {missing[:3]}; "
                         f"{len(extra)} audited faces not among them, e.g. {extra[:3]})")
    index = {c: i for i, c in enumerate(class_names)}
    return np.array([index[labels.get(s.path, s.label)] for s in samples], dtype=np.int64)


def apply_audits(audits: list[dict], dataset: str, split: str, data: SplitData) -> SplitData:
    """``data`` with the labels of the audits of (dataset, split), if any."""
    for audit in audits:
        if (audit["dataset"], audit["split"]) == (dataset, split) and len(data):
            data = SplitData(data.images, audited_labels(audit, data.samples), data.samples)
    return data


def write_rater_notes(sheets_dir: Path, faces: dict[str, str]) -> None:
    """``RATERS.md`` (definitions, how to read a sheet) and an empty ratings template."""
    labels = "\n".join(f"- `{k}`: {v}" for k, v in DEFINITION.items())
    (sheets_dir / "RATERS.md").write_text(
        "# Rating the faces on these sheets\n\n"
        f"Each sheet holds up to {SHEET_COLS * SHEET_ROWS} images ({SHEET_COLS} a row), each "
        "with its number just above its top-left corner; grey bars are padding. Sheet k "
        f"holds numbers (k-1)*{SHEET_COLS * SHEET_ROWS}+1 onwards. Give every number one "
        "label, from the pixels alone, without looking at anything else about the images "
        "or at another rater's work:\n\n"
        f"{labels}\n\nA mask whose top edge leaves the nose tip or the nostrils bare is "
        "`incorrect`. Where a picture shows several people, label the largest face.\n\n"
        "Fill a copy of `ratings-template.json` (every value one of the labels above) and "
        "return it.\n")
    (sheets_dir / "ratings-template.json").write_text(
        json.dumps({n: "" for n in sorted(faces, key=int)}, indent=0))


def _manifest_entries(path: Path, dataset: str, split: str) -> tuple[list, str]:
    manifest = _read_json(path, "split manifest")
    try:
        if not isinstance(manifest, dict):
            raise TypeError("not an object")
        entries = manifest["datasets"].get(dataset, {}).get(split, [])
    except (TypeError, AttributeError, KeyError) as exc:
        raise AuditError(f"{path}: not a split manifest (no 'datasets' object)") from exc
    if not entries:
        raise AuditError(f"{path} has no {dataset} {split} split")
    if any(e[2] for e in entries):
        raise AuditError(f"{dataset} faces are boxes in scenes; audits cover folder sets only")
    return entries, manifest_digest(manifest)


def _sheets(args: argparse.Namespace) -> str:
    from training.paths import default_data_root

    entries, digest = _manifest_entries(args.manifest, args.dataset, args.split)
    scope = [args.only_label] if args.only_label else sorted({e[1] for e in entries})
    entries = [e for e in entries if e[1] in scope]
    if not entries:
        raise AuditError(f"no {args.dataset} {args.split} face is labelled {args.only_label}")
    key_path = args.out / "key.json"
    if key_path.exists() and not args.force:
        raise AuditError(f"{key_path} exists: ratings made with it would not match new "
                         "sheets (choose another --out, or --force)")
    root = (args.data_root or default_data_root()) / args.dataset
    faces = make_sheets([e[0] for e in entries], root, args.out / "sheets", args.seed,
                        force=args.force)
    write_rater_notes(args.out / "sheets", faces)
    key = {"dataset": args.dataset, "split": args.split, "scope": scope, "seed": args.seed,
           "split_manifest": args.manifest.name, "manifest_digest": digest, "faces": faces}
    try:
        key_path.write_text(json.dumps(key, indent=0))
    except OSError as exc:
        raise AuditError(f"{key_path}: cannot write the key ({exc})") from exc
    return (f"{len(faces)} faces on sheets in {args.out / 'sheets'}; key (keep it from the "
            f"raters) {key_path}")


def _merge(args: argparse.Namespace) -> str:
    entries, digest = _manifest_entries(args.manifest, args.dataset, args.split)
    key = read_key(args.key)
    if (key["dataset"], key["split"]) != (args.dataset, args.split):
        raise AuditError(f"{args.key}: a key of {key['dataset']} {key['split']}, not "
                         f"{args.dataset} {args.split}")
    scope = list(key["scope"])
    labels = {e[0]: e[1] for e in entries if e[1] in scope}
    if set(key["faces"].values()) != set(labels):
        raise AuditError(f"{args.key}: its faces are not the {args.dataset} {args.split} "
                         f"faces labelled {scope} in {args.manifest}")
    files = [p.resolve() for p in args.ratings]
    if len(files) < 2 or len(set(files)) != len(files):
        raise AuditError("an audit needs at least two raters, each with their own file")
    if args.out.resolve() in (*files, args.key.resolve()):
        raise AuditError(f"--out {args.out} would overwrite the key or a ratings file")
    ratings = [read_ratings(p, set(key["faces"])) for p in args.ratings]
    if key.get("manifest_digest") not in (None, digest):
        print(f"warning: {args.key} was drawn from another version of {args.manifest} "
              "(its faces still match this split)", file=sys.stderr)
    shas = [sha256(p) for p in args.ratings]
    if len(set(shas)) != len(shas):
        # Independent raters can agree on every face of a small set; a copied file looks
        # the same, so say so and let the person merging decide.
        print("warning: two ratings files are byte-identical; make sure they come from "
              "different raters", file=sys.stderr)
    audit = merge(key["faces"], labels, ratings, args.dataset, args.split,
                  args.manifest.name, scope)
    audit = {**{k: v for k, v in audit.items() if k != "items"}, "manifest_digest": digest,
             "sheet_seed": key["seed"], "identical_rating_files": len(set(shas)) != len(shas),
             "rater_files": [{"name": p.name, "sha256": h} for p, h in zip(args.ratings, shas,
                                                                            strict=True)],
             "items": audit["items"]}
    body = {k: v for k, v in audit.items() if k != "items"}
    lines = ",\n".join("  " + json.dumps(i, ensure_ascii=False) for i in audit["items"])
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(body, indent=1, ensure_ascii=False)[:-2]
                            + ',\n "items": [\n' + lines + "\n ]\n}\n")
    except OSError as exc:
        raise AuditError(f"{args.out}: cannot write the audit ({exc})") from exc
    return (f"wrote {args.out}: {audit['faces']} faces, raters agree on "
            f"{audit['raters_agree']}, changed {audit['changed']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.audit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sheets", help="numbered contact sheets of one split, and the key")
    s.add_argument("--manifest", type=Path, required=True)
    s.add_argument("--dataset", required=True)
    s.add_argument("--split", required=True)
    s.add_argument("--data-root", type=Path, default=None)
    s.add_argument("--out", type=Path, required=True, help="folder for sheets/ and key.json")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--only-label", default=None, choices=CLASS_NAMES,
                   help="draw only the faces the data set gives this label (the audit's "
                        "scope); default: every face")
    s.add_argument("--force", action="store_true", help="replace existing sheets and key")
    m = sub.add_parser("merge", help="join the key and the ratings into an audit file")
    m.add_argument("--manifest", type=Path, required=True)
    m.add_argument("--dataset", required=True)
    m.add_argument("--split", required=True)
    m.add_argument("--key", type=Path, required=True)
    m.add_argument("--ratings", type=Path, nargs="+", required=True,
                   help="one JSON file per rater (at least two)")
    m.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        print(_sheets(args) if args.cmd == "sheets" else _merge(args))
    except AuditError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
