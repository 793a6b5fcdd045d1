"""``maskmesh train`` / ``evaluate`` / ``export``: argument parsing and dispatch only."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from training.paths import default_data_root, default_runs

logger = logging.getLogger(__name__)


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-root", type=Path, default=default_data_root(),
                        help="folder with chandrikadeb7/, ilc2021/, andrewmvd/")
    parser.add_argument("--runs", type=Path, default=default_runs(),
                        help="folder for caches and split manifests")
    parser.add_argument("--split-manifest", type=Path, default=None,
                        help="reuse this split manifest instead of building one")
    parser.add_argument("--face-margin", type=float, default=0.2,
                        help="fraction of a VOC box added on each side of the face crop")
    parser.add_argument("--min-face-px", type=int, default=32,
                        help="narrowest VOC face box used, in pixels")
    parser.add_argument("--phash-distance", type=int, default=6,
                        help="pHash Hamming distance that groups two images")
    parser.add_argument("--split-seed", type=int, default=0)


def _prepare_config(args: argparse.Namespace):  # noqa: ANN202 - avoids importing torch early
    from training.prepare import PrepareConfig

    return PrepareConfig(data_root=args.data_root, run_root=args.runs, seed=args.split_seed,
                         face_margin=args.face_margin, min_face_px=args.min_face_px,
                         max_distance=args.phash_distance, manifest=args.split_manifest)


def train_main(argv: list[str]) -> int:
    """Train a classifier; checkpoints go to ``--out``."""
    parser = argparse.ArgumentParser(prog="maskmesh train", description=train_main.__doc__)
    _add_data_args(parser)
    parser.add_argument("--arch", default="alexnet",
                        choices=["alexnet", "mobilenetv2", "efficientnet_lite0", "vgg16"])
    parser.add_argument("--out", type=Path, default=None, help="run folder (runs/<arch>)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue from out/last.pt")
    parser.add_argument("--init", type=Path, default=None,
                        help="state dict to start from, e.g. alexnet-owt-7be5be79.pth")
    parser.add_argument("--grayscale", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-class-weights", action="store_true")
    parser.add_argument("--freeze-backbone", action="store_true",
                        help="train the head only (pretrained backbones)")
    parser.add_argument("--max-steps", type=int, default=0, help="steps per epoch cap (smoke)")
    parser.add_argument("--train-limit", type=int, default=0, help="training images cap (smoke)")
    args = parser.parse_args(argv)
    _setup_logging()

    from training.train import TrainConfig, run_training

    out = args.out or args.runs / args.arch
    cfg = TrainConfig(arch=args.arch, out=out, epochs=args.epochs, batch_size=args.batch_size,
                      lr=args.lr, weight_decay=args.weight_decay, seed=args.seed,
                      grayscale=args.grayscale, init=args.init, resume=args.resume,
                      threads=args.threads, class_weighting=not args.no_class_weights,
                      freeze_backbone=args.freeze_backbone, max_steps=args.max_steps,
                      train_limit=args.train_limit)
    best = run_training(cfg, _prepare_config(args))
    logger.info("best checkpoint %s", best)
    return 0
