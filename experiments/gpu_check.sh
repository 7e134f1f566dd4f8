#!/usr/bin/env bash
# The GPU check, one prepared script for a machine with an NVIDIA GPU, for a short device session.
# It needs only torch, torchvision, numpy and pyyaml: no pytest, Ray or MLflow (steps that need them say
# so and skip themselves). In order of importance, each under its own `timeout`:
#
#   1. step_check: experiments/gpu_step_check.py (views on CUDA = CPU, <= 300 ops and no sync per views
#      call, the step recorded as a CUDA graph trains like the eager step, no sync per replayed step);
#   2. byol-ray bench, ResNet-18 (small stem, width 64, 4096-wide heads) at 32 px, batch 512, bf16, with
#      the step recorded as a CUDA graph (run.compile=true run.compile_mode=graph), then eager;
#   3. byol-ray bench, ResNet-50 at 224 px, batch 256, bf16, graph then eager (synthetic images);
#   4. quality: Fashion-MNIST pretraining in-process (loop.pretrain) with the ResNet-18 of step 2 and the
#      final evaluation (linear probe, kNN, untrained encoder, raw pixels): time-budgeted with
#      optim.time_budget_minutes when the config has it, else GPU_CHECK_QUALITY_EPOCHS epochs;
#   5. packing: four trainings of experiments/fmnist.yaml's GPU recipe (on_gpu) at once on the one GPU, as
#      plain processes (as a sweep packs its trials with run.gpus_per_worker=0.25), each one's images/s
#      against the same training alone (experiments/gpu_packing_check.py);
#   6. with GPU_CHECK_FULL=1 also: ResNet-18 with compiled networks inside the graph (compile_mode=step),
#      ResNet-18 with the two views in one forward pass (model.separate_view_forward=false), ResNet-50
#      in fp32, ResNet-50 on a streamed folder of real JPEGs (generated here), a Ray Train run (1 GPU).
#
#   experiments/gpu_check.sh [OUTPUT_DIR]          # default: $OUT if set, else outputs/gpu_check
#
# Fashion-MNIST (the four IDX .gz files) is read from $FMNIST_ROOT, else data/fashion-mnist in this
# checkout (git-ignored), else /usr/share/datasets/fashion-mnist; without it steps 4 and 5 are skipped.
# Each step writes <step>.json (and <step>.log) under OUTPUT_DIR; a failed step does not stop the others;
# summary.json lists each step's exit code (77 = skipped). Nothing is installed or downloaded: it uses
# .venv/bin/python if present, else $PYTHON, else python3, with this checkout on PYTHONPATH.
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
ORDER=()
run_step() {  # run_step NAME SECONDS COMMAND...: never stops the script, records the exit code
    local name=$1 limit=$2
    shift 2
    echo "[gpu_check] $(date +%T) $name (timeout ${limit}s)"
    local rc=0
    timeout --kill-after=20 "$limit" "$@" >"$OUTDIR/$name.log" 2>&1 || rc=$?
    RC[$name]=$rc
    ORDER+=("$name")
    if [[ $rc -eq 0 ]]; then tail -n 22 "$OUTDIR/$name.log"; else echo "[gpu_check] $name FAILED (exit $rc); see $OUTDIR/$name.log"; tail -n 8 "$OUTDIR/$name.log" || true; fi
}
skip_step() {  # skip_step NAME REASON
    echo "[gpu_check] $1 skipped: $2" | tee "$OUTDIR/$1.log"
    RC[$1]=77
    ORDER+=("$1")
}

run_step environment 60 bash -c "nvidia-smi; '$PY' -c 'import torch, sys; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0)); sys.exit(0 if torch.cuda.is_available() else 3)'"
if [[ ${RC[environment]} -ne 0 ]]; then
    echo "[gpu_check] no usable CUDA device or Python environment; nothing else to run"
    echo '{"environment": '"${RC[environment]}"'}' >"$OUTDIR/summary.json"
    exit 1
fi

run_step step_check 150 "$PY" experiments/gpu_step_check.py "$OUTDIR/step_check.json"

BENCH=("$PY" -m byol_ray.bench --repeats 8 --warmup 4)  # warm-up >= 4: a graph is recorded on the 4th step
GRAPH=(run.compile=true run.compile_mode=graph)
R18=(--config experiments/fmnist.yaml --synthetic 8192 model.in_channels=3 data.image_size=32 model.stem=small
     model.width=64 model.projector_hidden=4096 model.predictor_hidden=4096 optim.batch_size=512 run.device=cuda
     run.precision=bf16 tracking.enabled=false)
R50=(--config experiments/imagenet_resnet50.yaml --synthetic 2048 run.device=cuda run.num_workers=1 optim.batch_size=256
     tracking.enabled=false)

run_step bench_resnet18_32_bf16_graph 150 "${BENCH[@]}" "${R18[@]}" "${GRAPH[@]}" --json "$OUTDIR/bench_resnet18_32_bf16_graph.json"
run_step bench_resnet18_32_bf16 100 "${BENCH[@]}" "${R18[@]}" --json "$OUTDIR/bench_resnet18_32_bf16.json"
run_step bench_resnet50_224_bf16_graph 180 "${BENCH[@]}" "${R50[@]}" run.precision=bf16 "${GRAPH[@]}" --json "$OUTDIR/bench_resnet50_224_bf16_graph.json"
run_step bench_resnet50_224_bf16 150 "${BENCH[@]}" "${R50[@]}" run.precision=bf16 --json "$OUTDIR/bench_resnet50_224_bf16.json"

