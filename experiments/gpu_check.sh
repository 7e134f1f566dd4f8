#!/usr/bin/env bash
# The GPU check, one prepared script for a machine with an NVIDIA GPU (about 5-8 minutes on one H200):
#
#   1. byol-ray bench, ResNet-50 at 224 px, batch 256, bf16 autocast, channels_last (synthetic images);
#   2. the same in fp32, for the bf16 speed-up;
#   3. byol-ray bench, ResNet-18 (CIFAR stem) at 32 px, batch 512, bf16 (synthetic images);
#   4. byol-ray bench, ResNet-50 at 224 px on a streamed folder of real JPEG files (generated here, 500x375):
#      the DataLoader decode + crop path of byol_ray/data/pipeline.py against the training step;
#   5. a short Ray Train run, 1 worker x 1 GPU (Fashion-MNIST if installed, else the JPEG folder, streamed).
#
#   experiments/gpu_check.sh [OUTPUT_DIR]          # default: $OUT if set, else outputs/gpu_check
#
# Each step has its own `timeout`, writes <step>.json (and <step>.log) under OUTPUT_DIR and a failed step
# does not stop the others; summary.json lists each step's exit code. Nothing is installed or downloaded:
# it uses .venv/bin/python if present, else $PYTHON, else python3, with this checkout on PYTHONPATH.
# GPU_CHECK_COMPILE=1 adds run.compile=true to step 1 (torch.compile; slower start, more time).
set -euo pipefail

cd "$(dirname "$0")/.."
OUTDIR="${1:-${OUT:-outputs/gpu_check}}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
if [[ -x .venv/bin/python ]]; then PY="$PWD/.venv/bin/python"; else PY="${PYTHON:-python3}"; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MLFLOW_TRACKING_URI="sqlite:///$OUTDIR/mlflow.db"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

declare -A RC=()
run_step() {  # run_step NAME SECONDS COMMAND...: never stops the script, records the exit code
    local name=$1 limit=$2
    shift 2
    echo "[gpu_check] $(date +%T) $name (timeout ${limit}s)"
    local rc=0
    timeout --kill-after=20 "$limit" "$@" >"$OUTDIR/$name.log" 2>&1 || rc=$?
    RC[$name]=$rc
    if [[ $rc -eq 0 ]]; then tail -n 20 "$OUTDIR/$name.log"; else echo "[gpu_check] $name FAILED (exit $rc); see $OUTDIR/$name.log"; tail -n 5 "$OUTDIR/$name.log" || true; fi
}

run_step environment 60 bash -c "nvidia-smi; '$PY' -c 'import torch, sys; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0)); sys.exit(0 if torch.cuda.is_available() else 3)'"
if [[ ${RC[environment]} -ne 0 ]]; then
    echo "[gpu_check] no usable CUDA device or Python environment; nothing else to run"
    echo '{"environment": '"${RC[environment]}"'}' >"$OUTDIR/summary.json"
    exit 1
fi

BENCH=("$PY" -m byol_ray.bench --repeats 10 --warmup 5)
R50=(--config experiments/imagenet_resnet50.yaml --synthetic 2048 run.device=cuda run.num_workers=1 optim.batch_size=256
     tracking.enabled=false)
COMPILE=()
[[ "${GPU_CHECK_COMPILE:-0}" == 1 ]] && COMPILE=(run.compile=true)

run_step bench_resnet50_224_bf16 150 "${BENCH[@]}" "${R50[@]}" run.precision=bf16 "${COMPILE[@]}" --json "$OUTDIR/bench_resnet50_224_bf16.json"
run_step bench_resnet50_224_fp32 120 "${BENCH[@]}" "${R50[@]}" run.precision=fp32 --json "$OUTDIR/bench_resnet50_224_fp32.json"
run_step bench_resnet18_32_bf16 90 "${BENCH[@]}" --config experiments/fmnist.yaml --synthetic 8192 model.in_channels=3 \
    data.image_size=32 model.stem=small model.width=64 model.projector_hidden=4096 model.predictor_hidden=4096 \
    optim.batch_size=512 run.device=cuda run.precision=bf16 tracking.enabled=false \
    --json "$OUTDIR/bench_resnet18_32_bf16.json"

