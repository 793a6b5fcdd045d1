"""Reduced-budget transfer learning: frozen pretrained backbone, cached embeddings, new head.

A full fine-tune of EfficientNet-Lite0 does not fit a shared 2-core machine, so its
backbone runs once over the training crops (centre crop, no augmentation) and only the
1280 -> C head is trained, on those cached embeddings, in seconds.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict

import numpy as np
import torch
from torch import nn

from training.augment import eval_batch
from training.data import CLASS_NAMES
from training.models import build_model
from training.prepare import PrepareConfig, manifest_digest
from training.train import (
    TrainConfig,
    class_weights,
    load_training_data,
    save_checkpoint,
    seed_everything,
)

logger = logging.getLogger(__name__)


@torch.no_grad()
def embed_all(model: nn.Module, images: np.ndarray, grayscale: bool, flip: bool = False,
              batch_size: int = 64) -> torch.Tensor:
    """Pooled backbone features of cached crops (optionally mirrored)."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = eval_batch(torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])),
                       grayscale)
        if flip:
            x = x.flip(3)
        out.append(model.embed(x))  # type: ignore[operator]
    return torch.cat(out)


def run_head_training(cfg: TrainConfig, prep: PrepareConfig, head_epochs: int = 60,
                      head_lr: float = 1e-3) -> torch.nn.Module:
    """Train only the head of a pretrained model on cached embeddings; writes best.pt."""
    torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    cfg.out.mkdir(parents=True, exist_ok=True)
    model = build_model(cfg.arch, len(CLASS_NAMES))
    if not hasattr(model, "embed"):
        raise ValueError(f"{cfg.arch} has no separate embedding; cannot train the head alone")
    manifest, manifest_path, train, val = load_training_data(
        prep, cfg.train_limit, cfg.seed, cfg.audits)

    start = time.perf_counter()
    cache = cfg.out / "embeddings.pt"
    # What the embeddings depend on: a cache made for another backbone, input or subset
    # has the same shape and would train a head that fits nothing.
    key = {"arch": cfg.arch, "grayscale": cfg.grayscale, "train_limit": cfg.train_limit,
           "seed": cfg.seed if cfg.train_limit else None,
           "manifest": manifest_digest(manifest), "data_root": str(prep.data_root),
           "face_margin": prep.face_margin, "cache_size": prep.cache_size,
           "train": len(train), "val": len(val)}
    try:
        feats = torch.load(cache) if cache.is_file() else {}
    except Exception as exc:  # noqa: BLE001 - a damaged cache is rebuilt, whatever broke it
        logger.warning("embedding cache %s is unreadable (%s); rebuilding it", cache, exc)
        feats = {}
    if not isinstance(feats, dict) or feats.get("key") != key:
        if feats:
            logger.warning("embedding cache %s was made for another run; rebuilding it", cache)
        # The mirrored copy is the only augmentation a fixed feature cache allows.
        feats = {"key": key, "train": embed_all(model, train.images, cfg.grayscale),
                 "train_flip": embed_all(model, train.images, cfg.grayscale, flip=True),
                 "val": embed_all(model, val.images, cfg.grayscale)}
        torch.save(feats, cache)
    embed_s = time.perf_counter() - start
    logger.info("embeddings of %d + %d crops in %.0f s", len(train), len(val), embed_s)

    x_train = torch.cat([feats["train"], feats["train_flip"]])
    y_train = torch.from_numpy(np.concatenate([train.labels, train.labels]))
    y_val = torch.from_numpy(val.labels)
    head: nn.Linear = model.head  # type: ignore[assignment]
    dropout: nn.Module = model.dropout  # type: ignore[assignment]
    optimizer = torch.optim.Adam(head.parameters(), lr=head_lr)
    weights = class_weights(train.labels, len(CLASS_NAMES)) if cfg.class_weighting else None
    criterion = nn.CrossEntropyLoss(weight=weights)
    generator = torch.Generator().manual_seed(cfg.seed)
    history: list[dict[str, float]] = []
    best_acc, best_state = -1.0, None
    for epoch in range(1, head_epochs + 1):
        t0 = time.perf_counter()
        head.train()
        dropout.train()
        order = torch.randperm(len(y_train), generator=generator)
        loss_sum, correct = 0.0, 0
        for i in range(0, len(order), 64):
            idx = order[i:i + 64]
            logits = head(dropout(x_train[idx]))
            loss = criterion(logits, y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == y_train[idx]).sum())
        head.eval()
        dropout.eval()
        with torch.no_grad():
            val_logits = head(feats["val"])
            val_loss = float(nn.functional.cross_entropy(val_logits, y_val))
            val_acc = float((val_logits.argmax(1) == y_val).float().mean())
        history.append({"epoch": epoch, "train_loss": loss_sum / len(order),
                        "train_acc": correct / len(order), "val_loss": val_loss,
                        "val_acc": val_acc, "train_s": time.perf_counter() - t0, "val_s": 0.0})
        if val_acc >= best_acc:
            best_acc, best_state = val_acc, {k: v.clone() for k, v in head.state_dict().items()}
    logger.info("head: best validation accuracy %.2f %% over %d epochs", 100 * best_acc,
                head_epochs)
    assert best_state is not None
    head.load_state_dict(best_state)
    meta = {"arch": cfg.arch, "class_names": list(CLASS_NAMES), "grayscale": cfg.grayscale,
            "face_margin": prep.face_margin, "manifest": str(manifest_path),
            "manifest_digest": manifest_digest(manifest),
            "config": {k: str(v) for k, v in asdict(cfg).items()},
            "recipe": f"frozen backbone, head only: {head_epochs} epochs on cached embeddings "
                      f"(+ mirrored copies), Adam lr {head_lr}", "embed_s": embed_s}
    save_checkpoint(cfg.out / "best.pt", {"model": model.state_dict(), "epoch": head_epochs,
                                          "history": history, "meta": meta})
    (cfg.out / "history.json").write_text(json.dumps(history, indent=1))
    return model
