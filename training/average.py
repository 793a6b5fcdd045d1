"""Weight averaging over the last epochs of a run.

The idea of stochastic weight averaging (SWA), applied to the epochs of the run's own
learning-rate schedule rather than to a dedicated constant-rate phase.

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

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from training.augment import eval_batch
from training.card import sha256
from training.models import build_model
from training.prepare import PrepareConfig, manifest_digest
from training.train import (
    EPOCH_FILE,
    RESUME_FREE,
    evaluate_split,
    load_training_data,
    save_checkpoint,
)

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


def average_state_dicts(states: Iterable[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Element-wise mean of floating-point tensors; others (batch counts) from the last.

    A running sum in float64, so only one state dict need be in memory at a time.
    """
    total: dict[str, torch.Tensor] | None = None
    dtypes: dict[str, torch.dtype] = {}
    count = 0
    for state in states:
        if total is None:
            total = {k: v.double() if v.is_floating_point() else v.clone()
                     for k, v in state.items()}
            dtypes = {k: v.dtype for k, v in state.items()}
        elif list(state) != list(total):
            raise AverageError("the checkpoints hold different tensors (not one architecture)")
        else:
            for k, v in state.items():
                total[k] = total[k] + v.double() if v.is_floating_point() else v.clone()
        count += 1
    if total is None:
        raise AverageError("no weights to average")
    return {k: (v / count).to(dtypes[k]) if dtypes[k].is_floating_point else v
            for k, v in total.items()}


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
    """The modules the run kept fixed, batch norms included (as ``training.train`` does)."""
    if config.get("freeze_backbone") == "True":
        return [model]  # the whole network ran in eval mode: every statistic stayed fixed
    blocks = int(config.get("freeze_blocks", "0"))
    if not blocks:
        return []
    early = cast("Callable[[int], list[nn.Module]]", model.early_modules)
    return early(blocks)


def _check_audits(meta: dict) -> tuple[Path, ...]:
    """The run's audit files, refusing any that changed since it was trained."""
    paths = []
    for name, digest in meta.get("audits", {}).items():
        path = Path(name)
        if not path.is_file():
            raise AverageError(f"audit {path} of the run is missing (paths are as given to "
                               "maskmesh train, relative to where it ran)")
        if sha256(path)[:len(digest)] != digest:
            raise AverageError(f"audit {path} changed since the run was trained")
        paths.append(path)
    return tuple(paths)


def epoch_paths(run: Path, last: int) -> list[Path]:
    """The last ``last`` kept epochs of a run (``epochs/epoch-NN.pt``), oldest first."""
    if last < 2:
        raise AverageError(f"averaging needs at least 2 epochs, got {last}")
    if not run.is_dir():
        raise AverageError(f"run folder {run} does not exist or is not a folder")
    numbered = sorted((int(m.group(1)), p) for p in (run / "epochs").glob("epoch-*.pt")
                      if (m := EPOCH_FILE.fullmatch(p.name)))
    if len(numbered) < last:
        raise AverageError(f"{run / 'epochs'} holds {len(numbered)} epoch files, {last} asked "
                           "for (train with --keep-epochs)")
    return [p for _, p in numbered[-last:]]


