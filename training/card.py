"""Write a model card (``models/<name>.md``) from the evaluation JSON of fp32 and int8.

Run after ``maskmesh evaluate`` has written ``docs/model-report/<name>-metrics.json`` and
``<name>-int8-metrics.json``; the prose (recipe, deviations) comes from a JSON spec in
``training/cards/``: ``python -m training.card training/cards/<name>.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from training.paths import models_dir, reports_dir

# The reports as the cards in models/ link them.
_LINK = "../docs/model-report"

SET_TITLES = {
    "chandrikadeb7-test": "chandrikadeb7 grouped test split",
    "chandrikadeb7-test-audited": "chandrikadeb7 grouped test split, audited labels",
    "ilc2021-test": "ilc2021 grouped test split",
    "andrewmvd-cross": "andrewmvd faces >= 32 px (cross-dataset, never trained on)",
}


def sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _pct(v: float | None) -> str:
    return "n/a" if v is None or v != v else f"{100 * v:.2f} %"


def metrics_table(fp32: dict, int8: dict | None) -> list[str]:
    """The headline table: one row per evaluation set, fp32 and int8 side by side."""
    lines = ["| set | faces | accuracy 3-class | mask vs not | macro F1 | AUC | viol. recall | "
             "viol. precision | viol. accuracy | int8 accuracy | int8 AUC |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, m in fp32["sets"].items():
        q = (int8 or {}).get("sets", {}).get(key)
        v = m["violation"]
        q_acc, q_auc = (_pct(q["accuracy"]), f"{q['auc']:.4f}") if q else ("n/a", "n/a")
        lines.append(
            f"| {SET_TITLES.get(key, key)} | {m['n']} | {_pct(m['accuracy'])} | "
            f"{_pct(m['binary_accuracy'])} | {m['macro_f1']:.3f} | {m['auc']:.4f} | "
            f"{_pct(v['recall'])} | {_pct(v['precision'])} | {_pct(v['accuracy'])} | "
            f"{q_acc} | {q_auc} |")
    return lines


def per_class_tables(fp32: dict) -> list[str]:
    """Per-class precision/recall/F1 and the confusion matrix of each set."""
    lines: list[str] = []
    names = fp32["class_names"]
    for key, m in fp32["sets"].items():
        lines += ["", f"**{SET_TITLES.get(key, key)}** (rows true, columns predicted)", "",
                  "| class | precision | recall | F1 | support | " + " | ".join(
                      f"pred {n}" for n in names) + " |",
                  "|---|---|---|---|---|" + "---|" * len(names)]
        for i, cls in enumerate(names):
            pc = m["per_class"][cls]
            row = m["confusion_matrix"][i]
            lines.append(f"| {cls} | {_pct(pc['precision'])} | {_pct(pc['recall'])} | "
                         f"{pc['f1']:.3f} | {pc['support']} | "
                         + " | ".join(str(v) for v in row) + " |")
    return lines


def audited_counts(manifest: dict, audits: list[Path]) -> dict:
    """The manifest's class counts with the audits' label changes applied."""
    counts = json.loads(json.dumps(manifest["counts"]))
    for path in audits:
        audit = json.loads(path.read_text())
        per = counts[audit["dataset"]][audit["split"]]
        for item in audit["items"]:
            if item["audited_label"] != item["dataset_label"]:
                per[item["dataset_label"]] -= 1
                per[item["audited_label"]] = per.get(item["audited_label"], 0) + 1
    return counts


def split_table(manifest: dict, audits: list[Path] | None = None) -> list[str]:
    """Faces per class per split per data set, after the audits the model trained on."""
    lines = ["| data set | split | mask | no_mask | incorrect | total |",
             "|---|---|---|---|---|---|"]
    for ds, per in audited_counts(manifest, audits or []).items():
        for split in ("train", "validation", "test", "cross"):
            if split in per:
                c = per[split]
                total = sum(c.values())
                lines.append(f"| {ds} | {split} | {c.get('mask', 0)} | {c.get('no_mask', 0)} | "
                             f"{c.get('incorrect', 0)} | {total} |")
    return lines


def history_table(history: list[dict]) -> list[str]:
    """Loss and accuracy per epoch."""
    lines = ["| epoch | train loss | train acc | val loss | val acc | epoch time |",
             "|---|---|---|---|---|---|"]
    for h in history:
        lines.append(f"| {h['epoch']} | {h['train_loss']:.4f} | {_pct(h['train_acc'])} | "
                     f"{h['val_loss']:.4f} | {_pct(h['val_acc'])} | "
                     f"{h['train_s'] + h.get('val_s', 0):.0f} s |")
    return lines


def comparison_table(specs: list[dict]) -> list[str]:
    """One row per model: held-out and cross-dataset metrics, size and speed."""
    report = reports_dir()
    lines = ["| model | chandrikadeb7 acc (mask vs not) | chandrikadeb7 F1 | chandrikadeb7 AUC | "
             "chandrikadeb7 audited: acc / AUC | ilc2021 acc 3-class | ilc2021 macro F1 | "
             "andrewmvd acc 3-class / mask vs not | "
             "andrewmvd AUC | andrewmvd violation recall / precision | params | "
             "MB fp32 / int8 | ms/image fp32 / int8 (batch 1) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for spec in specs:
        name = spec["name"]
        path = report / f"{name}-metrics.json"
        if not path.is_file():
            continue
        m = json.loads(path.read_text())
        if m.get("input", "as is") != "as is":
            raise ValueError(f"{path} was made on {m['input']} input; the table compares "
                             "models on the faces as they are")
        q_path = report / f"{name}-int8-metrics.json"
        q = json.loads(q_path.read_text()) if q_path.is_file() else {}
        c, i, a = (m["sets"][k] for k in ("chandrikadeb7-test", "ilc2021-test",
                                           "andrewmvd-cross"))
        ca = m["sets"].get("chandrikadeb7-test-audited")
        audited = f"{_pct(ca['binary_accuracy'])} / {ca['auc']:.4f}" if ca else "n/a"
        sizes = [models_dir() / f"{name}{s}.onnx" for s in ("", "-int8")]
        mb = " / ".join(f"{f.stat().st_size / 1e6:.1f}" for f in sizes if f.is_file())
        ms = " / ".join(f"{d['latency_ms']['batch 1']:.1f}" for d in (m, q)
                        if d.get("latency_ms")) or "n/a"
        lines.append(
            f"| {name} | {_pct(c['binary_accuracy'])} | {c['macro_f1']:.3f} | {c['auc']:.4f} | "
            f"{audited} | {_pct(i['accuracy'])} | {i['macro_f1']:.3f} | {_pct(a['accuracy'])} / "
            f"{_pct(a['binary_accuracy'])} | "
            f"{a['auc']:.4f} | {_pct(a['violation']['recall'])} / "
            f"{_pct(a['violation']['precision'])} | {int(spec['params']) / 1e6:.2f} M | {mb} | "
            f"{ms} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Assemble ``models/<name>.md``."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("spec", type=Path, nargs="?",
                        help="JSON with name, title, summary, recipe, deviations, command, "
                             "manifest, params, history_table (Markdown strings)")
    parser.add_argument("--compare", nargs="+", metavar="SPEC",
                        help="print the side-by-side table of these specs' models instead")
    parsed = parser.parse_args(argv)
    if parsed.compare:
        print("\n".join(comparison_table([json.loads(p.read_text())
                                           for p in map(Path, parsed.compare)])))
        return 0
    if parsed.spec is None:
        parser.error("a spec is required")
    spec = json.loads(parsed.spec.read_text())
    args = argparse.Namespace(
        name=spec["name"], title=spec["title"], summary=spec["summary"],
        recipe=spec["recipe"], deviations=spec["deviations"], command=spec["command"],
        manifest=models_dir().parent / spec["manifest"], params=int(spec["params"]),
        history_table=bool(spec.get("history_table", True)))

    models = models_dir()
    report = reports_dir()
    fp32 = json.loads((report / f"{args.name}-metrics.json").read_text())
    int8_path = report / f"{args.name}-int8-metrics.json"
    int8 = json.loads(int8_path.read_text()) if int8_path.is_file() else None
    for label, results in (("fp32", fp32), ("int8", int8)):
        if results and results.get("input", "as is") != "as is":
            parser.error(f"the {label} report of {args.name} was made on {results['input']} "
                         "input, not on the faces as they are; re-run maskmesh evaluate")
    manifest = json.loads(args.manifest.read_text())
    files = [models / f"{args.name}.onnx", models / f"{args.name}-int8.onnx"]
    history = fp32.get("history") or []

    lines = [f"# {args.title}", "", args.summary, "", "## Files", ""]
    present = [f for f in files if f.is_file()]
    if present:
        lines += ["| file | MB | sha256 |", "|---|---|---|"]
        lines += [f"| `{f.name}` | {f.stat().st_size / 1e6:.1f} | `{sha256(f)}` |"
                  for f in present]
    else:
        lines.append("None committed: this model is not shipped.")
    lines += ["", f"Parameters: {args.params:,}. Model id (metadata): `{fp32['model_id']}`.",
              "Input `image` float32 [N,3,224,224] (resize to 256x256, centre crop 224, RGB, "
              "x/255, ImageNet mean/std); output `probs` float32 [N,3] in the order "
              f"{', '.join(fp32['class_names'])}. Violation: `p_mask < {fp32['threshold']}`.",
              "", "## Data and split", "",
              f"Split manifest: `models/splits/{args.manifest.name}` "
              f"(groups: {manifest['groups']['groups']} over {manifest['groups']['items']} "
              f"training-pool faces, {manifest['groups']['multi_member_groups']} groups with "
              f"more than one member, largest {manifest['groups']['largest_group']}; "
              f"{len(manifest['excluded']['ilc2021_overlapping_andrewmvd'])} ilc2021 photos "
              "dropped because they match an andrewmvd photo).", ""]
    audits = [models_dir().parent / a for a in spec.get("audits", [])]
    lines += split_table(manifest, audits)
    if audits:
        lines += ["", "Labels as trained and evaluated, after the label audits "
                  + ", ".join(f"`{a.relative_to(models_dir().parent)}`" for a in audits)
                  + " (`models/README.md` explains them); the test split is also scored "
                  "against the data set's own labels below."]
    lines += ["", "## Recipe", "", args.recipe, "", "## Deviations from the paper's recipe", "",
              args.deviations, "", "## Results", "",
              "fp32 ONNX, threshold 0.8 for the violation columns; int8 columns are the int8 "
              "file on the same faces.", ""]
    lines += metrics_table(fp32, int8)
    lines += per_class_tables(fp32)
    lat = fp32.get("latency_ms", {})
    lat8 = (int8 or {}).get("latency_ms", {})
    if lat:
        lines += ["", "Latency on the 2-core build machine (ONNX Runtime, 2 threads, from "
                  "decoded 256x256 crops: centre crop, normalisation and inference; taken during "
                  "the evaluation, on a machine other jobs may have shared, so treat as rough; "
                  "`maskmesh bench` is the speed reference): "
                  + "; ".join(f"fp32 {k} {v:.1f} ms/image" for k, v in lat.items())
                  + ("; " + "; ".join(f"int8 {k} {v:.1f} ms/image" for k, v in lat8.items())
                     if lat8 else "") + "."]
    lines += ["", f"![ROC]({_LINK}/{args.name}-roc.png)"]
    if (report / f"{args.name}-history.png").is_file():
        lines += ["", f"![loss and accuracy]({_LINK}/{args.name}-history.png)"]
    if args.history_table and history:
        lines += ["", "### Training history", ""] + history_table(history)
    lines += ["", f"Full report: [{_LINK}/{args.name}-report.md]({_LINK}/{args.name}-report.md).",
              "", "## Reproduce", "", "```sh", args.command, "```", ""]
    (models / f"{args.name}.md").write_text("\n".join(lines))
    print(models / f"{args.name}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