# A folder of real JPEGs (1,536 images, 4 classes, 500x375 like an average ImageNet photo), made here.
run_step make_jpeg_folder 90 "$PY" - "$WORK/jpegs" <<'EOF'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
root = Path(sys.argv[1])
rng = np.random.default_rng(0)
base = rng.integers(0, 256, (375 // 5 + 1, 500 // 5 + 1, 3), dtype=np.uint8)
for split, n in (("train", 384), ("val", 16)):
    for c in range(4):
        d = root / split / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            # smooth content (JPEG-friendly) that differs per image
            img = np.roll(base, (i * 7 + c, i * 3), axis=(0, 1)).repeat(5, 0).repeat(5, 1)[:375, :500]
            Image.fromarray(img).save(d / f"{i}.jpg", quality=90)
print("wrote", sum(1 for _ in root.rglob("*.jpg")), "JPEGs under", root)
EOF
NPROC="$(nproc)"
LOADERS=$(( NPROC > 2 ? NPROC - 2 : 1 ))
run_step bench_resnet50_224_stream 150 "${BENCH[@]}" --config experiments/imagenet_resnet50.yaml run.device=cuda \
    run.num_workers=1 optim.batch_size=256 run.precision=bf16 tracking.enabled=false data.root="$WORK/jpegs" \
    data.stream=true data.num_workers="$LOADERS" --json "$OUTDIR/bench_resnet50_224_stream.json"

# The Ray Train run: Fashion-MNIST as the main job when it is installed, else the JPEG folder, streamed.
if [[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]]; then
    DATA=(--config experiments/fmnist.yaml optim.steps_per_epoch=100 eval.knn_every=0 data.test_subset=2000)
else
    DATA=(--config experiments/fmnist.yaml data.dataset=folder data.root="$WORK/jpegs" data.image_size=64 data.stream=true
          data.num_workers="$LOADERS" model.in_channels=0 optim.steps_per_epoch=20 optim.batch_size=64 eval.final=false
          eval.knn_every=0)
fi
run_step ray_train_1gpu 200 "$PY" - "$OUTDIR/ray_train_1gpu.json" "${DATA[@]}" run.device=cuda run.gpus_per_worker=1 \
    run.cpus_per_worker=4 run.num_workers=1 optim.epochs=2 run.precision=bf16 run.name=gpu-check \
    run.output_dir="$OUTDIR/train" tracking.log_model=false <<'EOF'
import json, sys, time
from byol_ray.config import load_config
from byol_ray.distributed.driver import run_training
out_path, argv = sys.argv[1], sys.argv[2:]
cfg = load_config(argv[1], argv[2:])
t0 = time.time()
res = run_training(cfg)
m = {k: v for k, v in res["metrics"].items() if isinstance(v, (int, float))}
json.dump({"wall_seconds": time.time() - t0, "run_id": res["run_id"], "metrics": m,
           "eval_rows": [r.__dict__ for r in res["rows"]]}, open(out_path, "w"), indent=2)
print(json.dumps(m, indent=1))
EOF

{
    echo "{"
    first=1
    for k in "${!RC[@]}"; do
        [[ $first -eq 1 ]] || echo ","
        printf '  "%s": %s' "$k" "${RC[$k]}"
        first=0
    done
    echo ""
    echo "}"
} >"$OUTDIR/summary.json"
echo "[gpu_check] exit codes: $(tr -d '\n' <"$OUTDIR/summary.json")"
failed=0
for k in "${!RC[@]}"; do [[ ${RC[$k]} -eq 0 ]] || failed=1; done
exit $failed
