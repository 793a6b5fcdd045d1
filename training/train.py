"""Training loop: one plain function per step, a checkpoint per epoch, resumable."""

from __future__ import annotations

import json
import logging
import math
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from training.audit import apply_audits, load_audit
from training.augment import AugmentConfig, eval_batch, train_batch
from training.card import sha256
from training.data import CLASS_NAMES
from training.distill import (
    DistillationCriterion,
    OnnxTeacher,
    TeacherError,
    check_distill_settings,
)
from training.models import build_model, count_parameters, load_partial
from training.prepare import (
    FOLDER_SET,
    VOC_TRAIN_SET,
    PrepareConfig,
    SplitData,
    concat,
    load_or_build_manifest,
    manifest_digest,
    split_data,
)

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """One training run.

    Args:
        arch: architecture name (see ``training.models.ARCHS``).
        out: run folder (checkpoints, history, log).
        epochs: number of epochs.
        batch_size: images per step.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        seed: seed for weights, sampling and augmentation.
        grayscale: train on grey-scale images replicated to three channels.
        init: state dict to start from (matching tensors only).
        resume: continue from ``out/last.pt`` when it exists.
        threads: torch intra-op threads.
        class_weighting: weight the loss by inverse class frequency.
        freeze_backbone: train only the head (EfficientNet-Lite0 reduced budget).
        freeze_blocks: keep the stem and this many early blocks of a pretrained backbone
            fixed, batch-norm statistics included (EfficientNet-Lite0); 0 trains them all.
        lr_schedule: ``constant`` (the paper's Adam) or ``cosine``: epoch ``e`` of ``E``
            runs at ``lr * (1 + cos(pi * (e - 1) / E)) / 2``, from ``lr`` down to a few
            per cent of it; set at each epoch start, so a resumed run follows the same curve.
        channels_last: run the network in channels-last memory order (about 1.6x faster
            for EfficientNet-Lite0 on this CPU, no change to the result beyond rounding).
        max_steps: stop each epoch after this many steps (smoke runs); 0 = no limit.
        train_limit: use only this many training images (smoke runs); 0 = all.
        time_budget_min: stop after the epoch that leaves too little time for one more
            (wall minutes of training, summed over resumes); 0 = no limit.
        audits: audit files (``training/audits/``) whose labels replace the data set's
            for their (data set, split), e.g. masks under the nose moved to ``incorrect``.
        keep_epochs: also keep each epoch's weights as ``out/epochs/epoch-NN.pt``, for
            ``maskmesh average`` (weight averaging over the last epochs).
        teacher: an exported ``.onnx`` model to distil from (``training.distill``); None
            trains on the labels alone.
        distill_weight: share of the distillation term in the loss, in [0, 1].
        distill_temperature: softening temperature of the distillation term, in
            ``training.distill.TEMPERATURE_RANGE``.
    """

    arch: str = "alexnet"
    out: Path = Path("runs/alexnet")
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.0
    seed: int = 0
    grayscale: bool = False
    init: Path | None = None
    resume: bool = False
    threads: int = 2
    class_weighting: bool = True
    freeze_backbone: bool = False
    freeze_blocks: int = 0
    lr_schedule: str = "constant"
    channels_last: bool = False
    max_steps: int = 0
    train_limit: int = 0
    time_budget_min: float = 0.0
    audits: tuple[Path, ...] = ()
    keep_epochs: bool = False
    teacher: Path | None = None
    distill_weight: float = 0.7
    distill_temperature: float = 4.0
    augment: AugmentConfig = field(default_factory=AugmentConfig)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse square-root frequency weights, mean 1 over the classes present.

    Full inverse frequency would weigh one ``incorrect`` face like ~14 ``mask`` faces and
    trade much mask precision for it; the square root keeps the rare class heard.
    """
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, 1.0 / np.sqrt(np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights / weights[counts > 0].mean(), dtype=torch.float32)


def train_one_epoch(model: nn.Module, data: SplitData, optimizer: torch.optim.Optimizer,
                    criterion: nn.Module, cfg: TrainConfig, generator: torch.Generator,
                    epoch: int) -> dict[str, float]:
    """One pass over shuffled training data; returns mean loss, accuracy, images/s.

    The caller sets train / eval modes (frozen parts stay in eval). A
    ``DistillationCriterion`` also takes the batch, for its teacher.
    """
    needs_batch = isinstance(criterion, DistillationCriterion)
    order = torch.randperm(len(data), generator=generator)
    steps = (len(order) + cfg.batch_size - 1) // cfg.batch_size
    if cfg.max_steps:
        steps = min(steps, cfg.max_steps)
    images = torch.from_numpy(data.images)
    labels = torch.from_numpy(data.labels)
    loss_sum, correct, seen = 0.0, 0, 0
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=f"epoch {epoch}", unit="step", leave=False, mininterval=5)
    for step in bar:
        idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        x = train_batch(images[idx], cfg.grayscale, generator, cfg.augment)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = labels[idx]
        logits = model(x)
        try:
            loss = criterion(logits, y, x) if needs_batch else criterion(logits, y)
        except TeacherError as exc:
            raise TeacherError(f"epoch {epoch}, step {step + 1}: {exc}") from exc
        if not torch.isfinite(loss.detach()):
            raise ValueError(f"epoch {epoch}, step {step + 1}: the loss is "
                             f"{float(loss.detach())}; the weights would turn to NaN, so the "
                             "run stops here (the checkpoints of finished epochs are kept)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += float(loss.detach()) * len(y)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
    elapsed = time.perf_counter() - start
    return {"train_loss": loss_sum / seen, "train_acc": correct / seen,
            "train_images_per_s": seen / elapsed, "train_s": elapsed}


@torch.no_grad()
def predict_probs(model: nn.Module, images: np.ndarray, grayscale: bool,
                  batch_size: int = 64) -> np.ndarray:
    """Softmax probabilities for cached uint8 crops (centre crop, as deployed)."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = eval_batch(torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])),
                       grayscale)
        out.append(torch.softmax(model(x), 1).numpy())
    return np.concatenate(out) if out else np.zeros((0, len(CLASS_NAMES)), np.float32)


