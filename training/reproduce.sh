#!/usr/bin/env bash
# Rebuild the shipped models from the shared data: train, export (fp32 + int8), evaluate.
# Usage: training/reproduce.sh ARCH [finish], ARCH one of alexnet, efficientnet_lite0,
#   efficientnet_lite2, efficientnet_lite0_grey, mobilenetv2;
#   "finish" skips training and only exports / evaluates an existing runs/<arch>/best.pt
#   (runs/alexnet_distilled/best.pt for the AlexNet, its second stage).
set -euo pipefail
cd "$(dirname "$0")/.."
mm() { PYTHONPATH=. python -m maskmesh.cli "$@"; }
arch=${1:?arch}
step=${2:-all}
split=models/splits/split-seed0-m0.2-w32-d6.json
common=(--split-manifest "$split")
# The blind two-rater relabelling of the chandrikadeb7 test split (training/audit.py):
# evaluate reports that split against the data set's labels and against the audited ones.
audit=(--audit training/audits/chandrikadeb7-test.json)
case $arch in
  alexnet)
    # Two stages. 1: the paper's recipe from scratch on the data set's labels (17 epochs:
    # a 60-minute budget stopped the original 20-epoch run there; with a constant rate the
    # epoch count does not change the curve). 2: distilled from the default
    # EfficientNet-Lite0 on the audited labels (models/README.md), which ships.
    name=maskmesh-alexnet
    train=(--arch alexnet --epochs 17 --batch-size 32 --lr 1e-4 --seed 0)
    teacher=models/maskmesh-efficientnet-lite0.onnx
    stage2=(--arch alexnet --init runs/alexnet/best.pt --teacher "$teacher" --distill-weight 0.7
            --distill-temperature 4 --epochs 12 --batch-size 32 --lr 1e-4 --lr-schedule cosine
            --seed 0 --audit training/audits/chandrikadeb7-train.json
            --audit training/audits/chandrikadeb7-validation.json)
    stage2_run=runs/alexnet_distilled ;;
  efficientnet_lite0)
    # ImageNet backbone fine-tuned; the stem and first 3 blocks stay fixed (they cost most
    # of the backward pass on a CPU and hold generic edge / texture filters).
    # Trained on the audited chandrikadeb7 labels: its masks worn under the nose count as
    # incorrect, as the design defines them (training/audits/). The paper's 20 epochs; each
    # epoch's weights are kept for the weight-averaging comparison (maskmesh average), which
    # the best single epoch won on the validation split (models/README.md).
    name=maskmesh-efficientnet-lite0
    train=(--arch efficientnet_lite0 --freeze-blocks 3 --channels-last --epochs 20 --keep-epochs
           --batch-size 32 --lr 3e-4 --lr-schedule cosine --low-res-p 0.3 --colour-jitter 0.3
           --seed 0 --audit training/audits/chandrikadeb7-train.json
           --audit training/audits/chandrikadeb7-validation.json) ;;
  efficientnet_lite2)
    # The default's recipe on the wider Lite2 backbone (models/README.md). Its first 4
    # blocks are the same two stages as Lite0's first 3, so they stay fixed. A candidate:
    # it is trained only, and compared with the default on the validation split before any
    # test set is scored (the rule in models/README.md).
    name=maskmesh-efficientnet-lite2
    train_only=1
    train=(--arch efficientnet_lite2 --freeze-blocks 4 --channels-last --epochs 20
           --batch-size 32 --lr 3e-4 --lr-schedule cosine --low-res-p 0.3 --colour-jitter 0.3
           --seed 0 --audit training/audits/chandrikadeb7-train.json
           --audit training/audits/chandrikadeb7-validation.json) ;;
  efficientnet_lite0_grey)
    # The same recipe on grey-scale input (luma copied to the three channels), for cameras
    # that switch to infrared at night; measured beside the colour model, not the default.
    name=maskmesh-efficientnet-lite0-grey
    train=(--arch efficientnet_lite0 --grayscale --freeze-blocks 3 --channels-last --epochs 10
           --batch-size 32 --lr 3e-4 --lr-schedule cosine --low-res-p 0.3 --colour-jitter 0.3
           --seed 0) ;;
  mobilenetv2)
    name=maskmesh-mobilenetv2
    train=(--arch mobilenetv2 --epochs 20 --batch-size 32 --lr 1e-3 --seed 0
           --time-budget-min 10) ;;
  *) echo "unknown arch $arch" >&2; exit 2 ;;
esac
run=runs/$arch
stage2=(${stage2[@]+"${stage2[@]}"})
# The model id (in the ONNX metadata and every verdict) names the date and the checkpoint,
# so two models exported the same day never share one.
if [[ $step == all ]]; then
  mm train "${common[@]}" "${train[@]}" --out "$run" --resume
  if (( ${#stage2[@]} )); then
    mm train "${common[@]}" "${stage2[@]}" --out "$stage2_run" --resume
  fi
fi
if (( ${#stage2[@]} )); then
  run=$stage2_run
fi
if [[ ${train_only:-} ]]; then
  echo "$run/best.pt is a candidate: compare its validation score ($run/history.json)" \
       "with the default's as models/README.md says before exporting it" >&2
  exit 0
fi
mm export "${common[@]}" --checkpoint "$run/best.pt" --out "models/$name.onnx" \
  --int8 "models/$name-int8.onnx" \
  --model-id "$name-$(date -u +%Y%m%d)-$(sha256sum "$run/best.pt" | cut -c1-8)"
mm evaluate "${common[@]}" "${audit[@]}" --model "models/$name.onnx" --out docs/model-report \
  --history "$run/history.json"
mm evaluate "${common[@]}" "${audit[@]}" --model "models/$name-int8.onnx" --out docs/model-report
