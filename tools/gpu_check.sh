#!/usr/bin/env bash
# Prove the GPU paths on a GPU machine in one shot of at most 450 s, data generation included.
#
#   bash tools/gpu_check.sh OUT              # on the GPU machine, from the repository root
#   bash tools/gpu_check.sh OUT --dry-run    # here: the same steps on the CPU at toy size (< 60 s)
#   bash tools/gpu_check.sh --budgets        # the step budgets, one "name=seconds" a line
#
# OUT gets at most 3 files: gpu_check.log (everything printed) and gpu_numbers.json (every row
# measured, rewritten atomically after each one, so a kill at any moment keeps the rows done).
# Generated data, shards and run folders live in a temporary folder outside OUT, removed at exit.
#
# One global deadline (GPU_CHECK_SECONDS, default 450 s): each step gets the smaller of its
# budget (BUDGETS below) and what is left, the least important last, so a slow step costs the
# steps after it, never the shot. A step past its limit gets SIGTERM (the rows step then stops
# in order, keeping its JSON), then SIGKILL GRACE seconds later.
#
# On the project's offline GPU machine, DALI and simplejpeg are carried in first
# (../shared/device/README.md, ../shared/device/pack-dali.sh) and must be importable
# (PYTHONPATH=/tmp/site:.); the preflight stops the check at once, saying why, if not.
# The carried wheels expected (pack-dali.sh pins DALI, nvimgcodec and nvcomp; these three it
# leaves to `pip download`, which resolved them to):
#   nvidia-dali-cuda130 2.4.0, nvidia-nvimgcodec-cu13 0.9.0.20, nvidia-libnvcomp-cu13 5.3.0.16,
#   nvidia-nvjpeg 13.3.2.43, nvidia-nvjpeg2k-cu13 0.11.0.51, nvidia-nvtiff-cu13 0.8.0.82
# tools/gpu_preflight.py prints the versions it finds, marking any other than these.
#
# The machine has one GPU: NCCL cannot put two ranks on one card, so the two-GPU path rests
# on the `train run --gpus 1` step here plus the two-process CPU tests (tests/test_parallel.py).
set -uo pipefail

TOTAL=${GPU_CHECK_SECONDS:-450}
# Seconds per step, in the order they run (most important first); tests/test_tools.py checks
# that they add up to at most 450.
BUDGETS=(preflight=20 tests=90 rows=200 train=75 feed=45)
GRACE=5  # seconds between a step's SIGTERM and its SIGKILL, taken out of its budget

if [ "${1:-}" = "--budgets" ]; then
  printf '%s\n' "${BUDGETS[@]}"
  exit 0
fi
out=${1:?usage: tools/gpu_check.sh OUT [--dry-run] | --budgets}
dry=${2:-}
mkdir -p "$out"
exec > >(tee "$out/gpu_check.log") 2>&1
export PYTHONPATH="${PYTHONPATH:-}:." PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
py=${PYTHON:-python3}
deadline=$((SECONDS + TOTAL))
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
trap 'rm -rf "$work"' EXIT

step() { echo; echo "=== $* ($(date +%T), ${SECONDS} s in)"; }

# The seconds step $1 may run: its budget, or what is left before the deadline if less.
limit_of() {
  local entry budget=0 left=$((deadline - SECONDS))
  for entry in "${BUDGETS[@]}"; do
    [ "${entry%%=*}" = "$1" ] && budget=${entry#*=}
  done
  echo $((budget < left ? budget : left))
}

# run_step NAME TITLE COMMAND...: the command under its limit; says how it ended.
run_step() {
  local name=$1 title=$2 limit
  shift 2
  limit=$(limit_of "$name")
  step "$title (at most $limit s)"
  if [ "$limit" -le "$GRACE" ]; then
    echo "$name: skipped, $limit s left of the $TOTAL s"
    return 0
  fi
  timeout --kill-after="$GRACE" $((limit - GRACE)) "$@"
  local rc=$?
  [ "$rc" -eq 124 ] && echo "$name: stopped at its limit"
  echo "$name: exit $rc"
  return "$rc"
}

if [ "$dry" = "--dry-run" ]; then
  check=(--dry-run); tests=(tests/test_augment.py)
  train=(--device cpu --nproc 1 --arch tools.gpu_check:toy_cnn --batch-size 4 --workers 2)
  feed=(--images 64 --batch-size 16 --samples 64)
else
  check=(); tests=(tests)
  train=(--gpus 1 --arch alexnet-owt --batch-size 256 --workers 8)
  feed=(--images 2048 --samples 8192)
fi

step "0. nvidia-smi"
nvidia-smi || echo "nvidia-smi: not available"
run_step preflight "1. preflight: CUDA, DALI, simplejpeg" "$py" -m tools.gpu_preflight "${check[@]}" ||
  { echo "preflight failed: the check stops here"; exit 1; }

run_step tests "2. GPU-marked tests" "$py" -m pytest -q -m gpu --timeout 60 -p no:cacheprovider "${tests[@]}"

run_step rows "3. loader, ceiling, feed and trainer rows" "$py" -m tools.gpu_check "$out" --work "$work" "${check[@]}"

# The run's process group is killed whole at its limit: DALI's workers are not our children's
# children only, and none may outlive the step.
train_step() {
  local limit=$1
  if [ ! -f "$work/shards-raw/manifest.json" ]; then
    echo "train run: skipped, the rows step made no shards"
    return 0
  fi
  setsid "$py" -m train run "$work/shards-raw" "${train[@]}" --epochs 1 --out "$work/run" &
  local pid=$!
  ( sleep "$limit"; kill -TERM -- -"$pid"; sleep "$GRACE"; kill -KILL -- -"$pid" ) >/dev/null 2>&1 &
  local watchdog=$!  # not on the log: it must not hold it open
  wait "$pid"; echo "train run: exit $?"
  pkill -P "$watchdog" sleep 2>/dev/null; kill "$watchdog" 2>/dev/null
  sleep 1
  echo "processes of the run left after 1 s: $(ps -eo pgid=,stat= | awk -v g="$pid" '$1 == g && $2 !~ /^Z/' | wc -l)"
}
limit=$(limit_of train)
step "4. train run ${train[*]}: one epoch that ends by itself (at most $limit s)"
if [ "$limit" -gt "$GRACE" ]; then train_step $((limit - GRACE)); else echo "train: skipped, $limit s left"; fi

run_step feed "5. feed cost on this machine's CPU cores" "$py" -m tools.bench_feed "${feed[@]}"

step "done in $SECONDS s of the $TOTAL s"
