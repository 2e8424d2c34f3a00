#!/usr/bin/env bash
# The quickstart end to end, timed: `sophon-ray run sweeps/quickstart.yaml` in a fresh temporary working
# directory (fresh SQLite MLflow store, fresh runs/, private Ray temp dir), under /usr/bin/time -v for the
# peak RSS (python's resource module when /usr/bin/time is missing), then the stage breakdown the pipeline
# prints ("done in N s (pretrain+protect X s, attack Y s, report Z s)") as a results section.
#
# Usage: bench/quickstart.sh [--smoke] [--out PATH]     (default PATH: bench/results/quickstart.md, + .json)
# Cost: full ~5-6 min on 2 quiet cores (goal <= 10 min, which this checks); --smoke ~1 min (4 protect
# iterations, a 1x1x1 attack grid at 1 epoch: 3 trials).
# Environment: PYTHON (default .venv/bin/python), KEEP=1 keeps the working directory and prints its path.
set -euo pipefail

BENCH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$BENCH")"
PY="${PYTHON:-$REPO/.venv/bin/python}"
SMOKE=0
OUT="$BENCH/results/quickstart.md"

usage() { sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --out) OUT="$2"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "quickstart.sh: unknown argument '$1' (allowed: --smoke, --out PATH)" >&2; exit 2 ;;
  esac
  shift
done
[[ -x "$PY" ]] || { echo "quickstart.sh: no python at $PY; create the venv (see README) or set PYTHON" >&2; exit 2; }
[[ "$OUT" = /* ]] || OUT="$PWD/$OUT"

WORK="$(mktemp -d /tmp/sb-quick-XXXXXX)"
if [[ "${KEEP:-0}" = 1 ]]; then echo "quickstart.sh: working directory $WORK (kept)" >&2; else trap 'rm -rf "$WORK"' EXIT; fi

SETS=()
if [[ "$SMOKE" = 1 ]]; then
  SETS=(--set protect.0.iterations=4 --set protect.0.inner_steps=2 --set protect.0.ntr_steps=1
        --set protect.0.probe_every=4 --set protect.0.probe_epochs=1 --set pretrain.epochs=1
        --set original.train_size=500 --set original.test_size=200
        --set restricted.0.train_size=300 --set restricted.0.test_size=200
        --set 'attack.evaluation.strategy=[direct-all]' --set 'attack.evaluation.optimizer=[adam]'
        --set 'attack.evaluation.lr=[0.001]' --set 'attack.evaluation.seed=[0]' --set 'attack.evaluation.epochs=[1]')
fi
CMD=("$PY" -m sophon_ray.cli run "$REPO/sweeps/quickstart.yaml" "${SETS[@]}")

# A clean environment for the run: its own MLflow store (sqlite:///$WORK/mlflow.db, the default in the working
# directory), its own Ray instance (never $RAY_ADDRESS), no telemetry.
export RAY_TMPDIR="$WORK/ray" RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true MPLBACKEND=Agg PYTHONUNBUFFERED=1
unset MLFLOW_TRACKING_URI RAY_ADDRESS
mkdir -p "$RAY_TMPDIR"

echo "quickstart.sh: running in $WORK: ${CMD[*]}" >&2
set +e
if [[ -x /usr/bin/time ]] && /usr/bin/time -v true >/dev/null 2>&1; then
  TIMER="/usr/bin/time -v"
  (cd "$WORK" && /usr/bin/time -v -o "$WORK/time.txt" "${CMD[@]}") 2>&1 | tee "$WORK/run.log" >&2
  RC=${PIPESTATUS[0]}
else
  TIMER="python resource (RUSAGE_CHILDREN)"
  (cd "$WORK" && "$PY" "$BENCH/quickstart_section.py" timed "$WORK/time.txt" -- "${CMD[@]}") 2>&1 \
    | tee "$WORK/run.log" >&2
  RC=${PIPESTATUS[0]}
fi
set -e

ARGS=(report --log "$WORK/run.log" --time "$WORK/time.txt" --timer "$TIMER" --rc "$RC" --out "$OUT"
      --command "sophon-ray run sweeps/quickstart.yaml ${SETS[*]}")
[[ "$SMOKE" = 1 ]] && ARGS+=(--smoke)
"$PY" "$BENCH/quickstart_section.py" "${ARGS[@]}"
exit "$RC"
