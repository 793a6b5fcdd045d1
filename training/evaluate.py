"""Metrics, plots and the Markdown/JSON evaluation report."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from training.data import CLASS_NAMES, MASK_CLASS

logger = logging.getLogger(__name__)

ProbsFn = Callable[[np.ndarray], np.ndarray]  # uint8 crops -> N x C probabilities

EVAL_SETS = (
    ("chandrikadeb7", "test", "chandrikadeb7 grouped test split (binary: mask vs no mask)"),
    ("ilc2021", "test", "ilc2021 grouped test split (3 classes)"),
    ("andrewmvd", "cross", "andrewmvd faces >= min-face-px wide, never trained on (cross)"),
)


def roc_curve(positive: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """False/true positive rates over all thresholds and the area under the curve."""
    pos = int(positive.sum())
    neg = len(positive) - pos
    if pos == 0 or neg == 0:
        return np.array([0.0, 1.0]), np.array([0.0, 1.0]), float("nan")
    order = np.argsort(-score, kind="mergesort")
    s, y = score[order], positive[order].astype(np.float64)
    distinct = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tps = np.cumsum(y)[distinct]
    fps = (distinct + 1) - tps
    tpr = np.r_[0.0, tps / pos]
    fpr = np.r_[0.0, fps / neg]
    return fpr, tpr, float(np.trapezoid(tpr, fpr))


def _safe_div(a: float, b: float) -> float:
    return a / b if b else float("nan")


def classification_metrics(probs: np.ndarray, labels: np.ndarray, threshold: float,
                           class_names: tuple[str, ...] = CLASS_NAMES) -> dict:
    """Confusion matrix, per-class P/R/F1, accuracy, violation metrics and ROC AUC.

    A violation is any face whose true class is not ``mask``; the model flags one when
    ``p_mask < threshold``. The ROC uses ``1 - p_mask`` as the violation score.
    """
    k = len(class_names)
    mask_idx = class_names.index(MASK_CLASS)
    pred = probs.argmax(1)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (labels, pred), 1)
    per_class = {}
    for i, name in enumerate(class_names):
        tp = cm[i, i]
        precision = _safe_div(tp, cm[:, i].sum())
        recall = _safe_div(tp, cm[i].sum())
        f1 = _safe_div(2 * precision * recall, precision + recall)
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1,
                           "support": int(cm[i].sum())}
    present = [n for n in class_names if per_class[n]["support"] > 0]
    macro_f1 = float(np.nanmean([per_class[n]["f1"] for n in present])) if present else 0.0

    p_mask = probs[:, mask_idx]
    violation_true = labels != mask_idx
    violation_pred = p_mask < threshold
    tp = int((violation_true & violation_pred).sum())
    fp = int((~violation_true & violation_pred).sum())
    fn = int((violation_true & ~violation_pred).sum())
    fpr, tpr, auc = roc_curve(violation_true, 1.0 - p_mask)
    binary_argmax = (pred == mask_idx) == (labels == mask_idx)
    return {
        "n": int(len(labels)),
        "accuracy": float((pred == labels).mean()) if len(labels) else float("nan"),
        "binary_accuracy": float(binary_argmax.mean()) if len(labels) else float("nan"),
        "macro_f1": macro_f1,
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "threshold": threshold,
        "violation": {
            "recall": _safe_div(tp, tp + fn), "precision": _safe_div(tp, tp + fp),
            "accuracy": float((violation_true == violation_pred).mean()),
            "tp": tp, "fp": fp, "fn": fn,
        },
        "auc": auc,
        "roc": {"fpr": fpr[:: max(1, len(fpr) // 200)].tolist(),
                "tpr": tpr[:: max(1, len(tpr) // 200)].tolist()},
    }


def disagreements(probs: np.ndarray, labels: np.ndarray, samples: list,
                  class_names: tuple[str, ...] = CLASS_NAMES, limit: int = 100) -> list[dict]:
    """The faces whose most probable class is not their label, most confident first.

    Each entry names the face (``path`` and, for a scene, its ``box``), the label, the
    prediction and ``p_mask``, so a reader can look at the pictures behind the figures.
    """
    mask_idx = class_names.index(MASK_CLASS)
    pred = probs.argmax(1)
    wrong = np.nonzero(pred != labels)[0]
    wrong = wrong[np.argsort(-probs[wrong, pred[wrong]], kind="mergesort")][:limit]
    out = []
    for i in wrong:
        s = samples[i]
        entry = {"path": s.path, "label": class_names[labels[i]],
                 "predicted": class_names[pred[i]], "p_mask": round(float(probs[i, mask_idx]), 4)}
        if s.box is not None:
            entry["box"] = list(s.box)
        out.append(entry)
    return out


def time_per_image_ms(probs_fn: ProbsFn, images: np.ndarray, batch: int, repeats: int = 3
                      ) -> float:
    """Median wall time per image for batches of ``batch`` crops (preprocessed input)."""
    sample = images[:batch]
    probs_fn(sample)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        probs_fn(sample)
        times.append((time.perf_counter() - start) / len(sample))
    return 1000 * float(np.median(times))


def plot_confusion(cm: list[list[int]], class_names: tuple[str, ...], title: str,
                   path: Path) -> None:
    """Small PNG of a confusion matrix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arr = np.array(cm)
    fig, ax = plt.subplots(figsize=(3.4, 3.0), dpi=80)
    ax.imshow(arr, cmap="Blues")
    for (i, j), v in np.ndenumerate(arr):
        ax.text(j, i, str(v), ha="center", va="center",
                color="white" if v > arr.max() / 2 else "black", fontsize=8)
    ax.set_xticks(range(len(class_names)), class_names, fontsize=7)
    ax.set_yticks(range(len(class_names)), class_names, fontsize=7)
    ax.set_xlabel("predicted", fontsize=8)
    ax.set_ylabel("true", fontsize=8)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_roc(curves: dict[str, dict], path: Path) -> None:
    """ROC curves of several evaluation sets in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3.8, 3.4), dpi=80)
    for name, m in curves.items():
        ax.plot(m["roc"]["fpr"], m["roc"]["tpr"], label=f"{name} (AUC {m['auc']:.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("false positive rate (mask flagged)", fontsize=8)
    ax.set_ylabel("true positive rate (violation found)", fontsize=8)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_history(history: list[dict], path: Path) -> None:
    """Loss and accuracy per epoch, train and validation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(6.4, 2.8), dpi=80)
    a.plot(epochs, [h["train_loss"] for h in history], label="train")
    a.plot(epochs, [h["val_loss"] for h in history], label="validation")
    a.set_xlabel("epoch", fontsize=8)
    a.set_ylabel("cross-entropy loss", fontsize=8)
    a.legend(fontsize=7)
    b.plot(epochs, [100 * h["train_acc"] for h in history], label="train")
    b.plot(epochs, [100 * h["val_acc"] for h in history], label="validation")
    b.set_xlabel("epoch", fontsize=8)
    b.set_ylabel("accuracy (%)", fontsize=8)
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _pct(v: float) -> str:
    return "n/a" if v != v else f"{100 * v:.2f} %"


