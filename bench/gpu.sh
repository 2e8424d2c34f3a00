#!/usr/bin/env bash
# Benchmarks 1-3 on one GPU, unattended, in under 8 minutes:
#   0. tests/test_gpu.py: simulate's CUDA-graph replay against the eager step, an attack on the GPU;
#   1. fts_step: ResNet-18 at 32 px, batch 150, K=50 inner steps: FTS inner step and the whole protection
#      iteration vs a plain training step, fp32 and bf16 autocast, CUDA graphs on and off; the convnet too;
#   2. tune_throughput: the 24-trial attack sweep with 0.25 GPU per trial vs the sequential loop on the GPU;
#   3. train_scaling: protection on Ray Train with 1 GPU worker (its fixed start-up cost and in-loop speed);
# then collect.py writes DIR/BENCHMARKS.md. Each part has its own time limit; a failing part is reported and
# the others still run. Exit 0 only when every part succeeded.
#
# Usage: bench/gpu.sh [--out-dir DIR] [--check]      (default DIR: bench/results/gpu)
#   --check  only verify that a CUDA device is visible (exit 0) or not (exit 2)
# Environment: PYTHON (default .venv/bin/python, else python3: a machine's own PyTorch works, the repo goes on
# PYTHONPATH). With no package index there: if `import ray` fails and WHEELS (default REPO/.whl, made by
# tools/offline_wheels.py) holds wheels, they are installed into a temporary --target folder first; without
# MLflow the tune+mlflow contender is skipped.
set -uo pipefail

BENCH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$BENCH")"
PY="${PYTHON:-$REPO/.venv/bin/python}"
[[ -x "$PY" ]] || PY="$(command -v python3 || true)"
WHEELS="${WHEELS:-$REPO/.whl}"
OUT_DIR="$BENCH/results/gpu"
CHECK=0

while [[ $# -gt 0 ]]; do
  case "$1" in
    --out-dir) OUT_DIR="$2"; shift ;;
    --check) CHECK=1 ;;
    -h|--help) sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu.sh: unknown argument '$1' (allowed: --out-dir DIR, --check)" >&2; exit 2 ;;
  esac
  shift
done
[[ -x "$PY" ]] || { echo "gpu.sh: no python found; create the venv (see README) or set PYTHON" >&2; exit 2; }
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

if ! GPU="$("$PY" -c '
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} (CUDA build {torch.version.cuda}) sees no CUDA device")
print(torch.cuda.get_device_name(0))
' 2>&1)"; then
  echo "gpu.sh: no CUDA GPU: $GPU. This script only runs on a GPU machine; on CPU run the scripts themselves" >&2
  echo "        (bench/fts_step.py, bench/tune_throughput.py, bench/train_scaling.py, bench/quickstart.sh)." >&2
  exit 2
fi
echo "gpu.sh: CUDA device: $GPU" >&2
[[ "$CHECK" = 1 ]] && exit 0