def evaluate_split(model: nn.Module, data: SplitData, criterion: nn.Module,
                   grayscale: bool) -> dict[str, float]:
    """Loss and accuracy of a split."""
    if not len(data):
        return {"loss": float("nan"), "acc": float("nan")}
    probs = predict_probs(model, data.images, grayscale)
    p = torch.from_numpy(probs).clamp_min(1e-12)
    loss = float(criterion(torch.log(p), torch.from_numpy(data.labels)))
    return {"loss": loss, "acc": float((probs.argmax(1) == data.labels).mean())}


def epoch_lr(cfg: TrainConfig, epoch: int) -> float:
    """Learning rate of an epoch (1-based) under the configured schedule."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / cfg.epochs))
    raise ValueError(f"unknown lr_schedule {cfg.lr_schedule!r} (constant or cosine)")


def frozen_modules(model: nn.Module, cfg: TrainConfig) -> list[nn.Module]:
    """Modules kept fixed during training; their parameters stop taking gradients."""
    if not cfg.freeze_blocks:
        return []
    early = getattr(model, "early_modules", None)
    if early is None:
        raise ValueError(f"freeze_blocks is not supported for arch {cfg.arch!r}")
    modules: list[nn.Module] = early(cfg.freeze_blocks)
    for module in modules:
        module.requires_grad_(False)
    return modules


# The name of an epoch's kept weights (``--keep-epochs``): ``epochs/epoch-NN.pt``.
EPOCH_FILE = re.compile(r"epoch-(\d+)\.pt")

# Settings that may change between a run and its resumption: they do not alter the curve.
RESUME_FREE = {"resume", "out", "threads", "time_budget_min", "max_steps", "keep_epochs",
               "teacher"}


def check_resumable(cfg: TrainConfig, saved: dict[str, str], path: Path) -> None:
    """Refuse to resume a run whose recipe differs from the checkpoint's."""
    now = {k: str(v) for k, v in asdict(cfg).items()}
    # A checkpoint older than a setting ran with that setting's default.
    defaults = {k: str(v) for k, v in asdict(TrainConfig()).items()}
    saved = {k: saved.get(k, defaults[k]) for k in now}
    changed = sorted(k for k in now if k not in RESUME_FREE and now[k] != saved[k])
    if changed:
        detail = ", ".join(f"{k}: {saved[k]} -> {now[k]}" for k in changed)
        raise ValueError(f"{path} was trained with other settings ({detail}); resume with "
                         "the same ones or train into another --out folder")


def check_teacher(cfg: TrainConfig, prep: PrepareConfig) -> OnnxTeacher | None:
    """Open the run's teacher, if any, after checking the distillation settings."""
    if cfg.teacher is None:
        return None
    check_distill_settings(cfg.distill_weight, cfg.distill_temperature)
    return OnnxTeacher(cfg.teacher, CLASS_NAMES, cfg.grayscale, prep.face_margin,
                       threads=cfg.threads)


