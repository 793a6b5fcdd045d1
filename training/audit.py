"""Blind relabelling of an evaluation split against the project's class definitions.

The public folder sets label a face ``with_mask`` whenever a mask is on it, even when it
sits under the nose; the design counts that as a violation. An audit looks at every face of
one split again, without the data set's label and without any model's prediction:

1. ``sheets`` draws the split's images in a seeded random order onto numbered contact
   sheets and writes a private key (number -> file). Raters see only the sheets.
2. Each rater writes a JSON object ``{"<number>": "<label>"}`` with a label from
   ``RATER_LABELS`` for every number.
3. ``merge`` joins the key and the ratings into an audit file (committed under
   ``training/audits/``). A face takes a new label only when every rater gave the same
   label and it differs from the data set's; in every other case the data set's label
   stays.

``maskmesh evaluate --audit FILE`` then reports the split against both label sets. The
audit changes labels in both directions, so it can lower a model's score as well as
raise it.

Usage::

    python -m training.audit sheets --dataset chandrikadeb7 --split test --out DIR
    python -m training.audit merge --key DIR/key.json --ratings A.json B.json --out FILE
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np

from training.data import CLASS_NAMES, Sample
from training.prepare import SplitData

RATER_LABELS = (*CLASS_NAMES, "unclear")
DEFINITION = {
    "mask": "a mask or cloth covering covers both the nose and the mouth",
    "no_mask": "nothing covers the nose and the mouth (a hand in front of the face is not a "
               "covering)",
    "incorrect": "a mask is worn but leaves the nose or the mouth (or both) bare: under the "
                 "nose, on the chin, hanging from one ear",
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


def make_sheets(paths: list[str], data_root: Path, out_dir: Path, seed: int = 0,
                cols: int = 5, rows: int = 4, tile: int = 224) -> Path:
    """Numbered contact sheets of ``paths`` (relative to ``data_root``); returns the key."""
    import cv2

    order = list(paths)
    random.Random(seed).shuffle(order)
    out_dir.mkdir(parents=True, exist_ok=True)
    band = 28
    per_sheet = cols * rows
    for start in range(0, len(order), per_sheet):
        sheet = np.full((rows * (tile + band), cols * tile, 3), 255, np.uint8)
        for k, rel in enumerate(order[start:start + per_sheet]):
            image = cv2.imread(str(data_root / rel), cv2.IMREAD_COLOR)
            if image is None:
                raise AuditError(f"{data_root / rel}: not a readable image")
            r, c = divmod(k, cols)
            y, x = r * (tile + band), c * tile
            sheet[y + band:y + band + tile, x:x + tile] = _tile(image, tile)
            cv2.putText(sheet, str(start + k + 1), (x + 6, y + band - 7),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.8, (0, 0, 0), 2, cv2.LINE_AA)
        cv2.imwrite(str(out_dir / f"sheet-{start // per_sheet + 1:02d}.png"), sheet)
    key = out_dir.parent / "key.json"
    key.write_text(json.dumps({str(i + 1): p for i, p in enumerate(order)}, indent=0))
    return key


def read_ratings(path: Path, numbers: set[str]) -> dict[str, str]:
    """A rater's ``{"number": label}``; every number rated, every label known."""
    try:
        ratings = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise AuditError(f"{path}: not a readable JSON file ({exc})") from exc
    if not isinstance(ratings, dict):
        raise AuditError(f"{path}: expected an object of number -> label")
    ratings = {str(k): v for k, v in ratings.items()}
    missing = sorted(numbers - ratings.keys(), key=int)
    extra = sorted(ratings.keys() - numbers)
    bad = {k: v for k, v in ratings.items() if v not in RATER_LABELS}
    if missing or extra or bad:
        raise AuditError(f"{path}: missing numbers {missing[:10]}, unknown numbers "
                         f"{extra[:10]}, labels not in {RATER_LABELS}: "
                         f"{dict(list(bad.items())[:10])}")
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
    try:
        audit = json.loads(path.read_text())
        items = {i["path"]: i["audited_label"] for i in audit["items"]}
        dataset, split = audit["dataset"], audit["split"]
        scope = list(audit.get("scope", CLASS_NAMES))
        count = len(audit["items"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AuditError(f"{path}: not an audit file ({exc!r})") from exc
    if count != len(items):
        raise AuditError(f"{path}: {count - len(items)} faces are listed more than once")
    bad = {p: v for p, v in items.items() if v not in CLASS_NAMES}
    if bad or not set(scope) <= set(CLASS_NAMES):
        raise AuditError(f"{path}: audited labels or scope not in {CLASS_NAMES}: "
                         f"{dict(list(bad.items())[:5])}, scope {scope}")
    return {"dataset": dataset, "split": split, "labels": items, "scope": scope, "path": path}


def audited_labels(audit: dict, samples: list[Sample],
                   class_names: tuple[str, ...] = CLASS_NAMES) -> np.ndarray:
    """Class ids of a split's samples under the audit.

    The audit must cover exactly the samples whose data set label is in its scope; the
    others keep their label.
    """
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
    m = sub.add_parser("merge", help="join the key and the ratings into an audit file")
    m.add_argument("--manifest", type=Path, required=True)
    m.add_argument("--dataset", required=True)
    m.add_argument("--split", required=True)
    m.add_argument("--key", type=Path, required=True)
    m.add_argument("--ratings", type=Path, nargs="+", required=True)
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--only-label", default=None, choices=CLASS_NAMES,
                   help="the --only-label the sheets were drawn with")
    args = parser.parse_args(argv)

    manifest = json.loads(args.manifest.read_text())
    entries = manifest["datasets"].get(args.dataset, {}).get(args.split, [])
    if not entries:
        print(f"error: {args.manifest} has no {args.dataset} {args.split} split",
              file=sys.stderr)
        return 2
    if any(e[2] for e in entries):
        print(f"error: {args.dataset} faces are boxes in scenes; audits cover folder sets "
              "only", file=sys.stderr)
        return 2
    scope = [args.only_label] if args.only_label else sorted({e[1] for e in entries})
    entries = [e for e in entries if e[1] in scope]
    if not entries:
        print(f"error: no {args.dataset} {args.split} face is labelled {args.only_label}",
              file=sys.stderr)
        return 2
    try:
        if args.cmd == "sheets":
            from training.paths import default_data_root

            root = (args.data_root or default_data_root()) / args.dataset
            key = make_sheets([e[0] for e in entries], root, args.out / "sheets", args.seed)
            print(f"sheets in {args.out / 'sheets'}; key (keep from the raters) {key}")
            return 0
        key = json.loads(args.key.read_text())
        labels = {e[0]: e[1] for e in entries}
        if set(key.values()) != set(labels):
            raise AuditError(f"{args.key}: its faces are not the {args.dataset} "
                             f"{args.split} split of {args.manifest}")
        ratings = [read_ratings(p, set(key)) for p in args.ratings]
        audit = merge(key, labels, ratings, args.dataset, args.split, args.manifest.name,
                      scope)
    except AuditError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    body = {k: v for k, v in audit.items() if k != "items"}
    lines = ",\n".join("  " + json.dumps(i) for i in audit["items"])
    args.out.write_text(json.dumps(body, indent=1)[:-2] + ',\n "items": [\n' + lines
                        + "\n ]\n}\n")
    print(f"wrote {args.out}: {audit['faces']} faces, raters agree on "
          f"{audit['raters_agree']}, changed {audit['changed']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
