"""The blind relabelling audit: sheets, the merge rule, and how evaluate reads an audit."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from training.audit import (
    AuditError,
    apply_audits,
    audited_labels,
    load_audit,
    main,
    make_sheets,
    merge,
    read_ratings,
)
from training.data import Sample
from training.prepare import SplitData


def _folder(tmp_path: Path, n: int) -> tuple[Path, list[str]]:
    root = tmp_path / "set"
    paths = []
    for i in range(n):
        rel = f"{'with_mask' if i % 2 else 'without_mask'}/{i}.jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        # Different shapes: the tile keeps the aspect ratio.
        cv2.imwrite(str(root / rel), np.full((40 + i, 60, 3), 10 * i % 255, np.uint8))
        paths.append(rel)
    return root, paths


def test_sheets_number_every_face_once_in_a_seeded_order(tmp_path: Path) -> None:
    root, paths = _folder(tmp_path, 23)
    key = make_sheets(paths, root, tmp_path / "a" / "sheets", seed=3)
    # 23 faces at 20 a sheet: two sheets, numbers 1..23, each face once.
    assert sorted((tmp_path / "a" / "sheets").iterdir()) == [
        tmp_path / "a" / "sheets" / "sheet-01.png", tmp_path / "a" / "sheets" / "sheet-02.png"]
    assert sorted(key, key=int) == [str(i) for i in range(1, 24)]
    assert sorted(key.values()) == sorted(paths)
    sheet = cv2.imread(str(tmp_path / "a" / "sheets" / "sheet-01.png"))
    assert sheet.shape == (4 * (224 + 28), 5 * 224, 3)
    assert make_sheets(paths, root, tmp_path / "b" / "sheets", seed=3) == key
    assert make_sheets(paths, root, tmp_path / "c" / "sheets", seed=4) != key
    # Sheets already rated are not silently redrawn.
    with pytest.raises(AuditError, match="already holds sheets"):
        make_sheets(paths, root, tmp_path / "a" / "sheets", seed=4)
    assert make_sheets(paths, root, tmp_path / "a" / "sheets", seed=4, force=True) != key


def test_sheets_name_an_unreadable_file_and_write_nothing(tmp_path: Path) -> None:
    root, paths = _folder(tmp_path, 2)
    (root / "with_mask" / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(AuditError, match="bad.jpg: not a readable image"):
        make_sheets([*paths, "with_mask/bad.jpg"], root, tmp_path / "s")
    with pytest.raises(AuditError, match="gone.jpg: no such file"):
        make_sheets([*paths, "with_mask/gone.jpg"], root, tmp_path / "s")
    assert not (tmp_path / "s").exists()


def _key(tmp_path: Path, faces: dict, split: str = "test", scope: list | None = None) -> Path:
    key = tmp_path / "key.json"
    key.write_text(json.dumps({"dataset": "set", "split": split,
                               "scope": scope or ["mask", "no_mask"], "seed": 0,
                               "faces": faces}))
    return key


def _ratings(tmp_path: Path, **raters: dict) -> list[str]:
    out = []
    for name, r in raters.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
        out.append(str(tmp_path / f"{name}.json"))
    return out


def test_ratings_must_cover_every_number_with_a_known_label(tmp_path: Path) -> None:
    f = tmp_path / "r.json"
    f.write_text(json.dumps({"1": "mask", "2": "no_mask"}))
    assert read_ratings(f, {"1", "2"}) == {"1": "mask", "2": "no_mask"}
    with pytest.raises(AuditError, match=r"1 numbers not rated, e.g. \['3'\]"):
        read_ratings(f, {"1", "2", "3"})
    f.write_text(json.dumps({"1": "mask", "2": "masked"}))
    with pytest.raises(AuditError, match="'2': 'masked'"):
        read_ratings(f, {"1", "2"})
    f.write_text("{not json")
    with pytest.raises(AuditError, match="not a readable JSON file"):
        read_ratings(f, {"1"})


def test_merge_changes_a_label_only_when_all_raters_agree() -> None:
    key = {"1": "a.jpg", "2": "b.jpg", "3": "c.jpg", "4": "d.jpg"}
    labels = {"a.jpg": "mask", "b.jpg": "mask", "c.jpg": "no_mask", "d.jpg": "mask"}
    ratings = [{"1": "incorrect", "2": "incorrect", "3": "unclear", "4": "mask"},
               {"1": "incorrect", "2": "mask", "3": "unclear", "4": "mask"}]
    audit = merge(key, labels, ratings, "set", "test", "m.json")
    by_path = {i["path"]: i for i in audit["items"]}
    assert by_path["a.jpg"]["audited_label"] == "incorrect"   # both say incorrect
    assert by_path["b.jpg"]["audited_label"] == "mask"        # raters split: data set stays
    assert by_path["c.jpg"]["audited_label"] == "no_mask"     # both unclear: data set stays
    assert by_path["d.jpg"]["audited_label"] == "mask"
    assert audit["changed"] == {"mask -> incorrect": 1}
    assert audit["raters_agree"] == 3 and audit["faces"] == 4


def _merge(tmp_path: Path, manifest: dict, key: Path, ratings: list[str],
           split: str = "test", out: Path | None = None) -> int:
    m = tmp_path / "m.json"
    m.write_text(json.dumps(manifest))
    return main(["merge", "--manifest", str(m), "--dataset", "set", "--split", split,
                 "--key", str(key), "--ratings", *ratings,
                 "--out", str(out or tmp_path / "audits" / "set.json")])


TWO = {"datasets": {"set": {"test": [["a.jpg", "mask", None, 0], ["b.jpg", "no_mask", None, 1]]}}}


def test_cli_merge_writes_an_audit_that_evaluate_reads(tmp_path: Path) -> None:
    key = _key(tmp_path, {"1": "b.jpg", "2": "a.jpg"})
    ratings = _ratings(tmp_path, A={"1": "no_mask", "2": "incorrect"},
                       B={"2": "incorrect", "1": "no_mask"})
    out = tmp_path / "audits" / "set-test.json"
    assert _merge(tmp_path, TWO, key, ratings, out=out) == 0
    written = json.loads(out.read_text())
    assert [r["name"] for r in written["rater_files"]] == ["A.json", "B.json"]
    audit = load_audit(out)
    assert audit["labels"] == {"a.jpg": "incorrect", "b.jpg": "no_mask"}
    # class ids in CLASS_NAMES order (mask, no_mask, incorrect), in the split's order
    samples = [Sample("set", "a.jpg", "mask"), Sample("set", "b.jpg", "no_mask")]
    assert audited_labels(audit, samples).tolist() == [2, 1]
    with pytest.raises(AuditError, match="does not cover the set test split"):
        audited_labels(audit, [samples[0], Sample("set", "c.jpg", "mask")])
    with pytest.raises(AuditError, match="boxes cut from scenes"):
        audited_labels(audit, [Sample("set", "a.jpg", "mask", (0, 0, 9, 9)), samples[1]])


def test_identical_ratings_merge_with_a_warning(tmp_path: Path, capsys) -> None:
    # Two raters agreeing on every face is possible; the merge says so and goes on.
    key = _key(tmp_path, {"1": "b.jpg", "2": "a.jpg"})
    ratings = _ratings(tmp_path, A={"1": "no_mask", "2": "mask"}, B={"1": "no_mask", "2": "mask"})
    assert _merge(tmp_path, TWO, key, ratings) == 0
    assert "byte-identical" in capsys.readouterr().err


def test_an_audit_of_one_label_leaves_the_other_faces_alone(tmp_path: Path) -> None:
    entries = [["a.jpg", "mask", None, 0], ["b.jpg", "no_mask", None, 1],
               ["c.jpg", "mask", None, 2]]
    key = _key(tmp_path, {"1": "c.jpg", "2": "a.jpg"}, split="train", scope=["mask"])
    ratings = _ratings(tmp_path, A={"1": "incorrect", "2": "mask"},
                       B={"1": "incorrect", "2": "unclear"})
    out = tmp_path / "a.json"
    assert _merge(tmp_path, {"datasets": {"set": {"train": entries}}}, key, ratings,
                  split="train", out=out) == 0
    audit = load_audit(out)
    assert audit["scope"] == ["mask"]
    samples = [Sample("set", p, label) for p, label, _, _ in entries]
    data = SplitData(np.zeros((3, 4, 4, 3), np.uint8), np.array([0, 1, 0]), samples)
    relabelled = apply_audits([audit], "set", "train", data)
    assert relabelled.labels.tolist() == [0, 1, 2]       # b.jpg kept without being rated
    assert apply_audits([audit], "set", "validation", data) is data
    # a mask face the audit never saw is refused, not silently kept
    with pytest.raises(AuditError, match=r"1 faces labelled \['mask'\] not audited"):
        audited_labels(audit, [*samples, Sample("set", "d.jpg", "mask")])


@pytest.mark.parametrize(("case", "message"), [
    ("other faces", "its faces are not the set test faces"),
    ("other split", "a key of set train, not set test"),
    ("one number per face", "gives one face more than one number"),
    ("old key format", "not a key written by 'sheets'"),
    ("one rater", "at least two raters"),
    ("same file twice", "at least two raters, each with their own file"),
    ("out is the key", "would overwrite the key or a ratings file"),
    ("repeated number", "keys given more than once"),
    ("no manifest split", "has no set cross split"),
])
def test_cli_merge_refuses(tmp_path: Path, capsys, case: str, message: str) -> None:
    faces = {"1": "b.jpg", "2": "a.jpg"}
    key = _key(tmp_path, faces)
    ratings = _ratings(tmp_path, A={"1": "no_mask", "2": "mask"},
                       B={"1": "no_mask", "2": "incorrect"})
    split, out = "test", None
    if case == "other faces":
        key = _key(tmp_path, {"1": "b.jpg", "2": "z.jpg"})
    elif case == "other split":
        key = _key(tmp_path, faces, split="train")
    elif case == "one number per face":
        key = _key(tmp_path, {"1": "b.jpg", "2": "a.jpg", "3": "a.jpg"})
    elif case == "old key format":
        key.write_text(json.dumps(faces))
    elif case == "one rater":
        ratings = ratings[:1]
    elif case == "same file twice":
        ratings = [ratings[0], ratings[0]]
    elif case == "out is the key":
        out = key
    elif case == "repeated number":
        Path(ratings[1]).write_text('{"1": "no_mask", "2": "mask", "1": "mask"}')
    elif case == "no manifest split":
        split = "cross"
    assert _merge(tmp_path, TWO, key, ratings, split=split, out=out) == 2
    assert message in capsys.readouterr().err
    assert key.is_file()


def test_load_audit_names_a_broken_file(tmp_path: Path) -> None:
    f = tmp_path / "a.json"
    f.write_text(json.dumps({"dataset": "set"}))
    with pytest.raises(AuditError, match="a.json: not an audit file"):
        load_audit(f)
    f.write_text(json.dumps({"dataset": "set", "split": "test",
                             "items": [{"path": "a.jpg", "audited_label": "masked"}]}))
    with pytest.raises(AuditError, match="audited labels or scope not in"):
        load_audit(f)
    f.write_text(json.dumps({"dataset": "set", "split": "test",
                             "items": [{"path": "a.jpg", "audited_label": "mask"},
                                       {"path": "a.jpg", "audited_label": "no_mask"}]}))
    with pytest.raises(AuditError, match="1 faces are listed more than once"):
        load_audit(f)


def test_evaluate_refuses_two_audits_of_one_split(tmp_path: Path, capsys) -> None:
    from training.cli import evaluate_main

    audit = {"dataset": "set", "split": "test", "items": [{"path": "a.jpg",
                                                          "audited_label": "mask"}]}
    for name in ("one", "two"):
        (tmp_path / f"{name}.json").write_text(json.dumps(audit))
    with pytest.raises(SystemExit) as exc:
        evaluate_main(["--model", str(tmp_path / "m.onnx"), "--audit", str(tmp_path / "one.json"),
                       "--audit", str(tmp_path / "two.json")])
    assert exc.value.code == 2
    assert "two audits of set-test" in capsys.readouterr().err


def test_sheets_cli_gives_raters_the_definitions_and_a_template(tmp_path: Path) -> None:
    root, paths = _folder(tmp_path / "data", 3)
    m = tmp_path / "m.json"
    m.write_text(json.dumps({"datasets": {"set": {"test": [
        [p, "mask" if p.startswith("with_mask") else "no_mask", None, i]
        for i, p in enumerate(paths)]}}}))
    out = tmp_path / "audit"
    assert main(["sheets", "--manifest", str(m), "--dataset", "set", "--split", "test",
                 "--data-root", str(root.parent), "--out", str(out)]) == 0
    notes = (out / "sheets" / "RATERS.md").read_text()
    assert "`incorrect`: a mask is worn but leaves the nose or the mouth" in notes
    template = json.loads((out / "sheets" / "ratings-template.json").read_text())
    key = json.loads((out / "key.json").read_text())
    assert list(template) == ["1", "2", "3"] and set(key["faces"]) == set(template)
    assert not (out / "sheets" / "key.json").exists()
    # a second draw into the same folder is refused: the key would no longer fit the ratings
    assert main(["sheets", "--manifest", str(m), "--dataset", "set", "--split", "test",
                 "--data-root", str(root.parent), "--out", str(out), "--seed", "1"]) == 2