def _md_code(text: str) -> str:
    """``text`` as a Markdown code span that survives table cells."""
    return "`` " + text.replace("|", "\\|") + " ``"


def markdown_report(model_name: str, results: dict, plots: dict[str, str]) -> str:
    """The evaluation report as Markdown (tables plus links to the PNGs)."""
    lines = [f"# Evaluation: {model_name}", "",
             f"Model file: `{results.get('model', '')}`; threshold p_mask < "
             f"{results['threshold']} is a violation.", ""]
    if results.get("input", "as is") != "as is":
        lines += [f"**Input: {results['input']}**, not the colour the faces were taken in.", ""]
    lines += ["| set | faces | accuracy (3-class) | mask vs not (argmax) | macro F1 | AUC | "
              "violation recall | violation precision | violation accuracy |",
              "|---|---|---|---|---|---|---|---|---|"]
    for key, m in results["sets"].items():
        v = m["violation"]
        lines.append(f"| {key} | {m['n']} | {_pct(m['accuracy'])} | "
                     f"{_pct(m['binary_accuracy'])} | {m['macro_f1']:.3f} | {m['auc']:.4f} | "
                     f"{_pct(v['recall'])} | {_pct(v['precision'])} | {_pct(v['accuracy'])} |")
    for key, m in results["sets"].items():
        lines += ["", f"## {key}", "", results["descriptions"].get(key, ""), "",
                  "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        for cls, pc in m["per_class"].items():
            lines.append(f"| {cls} | {_pct(pc['precision'])} | {_pct(pc['recall'])} | "
                         f"{pc['f1']:.3f} | {pc['support']} |")
        if key in plots:
            lines += ["", f"![confusion matrix {key}]({plots[key]})"]
        errors = m.get("errors", [])
        total = m.get("errors_total", len(errors))
        if errors and total <= 20:
            lines += ["", "Faces where the most probable class is not the label:", "",
                      "| face | label | predicted | p_mask |", "|---|---|---|---|"]
            lines += [f"| {_md_code(e['path'])}{' ' + str(e['box']) if 'box' in e else ''} | "
                      f"{e['label']} | {e['predicted']} | {e['p_mask']:.3f} |" for e in errors]
        elif errors:
            lines += ["", f"{total} faces disagree with their label; the metrics JSON lists "
                      f"the {len(errors)} most confident as `errors`."]
    for key in ("roc", "history"):
        if key in plots:
            lines += ["", f"![{key}]({plots[key]})"]
    if "latency_ms" in results:
        lines += ["", "Latency on this machine (ms per image, preprocessed input): "
                  + ", ".join(f"{k}: {v:.2f}" for k, v in results["latency_ms"].items())]
    return "\n".join(lines) + "\n"


def write_report(out_dir: Path, model_name: str, results: dict,
                 history: list[dict] | None) -> Path:
    """Write ``report.md``, ``metrics.json`` and the PNGs into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plots: dict[str, str] = {}
    for key, m in results["sets"].items():
        name = f"{model_name}-cm-{key}.png"
        plot_confusion(m["confusion_matrix"], tuple(results["class_names"]), key,
                       out_dir / name)
        plots[key] = name
    plot_roc(results["sets"], out_dir / f"{model_name}-roc.png")
    plots["roc"] = f"{model_name}-roc.png"
    if history:
        plot_history(history, out_dir / f"{model_name}-history.png")
        plots["history"] = f"{model_name}-history.png"
    (out_dir / f"{model_name}-metrics.json").write_text(
        json.dumps(dict(results, history=history or []), indent=1))
    report = out_dir / f"{model_name}-report.md"
    report.write_text(markdown_report(model_name, results, plots))
    logger.info("wrote %s", report)
    return report