def _load(path: Path, what: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise AverageError(f"{what} {path} is not a readable checkpoint ({exc.__class__.__name__})"
                           ) from exc
    if not isinstance(state, dict) or not {"model", "meta", "epoch"} <= set(state):
        raise AverageError(f"{what} {path} is not a maskmesh training checkpoint")
    return state


def _recipe(meta: dict) -> dict[str, str]:
    """A run's settings without those a resume may change."""
    return {k: v for k, v in meta["config"].items() if k not in RESUME_FREE}


def _check_out(run: Path, out: Path) -> None:
    """Refuse an output that would replace one of the run's own files."""
    if out.suffix != ".pt" or out.is_dir():
        raise AverageError(f"--out {out} must be a .pt file path")
    if not out.parent.is_dir():
        raise AverageError(f"--out {out}: folder {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK):
        raise AverageError(f"--out {out}: folder {out.parent} is not writable")
    target = out.resolve()
    own = {(run / name).resolve() for name in ("best.pt", "last.pt")}
    if target in own or target.parent == (run / "epochs").resolve():
        raise AverageError(f"--out {out} would replace one of the run's own checkpoints")
    if out.exists():
        # Only an earlier average may be replaced, never another run's checkpoint.
        try:
            previous = _load(out, "--out")
        except AverageError:
            previous = {}
        if "averaged_epochs" not in previous.get("meta", {}):
            raise AverageError(f"--out {out} exists and is not an average checkpoint; remove it "
                               "or choose another path")


def average_run(run: Path, last: int, prep: PrepareConfig, out: Path | None = None,
                threads: int = 2, batch_size: int = 64) -> AverageResult:
    """Average the last ``last`` epochs of ``run`` into ``out`` (``run/average-lastK.pt``)."""
    if threads < 1:
        raise AverageError(f"threads must be 1 or more, got {threads}")
    paths = epoch_paths(run, last)
    out = out or run / f"average-last{last}.pt"
    _check_out(run, out)
    torch.set_num_threads(threads)
    # The newest epoch file must be the run's latest epoch, from this very run: a fresh run
    # into an old folder, or a resume without --keep-epochs, leaves other epochs behind.
    if not (run / "last.pt").is_file():
        raise AverageError(f"{run / 'last.pt'} is missing: cannot tell which run the epoch files "
                           "belong to")
    latest = _load(run / "last.pt", "checkpoint")
    meta = latest["meta"]
    epochs: list[int] = []
    newest_weights: list[dict[str, torch.Tensor]] = []

    def weights():  # noqa: ANN202 - one epoch file in memory at a time
        for path in paths:
            state = _load(path, "epoch file")
            if (_recipe(state["meta"]) != _recipe(meta)
                    or state["meta"].get("manifest_digest") != meta.get("manifest_digest")):
                raise AverageError(f"epoch file {path} comes from another run than "
                                   f"{run / 'last.pt'}")
            epochs.append(int(state["epoch"]))
            newest_weights[:] = [state["model"]]
            yield state["model"]

    averaged = average_state_dicts(weights())
    if epochs != list(range(epochs[0], epochs[0] + len(epochs))):
        raise AverageError(f"the epochs to average are not consecutive: {epochs} "
                           f"({', '.join(p.name for p in paths)})")
    if epochs[-1] != int(latest["epoch"]):
        raise AverageError(f"the newest epoch file is epoch {epochs[-1]} but the run reached "
                           f"epoch {latest['epoch']} (was it resumed without --keep-epochs?)")
    newest, kept = newest_weights[0], latest["model"]
    if list(newest) != list(kept) or any(not torch.equal(newest[k], kept[k]) for k in newest):
        raise AverageError(f"{paths[-1]} does not hold the weights of {run / 'last.pt'}: the epoch "
                           "files are not this run's")

    model = build_model(meta["arch"], len(meta["class_names"]), pretrained=False)
    model.load_state_dict(averaged)
    frozen = _frozen_modules(model, meta["config"])

    if prep.manifest is None:
        prep = dataclasses.replace(prep, manifest=Path(meta["manifest"]))
    config = meta["config"]
    manifest, manifest_path, train, val = load_training_data(
        prep, int(config.get("train_limit", "0")), int(config.get("seed", "0")),
        _check_audits(meta))
    if manifest_digest(manifest) != meta.get("manifest_digest"):
        raise AverageError(f"split manifest {manifest_path} is not the one the run was trained "
                           "on (its digest differs)")
    if not len(val):
        raise AverageError("the validation split is empty: nothing to judge the average by")
    images = torch.from_numpy(train.images)
    batches = (eval_batch(images[i:i + batch_size], meta["grayscale"])
               for i in range(0, len(images), batch_size))
    refreshed = refresh_batch_norm(model, batches, frozen)
    logger.info("batch-norm statistics re-estimated for %d layers over %d training faces",
                refreshed, len(images))

    stats = evaluate_split(model, val, nn.NLLLoss(), meta["grayscale"])
    try:
        save_checkpoint(out, {"model": model.state_dict(), "epoch": epochs[-1],
                              "history": latest.get("history"),
                              "meta": dict(meta, averaged_epochs=epochs),
                              "val_acc": stats["acc"], "val_loss": stats["loss"]})
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as RuntimeError
        out.with_suffix(".tmp").unlink(missing_ok=True)
        raise AverageError(f"cannot write {out}: {exc}") from exc
    logger.info("average of epochs %d-%d: validation acc %.2f %% (%d of %d), loss %.4f -> %s",
                epochs[0], epochs[-1], 100 * stats["acc"],
                int(round(stats["acc"] * len(val))), len(val), stats["loss"], out)
    return AverageResult(out, epochs, stats["acc"], stats["loss"])


def best_epoch_score(run: Path) -> tuple[int, float, float] | None:
    """(epoch, validation accuracy, validation loss) of the run's ``best.pt``, if any."""
    if not (run / "best.pt").is_file():
        return None
    best = _load(run / "best.pt", "checkpoint")
    for entry in best.get("history") or []:
        if entry.get("epoch") == best["epoch"]:
            return int(best["epoch"]), float(entry["val_acc"]), float(entry["val_loss"])
    raise AverageError(f"{run / 'best.pt'} holds no validation score for its epoch")


def pick_checkpoint(candidates: dict[str, tuple[float, float]]) -> str:
    """The candidate with the highest validation accuracy; on a tie, the lowest loss.

    ``candidates`` maps a name to (accuracy, loss); an exact tie on both goes to the one
    listed first.
    """
    if not candidates:
        raise AverageError("no candidates")
    bad = [k for k, (acc, loss) in candidates.items() if math.isnan(acc) or math.isnan(loss)]
    if bad:
        raise AverageError(f"no validation score for {', '.join(bad)}")
    return max(candidates, key=lambda k: (candidates[k][0], -candidates[k][1]))
