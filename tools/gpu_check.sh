#!/usr/bin/env bash
# Prove the GPU paths on a GPU machine in one go, at most ~8 minutes; everything goes to OUT.
#
#   bash tools/gpu_check.sh OUT              # on the GPU machine, from the repository root
#   bash tools/gpu_check.sh OUT --dry-run    # here: the same steps on the CPU at toy size
#
# On the project's offline GPU machine, DALI and simplejpeg are carried in first (see
# ../shared/device/README.md); this script expects them importable (PYTHONPATH=/tmp/site:.).
# Writes OUT/gpu_check.log (everything printed) and OUT/gpu_numbers.json (the numbers).
# The machine has one GPU: NCCL cannot put two ranks on one card, so the two-GPU path rests
# on the `train run --gpus 1` step here plus the two-process CPU tests (tests/test_parallel.py).
set -uo pipefail
out=${1:?usage: tools/gpu_check.sh OUT [--dry-run]}
dry=${2:-}
mkdir -p "$out"
exec > >(tee "$out/gpu_check.log") 2>&1
export PYTHONPATH="${PYTHONPATH:-}:."
py=${PYTHON:-python3}
step() { echo; echo "=== $* ($(date +%T))"; }
limit() { timeout --kill-after=10 "$@"; }  # every step has a time limit: a hang costs minutes, not the run

step "1. versions"
nvidia-smi || echo "nvidia-smi: not available"
"$py" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| GPU", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
try:
    from nvidia import dali
    print("DALI", dali.__version__)
except ImportError as error:
    print("DALI: not importable:", error)
EOF

if [ "$dry" = "--dry-run" ]; then
  device=(--device cpu --nproc 1); check=(--dry-run); feed=(--images 512 --samples 2048)
else
  device=(--gpus 1); check=(); feed=()
fi

step "2. GPU-marked tests (each at most 120 s)"
if [ "$dry" = "--dry-run" ]; then
  limit 300 "$py" -m pytest -q -m gpu --timeout 120 tests/test_augment.py -p no:cacheprovider || echo "tests: exit $?"
else
  limit 300 "$py" -m pytest -q -m gpu --timeout 120 tests -p no:cacheprovider || echo "tests: exit $?"
fi

step "3-4. loader and trainer rates against their ceilings"
limit 300 "$py" -m tools.gpu_check "$out" "${check[@]}" || echo "gpu_check: exit $?"

step "4b. train run ${device[*]}: one short epoch that ends by itself"
work=$(mktemp -d)
"$py" -m tools.fake_imagenet "$work/src" --classes 4 --train-per-class 64 --val-per-class 4 --no-awkward >/dev/null &&
  "$py" -m prep.cli shard "$work/src" --out "$work/shards" --quiet >/dev/null &&
  "$py" -m prep.cli pca-stats "$work/shards" --quiet >/dev/null
setsid "$py" -m train run "$work/shards" "${device[@]}" --arch alexnet-owt --epochs 1 --batch-size 64 \
  --workers 4 --out "$work/run" &
pid=$!
( sleep 240; kill -KILL -- -"$pid" ) >/dev/null 2>&1 & watchdog=$!  # not on the log: it must not hold it open
wait "$pid"; echo "train run: exit $?"
pkill -P "$watchdog" sleep 2>/dev/null; kill "$watchdog" 2>/dev/null
sleep 3
left=$(ps -eo pgid=,stat=,pid=,args= | awk -v g="$pid" '$1 == g && $2 !~ /^Z/' | wc -l)
echo "processes of the run left after 3 s: $left"
rm -rf "$work"

step "5. feed cost on this machine's CPU cores"
limit 180 "$py" -m tools.bench_feed "${feed[@]}" || echo "bench_feed: exit $?"

step "done"