mkdir -p "$OUT_DIR"
if ! "$PY" -c 'import ray.tune, ray.train' 2>/dev/null; then
  ls "$WHEELS"/*.whl >/dev/null 2>&1 || { echo "gpu.sh: ray is not importable by $PY and $WHEELS has no wheels" \
    "(make them with tools/offline_wheels.py, or pip install the project)" >&2; exit 2; }
  SITE="$(mktemp -d /tmp/sophon-site.XXXX)"
  echo "gpu.sh: installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE" >&2
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl \
    || { echo "gpu.sh: installing the wheels failed" >&2; exit 2; }
  export PYTHONPATH="$PYTHONPATH:$SITE" PATH="$SITE/bin:$PATH"
fi
MLFLOW_FLAG=()
"$PY" -c 'import mlflow' 2>/dev/null || { MLFLOW_FLAG=(--no-mlflow); echo "gpu.sh: no mlflow: tune+mlflow skipped" >&2; }
"$PY" - >"$OUT_DIR/machine.txt" 2>&1 <<'PYEOF'
import os, platform, subprocess, torch, ray
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), ray {ray.__version__}")
print(f"GPU {torch.cuda.get_device_name(0)}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB; "
      f"{os.cpu_count()} CPUs")
print(subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.mem,power.draw,temperature.gpu",
                      "--format=csv"], capture_output=True, text=True).stdout)
PYEOF
cat "$OUT_DIR/machine.txt" >&2
export RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true MPLBACKEND=Agg PYTHONUNBUFFERED=1
unset RAY_ADDRESS
FAILED=()
START=$SECONDS

part() {  # part NAME LIMIT_S CMD...: run one benchmark under a time limit, log it, remember a failure
  local name="$1" limit="$2"; shift 2
  echo "gpu.sh: [$((SECONDS - START)) s] $name (limit ${limit} s): $*" >&2
  timeout --kill-after=15 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
  local rc=$?
  if [[ $rc -ne 0 ]]; then
    FAILED+=("$name (exit $rc$([[ $rc -eq 124 ]] && echo ', timed out'))")
    echo "gpu.sh: $name FAILED (exit $rc); last lines of $OUT_DIR/$name.log:" >&2
    tail -n 15 "$OUT_DIR/$name.log" >&2
  fi
  return $rc
}

# Typical total ~5-6 min; the limits below cap a run where parts fail or hang at ~8.5 min.
# 0. ~20 s: the GPU tests (CUDA graphs vs eager).
part gpu_tests 120 "$PY" -m pytest -q -m gpu "$REPO/tests/test_gpu.py" -p no:cacheprovider
# 1. ~2 min on an H100/H200-class GPU (fp32 and bf16, CUDA graphs on and off, 5 inner rounds, 3 protect rounds of
#    N=4 iterations), then the convnet preset (~25 s).
part fts_step 200 "$PY" "$BENCH/fts_step.py" --device cuda --models resnet18 --image-size 32 --batch-size 150 \
  --inner-steps 50 --ntr-steps 1 --rounds 5 --outer-rounds 3 --outer-iterations 4 --bf16 both --threads 4 \
  --cuda-graphs both --out "$OUT_DIR/fts_step.md"
part fts_convnet 80 "$PY" "$BENCH/fts_step.py" --device cuda --models convnet --cuda-graphs both --threads 4 \
  --out "$OUT_DIR/fts_convnet.md"
# 2. ~2 min: 24 trials x 10 epochs, 1 round of the three contenders; 4 trials share the GPU (0.25 each); the
#    sequential loop on the GPU. If that fails (finetune's head re-init draws from a CPU generator, which CUDA
#    tensors refuse), rerun once with the sequential loop on CPU, which is where Tune's trials compute anyway
#    (attack_trial passes no device to finetune).
if ! part tune_throughput 160 "$PY" "$BENCH/tune_throughput.py" --device cuda --gpus-per-trial 0.25 --num-cpus 4 \
  --threads 4 --rounds 1 "${MLFLOW_FLAG[@]}" --out "$OUT_DIR/tune_throughput.md"; then
  part tune_throughput_cpu_baseline 140 "$PY" "$BENCH/tune_throughput.py" --device cuda --gpus-per-trial 0.25 \
    --num-cpus 4 --threads 4 --rounds 1 "${MLFLOW_FLAG[@]}" --sequential-device cpu --out "$OUT_DIR/tune_throughput.md"
fi
# 3. ~1 min: one GPU worker, 40 iterations, 1 round.
part train_scaling 90 "$PY" "$BENCH/train_scaling.py" --device cuda --rounds 1 --num-cpus 4 \
  --out "$OUT_DIR/train_scaling.md"

"$PY" "$BENCH/collect.py" --results "$OUT_DIR" --out "$OUT_DIR/BENCHMARKS.md" \
  --title "sophon-ray benchmarks on GPU ($GPU)" >&2 || FAILED+=("collect")
echo "gpu.sh: done in $((SECONDS - START)) s; results in $OUT_DIR" >&2
if [[ ${#FAILED[@]} -gt 0 ]]; then
  echo "gpu.sh: FAILED parts: ${FAILED[*]}" >&2
  exit 1
fi