def check_same_teacher(teacher: OnnxTeacher | None, saved: object, path: Path) -> None:
    """Refuse to resume with a teacher file whose content differs from the run's."""
    def describe(sha: object) -> str:
        return "without a teacher" if sha is None else f"with teacher sha256 {sha}"

    now = None if teacher is None else teacher.info.sha256
    before = (saved.get("sha256") or "unknown") if isinstance(saved, dict) else (
        None if saved is None else "unknown")
    if now != before:
        raise ValueError(f"{path} was trained {describe(before)}, this run is {describe(now)}; "
                         "resume with the same teacher file or train into another --out "
                         "folder")


def budget_spent(cfg: TrainConfig, history: list[dict[str, float]]) -> bool:
    """Whether one more epoch, as long as the last one, would pass the time budget.

    Checked before each epoch, so re-running a finished budgeted run trains nothing more.
    """
    # Limitation: a shared 2-core machine cannot always fit the full recipe; the epochs
    # actually run are in history.json and the model card.
    if not cfg.time_budget_min or not history:
        return False
    spent_min = sum(h["train_s"] + h.get("val_s", 0.0) for h in history) / 60
    last_min = (history[-1]["train_s"] + history[-1].get("val_s", 0.0)) / 60
    return spent_min + last_min > cfg.time_budget_min


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically so a killed run never leaves a half checkpoint."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _training_split(prep: PrepareConfig, manifest: dict, split: str,
                    audits: list[dict]) -> SplitData:
    """One split of both training sets, audits (as ``load_audit`` reads them) applied."""
    return concat([apply_audits(audits, dataset, split,
                                split_data(prep, manifest, dataset, split))
                   for dataset in (FOLDER_SET, VOC_TRAIN_SET)])


def load_validation_data(prep: PrepareConfig, audits: list[dict] | None = None) -> SplitData:
    """The validation data of both training sets, without the training data; ``audits``
    (as ``load_audit`` reads them) applied."""
    manifest, _ = load_or_build_manifest(prep)
    return _training_split(prep, manifest, "validation", audits or [])


def load_training_data(prep: PrepareConfig, train_limit: int = 0, seed: int = 0,
                       audit_paths: tuple[Path, ...] = ()
                       ) -> tuple[dict, Path, SplitData, SplitData]:
    """Manifest plus the train and validation data of both training sets, audits applied."""
    audits = [load_audit(p) for p in audit_paths]
    manifest, manifest_path = load_or_build_manifest(prep)
    train = _training_split(prep, manifest, "train", audits)
    val = _training_split(prep, manifest, "validation", audits)
    if train_limit and train_limit < len(train):
        pick = np.random.default_rng(seed).permutation(len(train))[:train_limit]
        pick.sort()
        train = SplitData(train.images[pick], train.labels[pick],
                          [train.samples[i] for i in pick])
    return manifest, manifest_path, train, val