# Quality: the same ResNet-18 on Fashion-MNIST (1 channel, resized to 32 px), the graph mode if it worked.
FMNIST=""
for d in "${FMNIST_ROOT:-}" "$PWD/data/fashion-mnist" /usr/share/datasets/fashion-mnist; do
    if [[ -n "$d" && -f "$d/train-images-idx3-ubyte.gz" ]]; then FMNIST="$d"; break; fi
done
if [[ -z "$FMNIST" ]]; then
    skip_step quality_fmnist "no Fashion-MNIST files (set FMNIST_ROOT or lay them in data/fashion-mnist)"
else
    QUALITY=(--config experiments/fmnist.yaml data.root="$FMNIST" data.image_size=32 model.stem=small model.width=64
             model.projector_hidden=4096 model.predictor_hidden=4096 optim.batch_size=512 run.device=cuda
             run.precision=bf16 eval.knn_every=0 run.log_every=1000)
    [[ ${RC[bench_resnet18_32_bf16_graph]} -eq 0 ]] && QUALITY+=("${GRAPH[@]}")
    if "$PY" -c "import sys; from byol_ray.config import OptimConfig; sys.exit(0 if 'time_budget_minutes' in OptimConfig.__dataclass_fields__ else 1)"; then
        QUALITY+=(optim.time_budget_minutes="${GPU_CHECK_QUALITY_MINUTES:-2.5}")
    else
        QUALITY+=(optim.epochs="${GPU_CHECK_QUALITY_EPOCHS:-25}")
    fi
    run_step quality_fmnist 330 "$PY" experiments/fmnist_quality.py "$OUTDIR/quality_fmnist.json" "${QUALITY[@]}"
fi

# Packing: the GPU recipe as a sweep trial gets it, a fixed number of steps instead of its time budget.
if [[ -z "$FMNIST" ]]; then
    skip_step packing_4_per_gpu "no Fashion-MNIST files (set FMNIST_ROOT or lay them in data/fashion-mnist)"
else
    run_step packing_4_per_gpu 240 "$PY" experiments/gpu_packing_check.py "$OUTDIR/packing_4_per_gpu.json" \
        --config experiments/fmnist.yaml --copies 4 data.root="$FMNIST" optim.time_budget_minutes=0 optim.epochs=5 \
        optim.steps_per_epoch=60 eval.final=false eval.knn_every=0 run.log_every=1000
fi

if [[ "${GPU_CHECK_FULL:-0}" == 1 ]]; then
    run_step bench_resnet18_32_bf16_step 300 "${BENCH[@]}" "${R18[@]}" run.compile=true run.compile_mode=step \
        --json "$OUTDIR/bench_resnet18_32_bf16_step.json"
    run_step bench_resnet18_32_bf16_graph_concat 150 "${BENCH[@]}" "${R18[@]}" "${GRAPH[@]}" model.separate_view_forward=false \
        --json "$OUTDIR/bench_resnet18_32_bf16_graph_concat.json"
    run_step bench_resnet50_224_fp32 150 "${BENCH[@]}" "${R50[@]}" run.precision=fp32 --json "$OUTDIR/bench_resnet50_224_fp32.json"

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

    if ! "$PY" -c "import ray, mlflow" >/dev/null 2>&1; then
        skip_step ray_train_1gpu "ray or mlflow is not installed in this Python (the Ray Train run needs both)"
    else
        if [[ -n "$FMNIST" ]]; then
            DATA=(--config experiments/fmnist.yaml data.root="$FMNIST" optim.steps_per_epoch=100 eval.knn_every=0 data.test_subset=2000)
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
    fi
fi

# The headline figures of every bench and packing step that ran, one line each.
"$PY" - "$OUTDIR" <<'EOF' | tee "$OUTDIR/figures.txt" || true
import json, sys
from pathlib import Path
for f in sorted(Path(sys.argv[1]).glob("bench_*.json")):
    r = json.loads(f.read_text())
    d = r.get("dispatch", {})
    print(f"{f.stem}: step {r['byol_step']['images_per_s']:,.0f} img/s, bare {r['bare_fwd_bwd']['images_per_s']:,.0f} img/s, "
          f"step/bare {r['byol_over_bare']:.3f}, augmentation {r['augmentation']['batched_images_per_s']:,.0f} img/s, "
          f"ops/syncs per step {d.get('step_ops')}/{d.get('step_syncs')}, per views call {d.get('augmentation_ops')}/{d.get('augmentation_syncs')}")
for f in sorted(Path(sys.argv[1]).glob("packing_*.json")):
    r = json.loads(f.read_text())
    print(f"{f.stem}: {r['copies']} at once {', '.join(f'{x:,.0f}' for x in r['images_per_s_each'])} img/s each "
          f"({r['images_per_s_sum']:,.0f} in all, {r['sum_over_alone']:.2f}x), alone {r['images_per_s_alone']:,.0f} img/s"
          + ("" if r["overlapped"] else " (not all epochs overlapped)"))
EOF

{
    echo "{"
    first=1
    for k in "${ORDER[@]}"; do
        [[ $first -eq 1 ]] || echo ","
        printf '  "%s": %s' "$k" "${RC[$k]}"
        first=0
    done
    echo ""
    echo "}"
} >"$OUTDIR/summary.json"
echo "[gpu_check] exit codes: $(tr -d '\n' <"$OUTDIR/summary.json")"
failed=0
for k in "${ORDER[@]}"; do [[ ${RC[$k]} -eq 0 || ${RC[$k]} -eq 77 ]] || failed=1; done
exit $failed
