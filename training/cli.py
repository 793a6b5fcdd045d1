"""``maskmesh train`` / ``validate`` / ``evaluate`` / ``export`` and the rest of the
training commands: argument parsing and dispatch only."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from training.paths import default_data_root, default_runs, reports_dir

logger = logging.getLogger(__name__)

# Kept here rather than read from training.models, which imports torch; a test checks
# that the two agree. The EfficientNet-Lite archs, each with its count of MBConv blocks.
LITE_BLOCKS = {"efficientnet_lite0": 16, "efficientnet_lite2": 21}
TRAIN_ARCHS = ["alexnet", "mobilenetv2", *LITE_BLOCKS, "vgg16"]


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


def _check_distill_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill in the distillation defaults; refuse them out of range or without a teacher."""
    given = [flag for flag, value in (("--distill-weight", args.distill_weight),
                                      ("--distill-temperature", args.distill_temperature))
             if value is not None]
    if given and args.teacher is None:
        verb = "apply" if len(given) > 1 else "applies"
        parser.error(f"{' and '.join(given)} {verb} only with --teacher")
    if args.teacher is None:
        return
    from training.distill import check_distill_settings
    from training.train import TrainConfig

    if args.distill_weight is None:
        args.distill_weight = TrainConfig.distill_weight
    if args.distill_temperature is None:
        args.distill_temperature = TrainConfig.distill_temperature
    try:
        check_distill_settings(args.distill_weight, args.distill_temperature)
    except ValueError as exc:
        parser.error(str(exc).replace("distill weight", "--distill-weight")
                     .replace("distill temperature", "--distill-temperature"))