def run_training(cfg: TrainConfig, prep: PrepareConfig) -> Path:
    """Train (or resume) a model; returns the path of the best checkpoint."""
    torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    cfg.out.mkdir(parents=True, exist_ok=True)
    num_classes = len(CLASS_NAMES)
    # The model and its start weights first: a bad --init fails before the data loads.
    model = build_model(cfg.arch, num_classes)
    init_report = load_partial(model, cfg.init, cfg.arch) if cfg.init else None
    frozen = frozen_modules(model, cfg)
    teacher = check_teacher(cfg, prep)
    manifest, manifest_path, train, val = load_training_data(prep, cfg.train_limit, cfg.seed,
                                                             cfg.audits)
    if teacher is not None:
        teacher.warn_if_other_split(manifest_digest(manifest))
        # Every batch size the epochs will use, before the first epoch rather than at
        # its last step.
        teacher.check_batch_sizes([1, min(cfg.batch_size, len(train)),
                                   len(train) % cfg.batch_size])
    logger.info("train %d images %s, validation %d images", len(train),
                np.bincount(train.labels, minlength=num_classes).tolist(), len(val))
    if cfg.channels_last:
        # Module.to takes memory_format at run time; torch's type hints leave it out.
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    params = [p for n, p in model.named_parameters() if p.requires_grad
              and (not cfg.freeze_backbone or not n.startswith("backbone."))]
    optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    weights = class_weights(train.labels, num_classes) if cfg.class_weighting else None
    criterion: nn.Module = nn.CrossEntropyLoss(weight=weights)
    if teacher is not None:
        criterion = DistillationCriterion(criterion, teacher, cfg.distill_weight,
                                          cfg.distill_temperature)
    eval_criterion = nn.NLLLoss()
    logger.info("arch %s, %d parameters (%d trained), class weights %s", cfg.arch,
                count_parameters(model), sum(p.numel() for p in params),
                None if weights is None else [round(float(w), 3) for w in weights])

    generator = torch.Generator().manual_seed(cfg.seed)
    history: list[dict[str, float]] = []
    start_epoch, best_acc = 1, -1.0
    last_path, best_path = cfg.out / "last.pt", cfg.out / "best.pt"
    if cfg.resume and last_path.is_file():
        state = torch.load(last_path, map_location="cpu", weights_only=False)
        saved_meta = state.get("meta") if isinstance(state, dict) else None
        if not isinstance(saved_meta, dict) or not isinstance(saved_meta.get("config", {}),
                                                              dict):
            raise ValueError(f"{last_path} is not a maskmesh training checkpoint (no meta "
                             "record); train into another --out folder")
        # The teacher first: a changed teacher also changes its settings' meaning.
        check_same_teacher(teacher, saved_meta.get("teacher"), last_path)
        check_resumable(cfg, saved_meta.get("config", {}), last_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        history, best_acc = state["history"], state["best_val_acc"]
        start_epoch = state["epoch"] + 1
        logger.info("resumed from %s at epoch %d", last_path, start_epoch)

    if start_epoch == 1:
        # A fresh run into an old folder: the old epoch files are not this run's, whether
        # or not this one keeps its own.
        stale = sorted(p for p in (cfg.out / "epochs").glob("epoch-*.pt")
                       if EPOCH_FILE.fullmatch(p.name))
        if stale:
            logger.warning("removing %d epoch files of an earlier run from %s", len(stale),
                           cfg.out / "epochs")
            for path in stale:
                path.unlink()

    meta = {"arch": cfg.arch, "class_names": list(CLASS_NAMES), "grayscale": cfg.grayscale,
            "face_margin": prep.face_margin, "manifest": str(manifest_path),
            "manifest_digest": manifest_digest(manifest),
            "config": {k: str(v) for k, v in asdict(cfg).items()}, "init": init_report,
            "audits": {str(p): sha256(p)[:16] for p in cfg.audits},
            "teacher": None if teacher is None else asdict(teacher.info)}
    for epoch in range(start_epoch, cfg.epochs + 1):
        if budget_spent(cfg, history):
            logger.warning("time budget of %.0f min already spent by %d epochs; not training "
                           "more", cfg.time_budget_min, len(history))
            break
        lr = epoch_lr(cfg, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        for module in frozen:
            module.eval()
        if cfg.freeze_backbone:
            model.eval()
        stats = train_one_epoch(model, train, optimizer, criterion, cfg, generator, epoch)
        stats["lr"] = lr
        val_start = time.perf_counter()
        val_stats = evaluate_split(model, val, eval_criterion, cfg.grayscale)
        stats.update({"epoch": epoch, "val_loss": val_stats["loss"], "val_acc": val_stats["acc"],
                      "val_s": time.perf_counter() - val_start})
        history.append(stats)
        logger.info("epoch %d/%d: train loss %.4f acc %.2f %% | val loss %.4f acc %.2f %% | "
                    "%.1f s, %.1f images/s", epoch, cfg.epochs, stats["train_loss"],
                    100 * stats["train_acc"], stats["val_loss"], 100 * stats["val_acc"],
                    stats["train_s"], stats["train_images_per_s"])
        improved = stats["val_acc"] >= best_acc
        best_acc = max(best_acc, stats["val_acc"])
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
                 "epoch": epoch, "history": history, "best_val_acc": best_acc, "meta": meta}
        save_checkpoint(last_path, state)
        if cfg.keep_epochs:
            (cfg.out / "epochs").mkdir(exist_ok=True)
            save_checkpoint(cfg.out / "epochs" / f"epoch-{epoch:02d}.pt",
                            {"model": model.state_dict(), "epoch": epoch, "meta": meta})
        if improved:
            save_checkpoint(best_path, {"model": model.state_dict(), "epoch": epoch,
                                        "history": history, "meta": meta})
        (cfg.out / "history.json").write_text(json.dumps(history, indent=1))
    return best_path
