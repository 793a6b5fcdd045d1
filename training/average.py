"""Weight averaging over the last epochs of a run (stochastic weight averaging, SWA).

A run trained with ``--keep-epochs`` leaves each epoch's weights in ``out/epochs/``. The
mean of the last few is often a flatter, better-generalising point than any one of them.
The averaged weights match no epoch's batch-norm running statistics, so those are
estimated again over the training faces, centre cropped as at inference, as
``torch.optim.swa_utils.update_bn`` does; unlike it, the layers the run kept frozen keep
their statistics and run in eval mode meanwhile, and dropout stays off, so the statistics
are those of the network as deployed.

Whether the average or the run's best epoch ships is the validation split's call (accuracy,
then loss), never the test split's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from training.augment import eval_batch
from training.card import sha256
from training.models import build_model
from training.prepare import PrepareConfig
from training.train import evaluate_split, load_training_data, save_checkpoint

logger = logging.getLogger(__name__)


class AverageError(ValueError):
    """The epochs asked for cannot be averaged (missing, or from different runs)."""


@dataclass
class AverageResult:
    """What ``average_run`` wrote and how the average did on the validation split."""

    path: Path
    epochs: list[int]
    val_acc: float
    val_loss: float


def average_state_dicts(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Element-wise mean of floating-point tensors; others (batch counts) from the last."""
    if not states:
        raise AverageError("no weights to average")
    keys = list(states[0])
    for state in states[1:]:
        if list(state) != keys:
            raise AverageError("the checkpoints hold different tensors (not one architecture)")
    out = {}
    for key in keys:
        tensors = [s[key] for s in states]
        if tensors[0].is_floating_point():
            out[key] = torch.stack([t.float() for t in tensors]).mean(0).to(tensors[0].dtype)
        else:
            out[key] = tensors[-1].clone()
    return out


@torch.no_grad()
def refresh_batch_norm(model: nn.Module, batches, frozen: list[nn.Module]) -> int:  # noqa: ANN001
    """Re-estimate the running statistics of every batch norm outside ``frozen``.

    Cumulative (equal-weight) averages over ``batches``; returns how many were refreshed.
    """
    fixed = {id(m) for f in frozen for m in f.modules()}
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and id(m) not in fixed]
    if not norms:
        return 0
    model.eval()
    momenta = {}
    for norm in norms:
        norm.reset_running_stats()
        momenta[norm] = norm.momentum
        norm.momentum = None  # cumulative moving average
        norm.train()
    for x in batches:
        model(x)
    for norm in norms:
        norm.momentum = momenta[norm]
    model.eval()
    return len(norms)


def _frozen_modules(model: nn.Module, config: dict[str, str]) -> list[nn.Module]:
    blocks = int(config.get("freeze_blocks", "0"))
    return model.early_modules(blocks) if blocks else []


def _check_audits(meta: dict) -> tuple[Path, ...]:
    """The run's audit files, refusing any that changed since it was trained."""
    paths = []
    for name, digest in meta.get("audits", {}).items():
        path = Path(name)
        if not path.is_file():
            raise AverageError(f"audit {path} of the run is missing")
        if sha256(path)[:len(digest)] != digest:
            raise AverageError(f"audit {path} changed since the run was trained")
        paths.append(path)
    return tuple(paths)


def epoch_paths(run: Path, last: int) -> list[Path]:
    """The last ``last`` kept epochs of a run, oldest first."""
    if last < 2:
        raise AverageError(f"averaging needs at least 2 epochs, got {last}")
    paths = sorted((run / "epochs").glob("epoch-*.pt"))
    if len(paths) < last:
        raise AverageError(f"{run / 'epochs'} holds {len(paths)} epoch files, {last} asked for "
                           "(train with --keep-epochs)")
    return paths[-last:]


def average_run(run: Path, last: int, prep: PrepareConfig, out: Path | None = None,
                threads: int = 2, batch_size: int = 64) -> AverageResult:
    """Average the last ``last`` epochs of ``run`` into ``out`` (``run/average.pt``)."""
    torch.set_num_threads(threads)
    paths = epoch_paths(run, last)
    loaded = [torch.load(p, map_location="cpu", weights_only=False) for p in paths]
    metas = [s["meta"] for s in loaded]
    if any(m["config"] != metas[0]["config"] or m["manifest_digest"] != metas[0]["manifest_digest"]
           for m in metas):
        raise AverageError(f"the epoch files in {run / 'epochs'} come from different runs")
    meta = metas[-1]
    epochs = [int(s["epoch"]) for s in loaded]
    if epochs != list(range(epochs[0], epochs[0] + len(epochs))):
        raise AverageError(f"the epochs to average are not consecutive: {epochs}")

    model = build_model(meta["arch"], len(meta["class_names"]), pretrained=False)
    model.load_state_dict(average_state_dicts([s["model"] for s in loaded]))
    frozen = _frozen_modules(model, meta["config"])

    if prep.manifest is None:
        prep.manifest = Path(meta["manifest"])
    _, _, train, val = load_training_data(prep, audit_paths=_check_audits(meta))
    images = torch.from_numpy(train.images)
    batches = (eval_batch(images[i:i + batch_size], meta["grayscale"])
               for i in range(0, len(images), batch_size))
    refreshed = refresh_batch_norm(model, batches, frozen)
    logger.info("batch-norm statistics re-estimated for %d layers over %d training faces",
                refreshed, len(images))

    stats = evaluate_split(model, val, nn.NLLLoss(), meta["grayscale"])
    out = out or run / "average.pt"
    history = loaded[-1].get("history")
    if history is None and (run / "history.json").is_file():
        import json

        history = json.loads((run / "history.json").read_text())
    save_checkpoint(out, {"model": model.state_dict(), "epoch": epochs[-1], "history": history,
                          "meta": dict(meta, averaged_epochs=epochs),
                          "val_acc": stats["acc"], "val_loss": stats["loss"]})
    logger.info("average of epochs %d-%d: validation acc %.2f %% (%d of %d), loss %.4f -> %s",
                epochs[0], epochs[-1], 100 * stats["acc"],
                int(round(stats["acc"] * len(val))), len(val), stats["loss"], out)
    return AverageResult(out, epochs, stats["acc"], stats["loss"])


def pick_checkpoint(candidates: dict[str, tuple[float, float]]) -> str:
    """The candidate with the highest validation accuracy; on a tie, the lowest loss."""
    if not candidates:
        raise AverageError("no candidates")
    return max(candidates, key=lambda k: (candidates[k][0], -np.float64(candidates[k][1])))