def _check_train_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject impossible combinations before any data is read."""
    lite = args.arch in LITE_BLOCKS
    if args.freeze_blocks and not lite:
        parser.error("--freeze-blocks applies to the EfficientNet-Lite archs only")
    if lite and not 0 <= args.freeze_blocks <= LITE_BLOCKS[args.arch]:
        parser.error(f"--freeze-blocks must be 0..{LITE_BLOCKS[args.arch]} ({args.arch} has "
                     f"{LITE_BLOCKS[args.arch]} blocks), got {args.freeze_blocks}")
    if not 0.0 <= args.low_res_p <= 1.0:
        parser.error(f"--low-res-p is a probability (0..1), got {args.low_res_p}")
    if not 0.0 <= args.colour_jitter < 1.0:
        parser.error(f"--colour-jitter must be at least 0 and below 1, got {args.colour_jitter}")
    _check_distill_args(parser, args)
    head_only = args.freeze_backbone and lite and args.init is None
    default = parser.get_default
    # What a head trained on cached embeddings never reads (it has its own rate and epochs).
    ignored = [flag for flag, used in (("--freeze-blocks", args.freeze_blocks),
                                       ("--lr-schedule", args.lr_schedule != "constant"),
                                       ("--channels-last", args.channels_last),
                                       ("--low-res-p", args.low_res_p),
                                       ("--colour-jitter", args.colour_jitter),
                                       ("--teacher", args.teacher),
                                       ("--lr", args.lr != default("lr")),
                                       ("--batch-size", args.batch_size != default("batch_size")),
                                       ("--weight-decay", args.weight_decay),
                                       ("--max-steps", args.max_steps),
                                       ("--time-budget-min", args.time_budget_min),
                                       ("--resume", args.resume)) if used]
    if args.freeze_backbone and not lite:
        parser.error("--freeze-backbone applies to the EfficientNet-Lite archs only (the other "
                     "networks have no pretrained backbone here)")
    if head_only and args.keep_epochs:
        parser.error("--keep-epochs does not apply to --freeze-backbone without --init "
                     "(the head trains on cached embeddings)")
    if head_only and ignored:
        parser.error(f"--freeze-backbone trains the head on cached embeddings and ignores "
                     f"{', '.join(ignored)}")


def train_main(argv: list[str]) -> int:
    """Train a classifier; checkpoints go to ``--out``."""
    parser = argparse.ArgumentParser(prog="maskmesh train", description=train_main.__doc__)
    _add_data_args(parser)
    parser.add_argument("--arch", default="alexnet",
                        choices=TRAIN_ARCHS)
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
    parser.add_argument("--freeze-blocks", type=int, default=0,
                        help="keep the stem and this many early blocks fixed (EfficientNet)")
    parser.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"])
    parser.add_argument("--channels-last", action="store_true",
                        help="channels-last memory order (faster for EfficientNet on CPU)")
    parser.add_argument("--low-res-p", type=float, default=0.0,
                        help="probability of a low-resolution detour per training image")
    parser.add_argument("--colour-jitter", type=float, default=0.0,
                        help="largest relative brightness / contrast / saturation change")
    parser.add_argument("--audit", type=Path, action="append", default=[],
                        help="audit file (training/audits/) whose labels replace the data "
                             "set's for its split; repeatable")
    parser.add_argument("--keep-epochs", action="store_true",
                        help="keep each epoch's weights in out/epochs/ (for maskmesh average)")
    parser.add_argument("--teacher", type=Path, default=None,
                        help="exported .onnx model to distil from (e.g. the default "
                             "EfficientNet-Lite0 into the AlexNet)")
    parser.add_argument("--distill-weight", type=float, default=None,
                        help="share of the distillation term in the loss, 0..1 (with "
                             "--teacher; default 0.7)")
    parser.add_argument("--distill-temperature", type=float, default=None,
                        help="softening temperature of the distillation term, 0.05..100 "
                             "(with --teacher; default 4)")
    parser.add_argument("--max-steps", type=int, default=0, help="steps per epoch cap (smoke)")
    parser.add_argument("--train-limit", type=int, default=0, help="training images cap (smoke)")
    parser.add_argument("--time-budget-min", type=float, default=0.0,
                        help="stop at the epoch boundary before this many minutes (0: none)")
    args = parser.parse_args(argv)
    _check_train_args(parser, args)
    _setup_logging()

    from training.augment import AugmentConfig
    from training.train import TrainConfig, run_training

    out = args.out or args.runs / args.arch
    cfg = TrainConfig(arch=args.arch, out=out, epochs=args.epochs, batch_size=args.batch_size,
                      lr=args.lr, weight_decay=args.weight_decay, seed=args.seed,
                      grayscale=args.grayscale, init=args.init, resume=args.resume,
                      threads=args.threads, class_weighting=not args.no_class_weights,
                      freeze_backbone=args.freeze_backbone, freeze_blocks=args.freeze_blocks,
                      lr_schedule=args.lr_schedule, channels_last=args.channels_last,
                      max_steps=args.max_steps, train_limit=args.train_limit,
                      time_budget_min=args.time_budget_min, audits=tuple(args.audit),
                      keep_epochs=args.keep_epochs, teacher=args.teacher,
                      **({} if args.teacher is None else {
                          "distill_weight": args.distill_weight,
                          "distill_temperature": args.distill_temperature}),
                      augment=AugmentConfig(low_res_p=args.low_res_p,
                                            colour_jitter=args.colour_jitter))
    from training.data import DatasetError

    try:
        if args.freeze_backbone and args.arch in LITE_BLOCKS and args.init is None:
            from training.features import run_head_training

            run_head_training(cfg, _prepare_config(args), head_epochs=args.epochs)
            best = out / "best.pt"
        else:
            best = run_training(cfg, _prepare_config(args))
    except (DatasetError, ValueError) as exc:  # InitError, AuditError, refused resumes
        logger.error("cannot train: %s", exc)
        return 1
    logger.info("best checkpoint %s", best)
    return 0


def _load_eval_sets(args: argparse.Namespace):  # noqa: ANN202
    from training.evaluate import EVAL_SETS
    from training.prepare import load_or_build_manifest, split_data

    prep = _prepare_config(args)
    manifest, manifest_path = load_or_build_manifest(prep)
    sets = {f"{ds}-{split}": (split_data(prep, manifest, ds, split), desc)
            for ds, split, desc in EVAL_SETS}
    return prep, manifest, manifest_path, sets


def _probs_fn(model_path: Path, threads: int):  # noqa: ANN202
    """(probs function on uint8 crops, grayscale flag, history, model name)."""
    import numpy as np

    from training.export import normalised_batch

    if model_path.suffix == ".onnx":
        from services.inference.classifier import MaskClassifier

        # The services' loader: one session, with the input and output its metadata names.
        clf = MaskClassifier(model_path, intra_op_threads=threads)
        grayscale = clf.info.grayscale

        def run(images: np.ndarray) -> np.ndarray:
            out = [clf.predict_probs(normalised_batch(images[i:i + 64], grayscale))
                   for i in range(0, len(images), 64)]
            return np.concatenate(out)

        return run, clf.info.extra.get("history"), clf.info.model_id
    import torch

    from training.export import load_checkpoint_model
    from training.train import predict_probs

    torch.set_num_threads(threads)
    model, meta = load_checkpoint_model(model_path)
    state = torch.load(model_path, map_location="cpu", weights_only=False)

    def run_torch(images: np.ndarray) -> np.ndarray:
        return predict_probs(model, images, meta["grayscale"])

    return run_torch, state.get("history"), f"{meta['arch']}-checkpoint"


def validate_main(argv: list[str]) -> int:
    """Score a model on the validation split: the measure the shipping rules compare.

    Prints faces right, accuracy and the mean cross-entropy of the probabilities against
    the labels (audits applied), as JSON. ``--mirror`` averages each face's probabilities
    with its mirror image's.
    """
    parser = argparse.ArgumentParser(prog="maskmesh validate", description=validate_main.__doc__)
    _add_data_args(parser)
    parser.add_argument("--model", type=Path, required=True, help=".onnx file or .pt checkpoint")
    parser.add_argument("--audit", type=Path, action="append", default=[],
                        help="training or validation audit whose labels replace the data "
                             "set's (as maskmesh train --audit); repeatable")
    parser.add_argument("--mirror", action="store_true",
                        help="average each face's probabilities with its mirror image's")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if not args.model.is_file():
        parser.error(f"--model {args.model}: no such file")
    from training.audit import AuditError, load_audit

    try:
        audits = [load_audit(path) for path in args.audit]
    except AuditError as exc:
        parser.error(str(exc))
    splits = {str(path): audit["split"] for path, audit in zip(args.audit, audits, strict=True)}
    # A test-split audit would leave the validation labels as they are, silently.
    foreign = [path for path, split in splits.items() if split not in ("train", "validation")]
    if foreign:
        parser.error(f"{', '.join(foreign)}: audits another split than the training sets' "
                     "(give the train and validation audits, as maskmesh train takes them)")
    _setup_logging()
    if splits and "validation" not in splits.values():
        logger.warning("no --audit covers the validation split: its own labels are scored")
    import json
    import pickle

    import numpy as np

    from training.data import DatasetError
    from training.train import load_validation_data

    # The model first: a bad file should not wait for the faces to be decoded.
    try:
        probs_of, _, name = _probs_fn(args.model, args.threads)
    except (ValueError, KeyError, RuntimeError, OSError, EOFError,
            pickle.UnpicklingError) as exc:
        print(f"maskmesh validate: cannot load {args.model}: {exc}", file=sys.stderr)
        return 2
    # Limitation: the model's own manifest digest (in its metadata or checkpoint) is not
    # compared with the split scored here, as evaluate does not compare it either; with
    # another --split-manifest or --split-seed its training faces may be among these.
    try:
        val = load_validation_data(_prepare_config(args), audits)
    except (DatasetError, ValueError) as exc:
        logger.error("cannot read the validation split: %s", exc)
        return 1
    probs = probs_of(val.images)
    if args.mirror:
        # The crops are square and centre-cropped, so mirroring the whole crop mirrors
        # exactly what the model sees.
        probs = (probs + probs_of(np.ascontiguousarray(val.images[:, :, ::-1]))) / 2
    right = int((probs.argmax(1) == val.labels).sum())
    picked = np.clip(probs[np.arange(len(probs)), val.labels], 1e-12, None)
    print(json.dumps({"model": name, "audits": list(splits), "mirror": args.mirror,
                      "faces": len(probs),
                      "right": right, "accuracy": round(right / len(probs), 6),
                      "loss": round(float(-np.log(picked).mean()), 6)}))
    return 0


def evaluate_main(argv: list[str]) -> int:
    """Evaluate an ONNX model or a checkpoint on the held-out and cross-dataset faces."""
    parser = argparse.ArgumentParser(prog="maskmesh evaluate", description=evaluate_main.__doc__)
    _add_data_args(parser)
    parser.add_argument("--model", type=Path, required=True, help=".onnx file or .pt checkpoint")
    parser.add_argument("--name", default=None, help="report name (default: file stem)")
    parser.add_argument("--out", type=Path, default=None, help="report folder")
    parser.add_argument("--history", type=Path, default=None,
                        help="history.json of the training run, for the curves")
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-latency", action="store_true")
    parser.add_argument("--grey-input", action="store_true",
                        help="turn every face grey before the model sees it (an infrared "
                             "night camera); the report says so")
    parser.add_argument("--audit", type=Path, action="append", default=[],
                        help="audit file (training/audits/): also report its split against "
                             "the audited labels; repeatable")
    args = parser.parse_args(argv)
    _setup_logging()
    from training.audit import AuditError, audited_labels, load_audit

    audits: dict = {}
    try:
        for audit in map(load_audit, args.audit):
            key = f"{audit['dataset']}-{audit['split']}"
            if key in audits:
                parser.error(f"two audits of {key}: {audits[key]['path']} and {audit['path']}")
            audits[key] = audit
    except AuditError as exc:
        parser.error(str(exc))

    import json

    import numpy as np

    from training.data import CLASS_NAMES
    from training.evaluate import (
        classification_metrics,
        disagreements,
        time_per_image_ms,
        write_report,
    )
    from training.prepare import manifest_digest

    _, manifest, manifest_path, sets = _load_eval_sets(args)
    probs_fn, history, model_id = _probs_fn(args.model, args.threads)
    if args.grey_input:
        from training.augment import GREY_WEIGHTS

        colour_fn = probs_fn
        weights = np.array(GREY_WEIGHTS, dtype=np.float32)

        def probs_fn(images: np.ndarray) -> np.ndarray:
            luma = np.rint(images.astype(np.float32) @ weights).clip(0, 255).astype(np.uint8)
            return colour_fn(np.repeat(luma[..., None], 3, axis=-1))
    if args.history is not None:
        history = json.loads(args.history.read_text())
    results: dict = {"model": str(args.model), "model_id": model_id,
                     "threshold": args.threshold, "class_names": list(CLASS_NAMES),
                     "input": "grey (luma copied to 3 channels)" if args.grey_input else "as is",
                     "split_manifest": manifest_path.name,
                     "manifest_digest": manifest_digest(manifest), "sets": {},
                     "descriptions": {k: d for k, (_, d) in sets.items()}}
    unmatched = sorted(audits.keys() - sets.keys())
    if unmatched:
        parser.error(f"no evaluation set for the audits of {unmatched}; sets are "
                     f"{sorted(sets)}")
    audited = {}
    for key, audit in audits.items():
        try:
            audited[key] = audited_labels(audit, sets[key][0].samples)
        except AuditError as exc:
            parser.error(str(exc))
        if audit["manifest_digest"] not in (None, results["manifest_digest"]):
            logger.warning("%s was made on another manifest (digest %s, this one %s); its "
                           "faces match this split", audit["path"], audit["manifest_digest"],
                           results["manifest_digest"])
        results["descriptions"][f"{key}-audited"] = (
            f"the same faces, labels after the blind audit `{audit['path']}`")
    for key, (data, _) in sets.items():
        if not len(data):
            logger.warning("evaluation set %s is empty, skipped", key)
            continue
        probs = probs_fn(data.images)
        label_sets = [(key, data.labels)]
        if key in audited:
            label_sets.append((f"{key}-audited", audited[key]))
        for name, labels in label_sets:
            m = classification_metrics(probs, labels, args.threshold)
            m["errors"] = disagreements(probs, labels, data.samples)
            m["errors_total"] = int((probs.argmax(1) != labels).sum())
            results["sets"][name] = m
            logger.info("%s: %d faces, accuracy %.2f %%, binary %.2f %%, AUC %.4f, violation "
                        "recall %.2f %% precision %.2f %%", name, m["n"], 100 * m["accuracy"],
                        100 * m["binary_accuracy"], m["auc"], 100 * m["violation"]["recall"],
                        100 * m["violation"]["precision"])
    if not args.no_latency:
        some = next(iter(sets.values()))[0].images
        results["latency_ms"] = {f"batch {b}": time_per_image_ms(probs_fn, some, b)
                                 for b in (1, 32)}
    # A grey-input report never takes the place of the model's own (colour) report.
    name = args.name or args.model.stem + ("-grey-input" if args.grey_input else "")
    out = args.out or reports_dir()
    write_report(out, name, results, history)
    return 0


def average_main(argv: list[str]) -> int:
    """Average a run's last epochs (out/epochs/, from --keep-epochs) into one checkpoint."""
    parser = argparse.ArgumentParser(prog="maskmesh average", description=average_main.__doc__)
    _add_data_args(parser)
    parser.add_argument("--run", type=Path, required=True, help="run folder (runs/<arch>)")
    parser.add_argument("--last", type=int, default=5, help="how many final epochs to average")
    parser.add_argument("--out", type=Path, default=None,
                        help="checkpoint to write (default: run/average-last<K>.pt)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    _setup_logging()

    from training.average import AverageError, average_run, best_epoch_score, pick_checkpoint
    from training.data import DatasetError

    try:
        best = best_epoch_score(args.run)  # a damaged best.pt fails before any work
        result = average_run(args.run, args.last, _prepare_config(args), args.out, args.threads)
        candidates = {}
        if best is None:
            logger.warning("%s is missing: nothing to compare the average with",
                           args.run / "best.pt")
        else:
            epoch, acc, loss = best
            logger.info("best single epoch %d: validation acc %.2f %%, loss %.4f", epoch,
                        100 * acc, loss)
            candidates[str(args.run / "best.pt")] = (acc, loss)
        candidates[str(result.path)] = (result.val_acc, result.val_loss)
        logger.info("validation picks %s (accuracy first, then loss; a full tie keeps the "
                    "single epoch)", pick_checkpoint(candidates))
    except (AverageError, DatasetError, ValueError, OSError) as exc:
        logger.error("cannot average: %s", exc)
        return 1
    return 0


def export_main(argv: list[str]) -> int:
    """Export a checkpoint to ONNX (fp32, parity-checked) and optionally int8."""
    parser = argparse.ArgumentParser(prog="maskmesh export", description=export_main.__doc__)
    _add_data_args(parser)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="fp32 .onnx path")
    parser.add_argument("--int8", type=Path, default=None, help="also write an int8 model here")
    parser.add_argument("--model-id", default=None)
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--calibration-images", type=int, default=256)
    parser.add_argument("--parity-images", type=int, default=96)
    args = parser.parse_args(argv)
    _setup_logging()

    import hashlib

    import numpy as np
    import torch

    from training.export import (
        build_metadata,
        check_parity,
        export_onnx,
        load_checkpoint_model,
        normalised_batch,
        quantize_int8,
    )
    from training.prepare import FOLDER_SET, VOC_TRAIN_SET, concat, split_data

    torch.set_num_threads(2)
    model, meta = load_checkpoint_model(args.checkpoint)
    prep, manifest, manifest_path, sets = _load_eval_sets(args)
    digest = hashlib.sha256(args.checkpoint.read_bytes()).hexdigest()[:12]
    model_id = args.model_id or f"maskmesh-{meta['arch']}-e{meta.get('epoch')}-{digest}"
    metadata = build_metadata(model_id, meta["arch"], meta["class_names"], meta["grayscale"],
                              meta["face_margin"], args.threshold,
                              epoch=meta.get("epoch"), split_manifest=manifest_path.name,
                              manifest_digest=meta.get("manifest_digest"),
                              label_audits=meta.get("audits", {}),
                              **({"teacher": meta["teacher"]} if meta.get("teacher") else {}),
                              **({"averaged_epochs": meta["averaged_epochs"]}
                                 if "averaged_epochs" in meta else {}))
    export_onnx(model, args.out, metadata)

    from training.export import ExportError

    real = concat([sets["chandrikadeb7-test"][0], sets["ilc2021-test"][0]])
    rng = np.random.default_rng(0)
    pick = np.sort(rng.permutation(len(real))[:args.parity_images])
    batch = normalised_batch(real.images[pick], meta["grayscale"])
    try:
        check_parity(model, args.out, batch)
    except ExportError as exc:
        logger.error("%s; removing the file", exc)
        args.out.unlink(missing_ok=True)
        return 1

    if args.int8 is not None:
        from training.export import onnx_probs

        train = concat([split_data(prep, manifest, FOLDER_SET, "train"),
                        split_data(prep, manifest, VOC_TRAIN_SET, "train")])
        cal = np.sort(rng.permutation(len(train))[:args.calibration_images])
        quantize_int8(args.out, args.int8, normalised_batch(train.images[cal],
                                                            meta["grayscale"]), metadata)
        fp32, int8 = onnx_probs(args.out, batch), onnx_probs(args.int8, batch)
        logger.info("int8 vs fp32 on %d images: max abs diff %.4f, argmax agreement %.2f %%",
                    len(batch), float(np.abs(fp32 - int8).max()),
                    100 * float((fp32.argmax(1) == int8.argmax(1)).mean()))
    return 0
